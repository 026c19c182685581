"""Creating topics and buckets on the services, for tests, the demo and benchmarks."""

from __future__ import annotations

from dataflow.lake.storage import s3_client
from dataflow.source.topics import create_topics

__all__ = ["create_topics", "create_bucket", "s3_client"]


def create_bucket(env: dict[str, str], name: str) -> None:
    client = s3_client(env, timeout=30)
    if not client.bucket_exists(name):
        client.make_bucket(name)
