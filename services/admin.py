"""Creating topics and buckets on the services, for tests, the demo and benchmarks."""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlparse

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic


def create_topics(bootstrap: str, names: Iterable[str], partitions: int = 4) -> None:
    """Create topics (idempotent) and wait until the broker has them."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(n, partitions, 1) for n in names], operation_timeout=30)
    for name, fut in futures.items():
        try:
            fut.result(timeout=60)
        except KafkaException as e:
            if e.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise RuntimeError(f"cannot create topic {name}: {e}") from e


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
