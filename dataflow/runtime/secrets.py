"""Secrets: which values never reach an output, credentials read from files, the object store's CA.

- Any variable whose name says password, secret, token or key material is a
  secret (`is_secret`). Its value, and the content of any `<VARIABLE>_FILE` the
  pipeline read, is redacted from every log line, traceback and CLI message
  (`dataflow.runtime.logs`).
- `<VARIABLE>_FILE` (the way Kubernetes and Docker mount Secrets) gives a
  variable's value as the content of a file, trailing newline dropped. Setting
  both the variable and its `_FILE` is refused.
- `CDC_STORAGE_CA_FILE` (or `AWS_CA_BUNDLE`) names the CA that signed the object
  store's certificate. delta-rs honours only `SSL_CERT_FILE` for a private CA,
  so the process points `SSL_CERT_FILE` at a bundle of the system's CAs and
  this one; minio-py (the bucket probe, `cdc status`) trusts the same bundle.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import tempfile
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path

SECRET_WORDS = ("PASSWORD", "PASSWD", "SECRET", "TOKEN", "KEY", "CREDENTIAL")
FILE_SUFFIX = "_FILE"
STORAGE_CA = "CDC_STORAGE_CA_FILE"
MIN_SECRET_LENGTH = 4  # shorter values would redact ordinary words

_read: list[str] = []  # contents of secret files read by this process


def is_secret(name: str) -> bool:
    """Whether a variable (or Kafka property) name says its value is a secret."""
    upper = name.upper()
    return any(word in upper for word in SECRET_WORDS)


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """Every secret this process knows, longest first (so no part of one is left behind)."""
    env = os.environ if env is None else env
    values = {v for k, v in env.items() if is_secret(k) and not k.endswith(FILE_SUFFIX)}
    values.update(_read)
    return sorted((v for v in values if len(v) >= MIN_SECRET_LENGTH), key=len, reverse=True)


class SecretFileError(ValueError):
    """A `_FILE` variable that cannot be used; the message names the variable, never a content."""


def resolve_files(env: Mapping[str, str], wanted: Callable[[str], bool]) -> dict[str, str]:
    """`env` with every `<NAME>_FILE` for which `wanted(NAME)` holds read into `NAME`.

    Contents of files for secret names are remembered for redaction.
    """
    out = dict(env)
    for key, path in env.items():
        if not key.endswith(FILE_SUFFIX) or key == STORAGE_CA:
            continue
        name = key[: -len(FILE_SUFFIX)]
        if not wanted(name):
            continue
        if env.get(name):
            raise SecretFileError(f"{name} and {key} are both set: set one of them")
        try:
            value = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            raise SecretFileError(f"{key}={path!r} cannot be read: {type(e).__name__}") from None
        if is_secret(name) and value not in _read:
            _read.append(value)
        out[name] = value
        del out[key]
    return out


def storage_ca(env: Mapping[str, str]) -> str | None:
    """The CA file for the object store's certificate, if one is configured.

    `AWS_CA_BUNDLE` counts when it names something other than the bundle the
    process trusts already (some machines set it to the system bundle).
    """
    ca = env.get(STORAGE_CA)
    if ca:
        return ca
    aws = env.get("AWS_CA_BUNDLE")
    current = env.get("SSL_CERT_FILE")
    if aws and not (current and Path(current).resolve() == Path(aws).resolve()):
        return aws
    return None


def _system_bundle(env: Mapping[str, str]) -> str | None:
    for candidate in (env.get("SSL_CERT_FILE"), ssl.get_default_verify_paths().openssl_cafile):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def trust_storage_ca(env: MutableMapping[str, str] | None = None) -> str | None:
    """Make this process (and the workers it starts) trust the object store's CA; the bundle path.

    The bundle holds the system's CAs too, since librdkafka and other TLS
    clients in the process read `SSL_CERT_FILE` as well. It is written owner-only
    under the temporary folder, named by its content, so processes share it.
    """
    env = os.environ if env is None else env
    ca = storage_ca(env)
    if ca is None:
        return None
    if env.get("CDC_STORAGE_CA_BUNDLE_FOR") == ca and env.get("SSL_CERT_FILE"):
        return env["SSL_CERT_FILE"]  # done already (a worker process inheriting its parent's)
    try:
        parts = []
        system = _system_bundle(env)
        if system is not None and Path(system).resolve() != Path(ca).resolve():
            parts.append(Path(system).read_bytes())
        parts.append(Path(ca).read_bytes())
    except OSError as e:
        raise SecretFileError(f"{STORAGE_CA}={ca!r} cannot be read: {type(e).__name__}") from None
    content = b"\n".join(parts)
    bundle = (
        Path(tempfile.gettempdir()) / f"cdc-ca-{os.getuid()}-{hashlib.sha256(content).hexdigest()[:16]}.pem"
    )
    if not bundle.exists():
        fd, tmp = tempfile.mkstemp(prefix="cdc-ca-", suffix=".tmp")  # 0600
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.replace(tmp, bundle)
    env["SSL_CERT_FILE"] = str(bundle)
    env["CDC_STORAGE_CA_BUNDLE_FOR"] = ca
    return str(bundle)
