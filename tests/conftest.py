"""Fixtures that give tests a real Kafka broker and a real MinIO server on 127.0.0.1.

If `CDC_KAFKA_BROKERS` (or `AWS_ENDPOINT_URL` with credentials) already point at
running services, for instance after `make services`, those are used; otherwise
the session starts its own and stops them at the end.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services import admin
from services.kafka import Kafka
from services.minio import MinIO
from services.process import http_ok, port_open

S3_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class KafkaService:
    bootstrap: str
    server: Kafka | None = None

    def topic(self, prefix: str = "t", partitions: int = 4) -> str:
        """A new, empty topic with a unique name."""
        name = unique(prefix)
        admin.create_topics(self.bootstrap, [name], partitions)
        return name

    def create_topics(self, names: list[str], partitions: int = 4) -> None:
        admin.create_topics(self.bootstrap, names, partitions)


@dataclass
class S3Service:
    env: dict[str, str]
    server: MinIO | None = None
    buckets: list[str] = field(default_factory=list)

    @property
    def storage_options(self) -> dict[str, str]:
        return dict(self.env)

    def bucket(self, prefix: str = "lake") -> str:
        """A new, empty bucket with a unique name."""
        name = unique(prefix)
        admin.create_bucket(self.env, name)
        return name

    def client(self):
        return admin.s3_client(self.env)


def _running_kafka() -> str | None:
    brokers = os.environ.get("CDC_KAFKA_BROKERS")
    if not brokers:
        return None
    host, _, port = brokers.split(",")[0].rpartition(":")
    return brokers if port_open(int(port), host or "127.0.0.1") else None


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaService]:
    if brokers := _running_kafka():
        yield KafkaService(brokers)
        return
    server = Kafka(tmp_path_factory.mktemp("kafka"))
    server.start()
    try:
        yield KafkaService(server.bootstrap, server)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Service]:
    if all(os.environ.get(v) for v in S3_VARS):
        env = {v: os.environ[v] for v in S3_VARS}
        env["AWS_REGION"] = os.environ.get("AWS_REGION", "us-east-1")
        env["AWS_ALLOW_HTTP"] = "true"
        if http_ok(env["AWS_ENDPOINT_URL"].rstrip("/") + "/minio/health/live"):
            yield S3Service(env)
            return
    server = MinIO(tmp_path_factory.mktemp("minio") / "data")
    server.start()
    try:
        yield S3Service(server.env(), server)
    finally:
        server.stop()


@pytest.fixture
def own_kafka(tmp_path: Path) -> Iterator[KafkaService]:
    """A broker of this test's own, which the test may stop and start."""
    server = Kafka(tmp_path / "kafka")
    server.start()
    try:
        yield KafkaService(server.bootstrap, server)
    finally:
        server.stop()


@pytest.fixture
def own_s3(tmp_path: Path) -> Iterator[S3Service]:
    """A MinIO of this test's own, which the test may stop and start."""
    server = MinIO(tmp_path / "minio-data")
    server.start()
    try:
        yield S3Service(server.env(), server)
    finally:
        server.stop()


SERVICES = {"kafka", "s3", "own_kafka", "own_s3"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that starts or uses Kafka or MinIO must say so, so `-m "not integration"` stays hermetic."""
    unmarked = [
        item.nodeid
        for item in items
        if SERVICES & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("integration")
    ]
    if unmarked:
        raise pytest.UsageError("mark these integration (they use a real service): " + ", ".join(unmarked))
