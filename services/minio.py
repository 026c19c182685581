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


@dataclass
class MinIO:
    """One MinIO process; its data folder survives stop() and start()."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    console_port: int = field(default_factory=free_port)
    access_key: str = field(default_factory=lambda: "cdc" + secrets.token_hex(6))
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    region: str = "us-east-1"
    pid: int | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    def env(self) -> dict[str, str]:
        """The standard AWS variables a client (delta-rs, boto, minio-py) needs."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_ALLOW_HTTP": "true",
        }

    def start(self, timeout: float = 60.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
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
        return http_ok(f"{self.endpoint}/minio/health/live")

    def stop(self) -> None:
        if self.pid is not None:
            stop_pid(self.pid, timeout=30)
            self.pid = None
