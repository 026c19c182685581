"""A MinIO server built from source with `go install`, on 127.0.0.1."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from services import CACHE
from services.process import free_port, http_ok, spawn, stop_pid, wait_until
from services.tls import ServerCert

# MinIO publishes no semver tags, so the module proxy serves pseudo-versions.
MINIO_MODULE = "github.com/minio/minio"
MINIO_VERSION = "v0.0.0-20260212201848-7aac2a2c5b7c"
BIN_DIR = CACHE / "minio" / MINIO_VERSION
BINARY = BIN_DIR / "minio"


def install() -> Path:
    """Build the pinned MinIO once (several minutes the first time); reuse it after."""
    if BINARY.exists():
        return BINARY
    if shutil.which("go") is None:
        raise RuntimeError("MinIO is built with Go: put `go` on PATH")
    BIN_DIR.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["go", "install", f"{MINIO_MODULE}@{MINIO_VERSION}"],
        check=True,
        env={**os.environ, "GOBIN": str(BIN_DIR), "CGO_ENABLED": "0"},
    )
    return BINARY


def bucket_policy(bucket: str) -> dict:
    """Read, write and list one bucket's objects; nothing else (no other bucket, no bucket admin)."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
                "Resource": [f"arn:aws:s3:::{bucket}"],
            },
            {
                "Effect": "Allow",
                "Action": [
                    "s3:GetObject",
                    "s3:PutObject",
                    "s3:DeleteObject",
                    "s3:AbortMultipartUpload",
                    "s3:ListMultipartUploadParts",
                ],
                "Resource": [f"arn:aws:s3:::{bucket}/*"],
            },
        ],
    }


@dataclass
class MinIO:
    """One MinIO process; its data folder survives stop() and start().

    With `tls` it serves HTTPS only, with that certificate; clients trust `ca_file`.
    """

    data_dir: Path
    port: int = field(default_factory=free_port)
    console_port: int = field(default_factory=free_port)
    access_key: str = field(default_factory=lambda: "cdc" + secrets.token_hex(6))
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    region: str = "us-east-1"
    pid: int | None = None
    tls: ServerCert | None = None

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path | None:
        return self.tls.ca_file if self.tls else None

    @property
    def certs_dir(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}-certs"

    @property
    def log(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    def env(self, access_key: str | None = None, secret_key: str | None = None) -> dict[str, str]:
        """The standard AWS variables a client (delta-rs, boto, minio-py) needs; root's keys by default.

        With TLS, `CDC_STORAGE_CA_FILE` names the CA for the pipeline (not a delta-rs option).
        """
        env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": access_key or self.access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key or self.secret_key,
            "AWS_REGION": self.region,
        }
        if self.tls is None:
            env["AWS_ALLOW_HTTP"] = "true"
        else:
            env["CDC_STORAGE_CA_FILE"] = str(self.tls.ca_file)
        return env

    def _write_certs(self) -> list[str]:
        if self.tls is None:
            return []
        self.certs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.certs_dir / "public.crt").write_text(self.tls.cert.read_text())
        key = self.certs_dir / "private.key"  # MinIO reads exactly these two names
        key.touch(mode=0o600, exist_ok=True)
        key.chmod(0o600)
        key.write_text(self.tls.key.read_text())
        return ["--certs-dir", str(self.certs_dir)]

    def start(self, timeout: float = 60.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        certs = self._write_certs()
        proc = spawn(
            [
                str(install()),
                "server",
                str(self.data_dir),
                "--quiet",
                "--address",
                f"127.0.0.1:{self.port}",
                "--console-address",
                f"127.0.0.1:{self.console_port}",
                *certs,
            ],
            log=self.log,
            env={
                "MINIO_ROOT_USER": self.access_key,
                "MINIO_ROOT_PASSWORD": self.secret_key,
                "MINIO_REGION": self.region,
                "MINIO_BROWSER": "off",
                "MINIO_UPDATE": "off",
            },
        )
        self.pid = proc.pid
        wait_until(self.ready, timeout=timeout, what="MinIO", proc=proc, log=self.log)

    def ready(self) -> bool:
        return http_ok(f"{self.endpoint}/minio/health/live", cafile=self.ca_file)

    def _http(self, timeout: float):
        import urllib3

        return urllib3.PoolManager(
            ca_certs=str(self.ca_file) if self.tls else None,
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
            retries=urllib3.Retry(total=0),
        )

    def client(self, access_key: str | None = None, secret_key: str | None = None, timeout: float = 30.0):
        """A minio-py client (root by default) that trusts this server's CA."""
        from minio import Minio

        return Minio(
            f"127.0.0.1:{self.port}",
            access_key=access_key or self.access_key,
            secret_key=secret_key or self.secret_key,
            region=self.region,
            secure=self.tls is not None,
            http_client=self._http(timeout),
        )

    def admin(self, timeout: float = 30.0):
        from minio.credentials import StaticProvider
        from minio.minioadmin import MinioAdmin

        return MinioAdmin(
            endpoint=f"127.0.0.1:{self.port}",
            credentials=StaticProvider(self.access_key, self.secret_key),
            region=self.region,
            secure=self.tls is not None,
            http_client=self._http(timeout),
        )

    def add_user(self, access_key: str, secret_key: str, buckets: list[str] | tuple[str, ...] = ()) -> None:
        """A user who may use only `buckets` (see bucket_policy); grant more with grant()."""
        self.admin().user_add(access_key, secret_key)
        for bucket in buckets:
            self.grant(access_key, bucket)

    def grant(self, access_key: str, bucket: str) -> None:
        """Attach a policy for `bucket` (which need not exist yet) to the user."""
        admin = self.admin()
        name = f"rw-{bucket}"
        admin.policy_add(name, policy=bucket_policy(bucket))
        admin.attach_policy([name], user=access_key)

    def stop(self) -> None:
        if self.pid is not None:
            stop_pid(self.pid, timeout=30)
            self.pid = None
