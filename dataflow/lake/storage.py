"""The lake's object store, as seen from outside Delta: is it reachable, what files are there."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse


def s3_client(storage_options: dict[str, str], timeout: float = 5.0):
    """A minio-py client built from delta-rs storage options (the AWS_* variables)."""
    import urllib3
    from minio import Minio

    endpoint = urlparse(storage_options.get("AWS_ENDPOINT_URL", "https://s3.amazonaws.com"))
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=timeout, read=timeout), retries=urllib3.Retry(total=0)
    )
    return Minio(
        endpoint.netloc,
        access_key=storage_options.get("AWS_ACCESS_KEY_ID"),
        secret_key=storage_options.get("AWS_SECRET_ACCESS_KEY"),
        session_token=storage_options.get("AWS_SESSION_TOKEN"),
        region=storage_options.get("AWS_REGION"),
        secure=endpoint.scheme == "https",
        http_client=http,
    )


def health_probe(lake_uri: str, storage_options: dict[str, str] | None) -> Callable[[], bool]:
    """A cheap check that the lake's bucket (or folder) answers, for the circuit breaker."""
    if lake_uri.startswith(("s3://", "s3a://")):
        bucket = urlparse(lake_uri).netloc
        client = s3_client(storage_options or {})
        return lambda: client.bucket_exists(bucket)
    root = Path(lake_uri)
    return lambda: root.exists() or root.parent.exists()


@dataclass(frozen=True, slots=True)
class StoredFile:
    """One object under a table: its size and when it was last written (seconds since the epoch)."""

    size: int
    modified: float


def list_files(
    uri: str, storage_options: dict[str, str] | None = None, under: str = ""
) -> dict[str, StoredFile]:
    """Every file below a table's root (or its folder `under`), by path relative to the root.

    delta-rs reports neither the size of what vacuum deletes nor the files of
    its log, so maintenance lists the store itself, before and after.
    """
    if uri.startswith(("s3://", "s3a://")):
        url = urlparse(uri)
        client = s3_client(storage_options or {}, timeout=30)
        root = url.path.strip("/") + "/"
        prefix = root + under.strip("/") + "/" if under else root
        return {
            o.object_name[len(root) :]: StoredFile(int(o.size or 0), o.last_modified.timestamp())
            for o in client.list_objects(url.netloc, prefix=prefix, recursive=True)
            if not o.is_dir
        }
    base = Path(uri[len("file://") :] if uri.startswith("file://") else uri)
    top = base / under if under else base
    out = {}
    for path in top.rglob("*"):
        if path.is_file():
            st = path.stat()
            out[path.relative_to(base).as_posix()] = StoredFile(st.st_size, st.st_mtime)
    return out
