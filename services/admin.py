"""Creating topics and buckets on the services, for tests, the demo and benchmarks."""

from __future__ import annotations

from urllib.parse import urlparse

from dataflow.kafka_admin import create_topics

__all__ = ["create_topics", "create_bucket", "s3_client"]


def s3_client(env: dict[str, str]):
    """A minio-py client from the standard AWS_* variables."""
    from minio import Minio

    url = urlparse(env["AWS_ENDPOINT_URL"])
    return Minio(
        url.netloc,
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
        region=env.get("AWS_REGION", "us-east-1"),
        secure=url.scheme == "https",
    )


def create_bucket(env: dict[str, str], name: str) -> None:
    client = s3_client(env)
    if not client.bucket_exists(name):
        client.make_bucket(name)
