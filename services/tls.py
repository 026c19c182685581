"""A throwaway certificate authority and server certificate, made with the `openssl` CLI.

For the services started on 127.0.0.1 with TLS (Kafka's SASL_SSL listener, MinIO over
HTTPS): the certificate names 127.0.0.1 and localhost, and clients trust the CA file.
Files are PEM, keys unencrypted (PKCS#8) and readable by their owner only.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SANS = ("IP:127.0.0.1", "DNS:localhost")


@dataclass(frozen=True)
class CA:
    cert: Path
    key: Path


@dataclass(frozen=True)
class ServerCert:
    ca_file: Path  # the CA certificate clients trust
    cert: Path
    key: Path

    def keystore(self) -> Path:
        """Key then certificate in one file (Kafka's PEM keystore); owner-only like the key."""
        path = self.key.with_name(self.key.stem + "-keystore.pem")
        _private(path, self.key.read_text() + self.cert.read_text())
        return path


def _openssl(*args: str) -> None:
    if shutil.which("openssl") is None:
        raise RuntimeError("making test certificates needs the `openssl` command on PATH")
    out = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed:\n{out.stderr}")


def _private(path: Path, text: str | None = None) -> None:
    """Create (or tighten) a file that only its owner may read."""
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    if text is not None:
        path.write_text(text)


def _directory(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    return directory


def make_ca(directory: Path, name: str = "cdc test CA", days: int = 7) -> CA:
    d = _directory(directory)
    cert, key = d / "ca.pem", d / "ca.key"
    _private(key)
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-noenc", "-keyout", str(key), "-out", str(cert),
        "-days", str(days), "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return CA(cert, key)


def make_server_cert(
    directory: Path, ca: CA, name: str = "server", sans: tuple[str, ...] = SANS, days: int = 7
) -> ServerCert:
    d = _directory(directory)
    key, csr, cert, ext = (d / f"{name}{suffix}" for suffix in (".key", ".csr", ".pem", ".ext"))
    ext.write_text(
        f"subjectAltName={','.join(sans)}\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )
    _private(key)
    _openssl(
        "req", "-new", "-newkey", "rsa:2048", "-noenc", "-keyout", str(key), "-out", str(csr),
        "-subj", f"/CN={name}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
        "-set_serial", str(secrets.randbits(63)), "-out", str(cert), "-days", str(days),
        "-sha256", "-extfile", str(ext),
    )  # fmt: skip
    csr.unlink()
    ext.unlink()
    return ServerCert(ca.cert, cert, key)


def make_pki(directory: Path, name: str = "server") -> ServerCert:
    """A new CA and one server certificate it signed, for 127.0.0.1 and localhost."""
    return make_server_cert(directory, make_ca(directory), name)


def bundle_with(ca_file: Path, path: Path, base: Path | None) -> Path:
    """`base` (a system CA bundle, if it exists) followed by `ca_file`, written to `path`."""
    parts = [base.read_text()] if base is not None and base.is_file() else []
    parts.append(ca_file.read_text())
    path.write_text("\n".join(p.strip("\n") for p in parts) + "\n")
    return path
