"""Fixtures that give tests a real Kafka broker and a real MinIO server on 127.0.0.1.

If `CDC_KAFKA_BROKERS` (or `AWS_ENDPOINT_URL` with credentials) already point at
running services, for instance after `make services`, those are used; otherwise
the session starts its own and stops them at the end.

`secure_kafka` and `secure_s3` are always the session's own: a broker with a SASL_SSL
listener (SCRAM-SHA-512) and a MinIO on HTTPS, both with certificates from one CA
made for the session (`session_pki`), and random credentials.
"""

from __future__ import annotations

import os
import secrets
import ssl
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dataflow.runtime.settings import kafka_variable
from services import admin, tls
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
    # librdkafka settings every client of this broker needs besides bootstrap.servers (TLS, SASL).
    config: dict[str, str] = field(default_factory=dict, repr=False)

    def topic(self, prefix: str = "t", partitions: int = 4) -> str:
        """A new, empty topic with a unique name."""
        name = unique(prefix)
        self.create_topics([name], partitions)
        return name

    def create_topics(self, names: list[str], partitions: int = 4) -> None:
        admin.create_topics(self.bootstrap, names, partitions, **self.config)

    def client_config(self, **extra: str) -> dict[str, str]:
        """Settings for a confluent-kafka Producer/Consumer/AdminClient of this broker."""
        return {"bootstrap.servers": self.bootstrap, **self.config, **extra}

    @property
    def env(self) -> dict[str, str]:
        """The pipeline's variables for this broker (CDC_KAFKA_BROKERS and CDC_KAFKA_* settings)."""
        return {"CDC_KAFKA_BROKERS": self.bootstrap, **{kafka_variable(k): v for k, v in self.config.items()}}


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


@dataclass(frozen=True)
class SessionPKI:
    """A CA made for the test session and a server certificate for 127.0.0.1 and localhost."""

    server: tls.ServerCert
    system_bundle: Path | None  # the trust store SSL_CERT_FILE named before the session changed it
    bundle: Path  # system_bundle + the CA: SSL_CERT_FILE while the session runs (delta-rs reads it)

    @property
    def ca_file(self) -> Path:
        return self.server.ca_file


@dataclass
class SecureKafkaService(KafkaService):
    """`bootstrap` is the SASL_SSL listener and `config` logs in as `username`."""

    username: str = ""
    password: str = field(default="", repr=False)
    ca_file: Path | None = None


@dataclass
class SecureS3Service(S3Service):
    """`env` is the pipeline user's (HTTPS endpoint, CDC_STORAGE_CA_FILE); it may use only the
    buckets made by bucket() (each gets its own read/write policy). `server.client()` is root."""

    ca_file: Path | None = None

    @property
    def storage_options(self) -> dict[str, str]:
        # CDC_* are the pipeline's variables, not delta-rs options; delta-rs trusts the CA via SSL_CERT_FILE.
        return {k: v for k, v in self.env.items() if not k.startswith("CDC_")}

    def bucket(self, prefix: str = "lake", grant: bool = True) -> str:
        """A new, empty bucket (made by root) that the pipeline user may use unless grant=False."""
        assert self.server is not None
        name = unique(prefix)
        self.server.client().make_bucket(name)
        if grant:
            self.server.grant(self.env["AWS_ACCESS_KEY_ID"], name)
        return name

    def client(self):
        """A minio-py client as the pipeline user, trusting the session CA."""
        assert self.server is not None
        return self.server.client(self.env["AWS_ACCESS_KEY_ID"], self.env["AWS_SECRET_ACCESS_KEY"])


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


def _system_bundle() -> Path | None:
    for candidate in (os.environ.get("SSL_CERT_FILE"), ssl.get_default_verify_paths().cafile):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def session_pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SessionPKI]:
    """The session CA; while it lives, SSL_CERT_FILE names the system bundle plus this CA.

    delta-rs trusts a private CA only through SSL_CERT_FILE (read whenever it builds a
    client); the system bundle stays in, so plain-http and public endpoints behave as before.
    """
    directory = tmp_path_factory.mktemp("pki")
    server = tls.make_pki(directory)
    system = _system_bundle()
    pki = SessionPKI(server, system, tls.bundle_with(server.ca_file, directory / "bundle.pem", system))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSL_CERT_FILE", str(pki.bundle))
        yield pki


@pytest.fixture(scope="session")
def secure_kafka(
    tmp_path_factory: pytest.TempPathFactory, session_pki: SessionPKI
) -> Iterator[SecureKafkaService]:
    """A second broker of the session's own: SASL_SSL (SCRAM-SHA-512) with one user, random password."""
    username, password = "cdc-pipeline", secrets.token_urlsafe(24)
    server = Kafka(
        tmp_path_factory.mktemp("secure-kafka"), tls=session_pki.server, scram_users={username: password}
    )
    server.start()
    try:
        yield SecureKafkaService(
            server.sasl_bootstrap,
            server,
            config=server.client_config(username, password),
            username=username,
            password=password,
            ca_file=session_pki.ca_file,
        )
    finally:
        server.stop()


@pytest.fixture(scope="session")
def secure_s3(tmp_path_factory: pytest.TempPathFactory, session_pki: SessionPKI) -> Iterator[SecureS3Service]:
    """A second MinIO of the session's own, HTTPS only; random root keys, and a pipeline user."""
    server = MinIO(tmp_path_factory.mktemp("secure-minio") / "data", tls=session_pki.server)
    server.start()
    try:
        access_key, secret_key = "cdc-pipeline-" + secrets.token_hex(4), secrets.token_urlsafe(24)
        server.add_user(access_key, secret_key)
        yield SecureS3Service(server.env(access_key, secret_key), server, ca_file=session_pki.ca_file)
    finally:
        server.stop()


SERVICES = {"kafka", "s3", "own_kafka", "own_s3", "secure_kafka", "secure_s3"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that starts or uses Kafka or MinIO must say so, so `-m "not integration"` stays hermetic."""
    unmarked = [
        item.nodeid
        for item in items
        if SERVICES & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("integration")
    ]
    if unmarked:
        raise pytest.UsageError("mark these integration (they use a real service): " + ", ".join(unmarked))
