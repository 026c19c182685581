"""The pipeline and the CLI over Kafka SASL_SSL (SCRAM) and HTTPS MinIO, with secrets from files.

The fixtures (tests/conftest.py) make a CA, a broker whose only client listener
is SASL_SSL, and a MinIO serving HTTPS with a bucket-scoped pipeline user. The
pipeline gets the passwords through `<NAME>_FILE` variables and the object
store's CA through CDC_STORAGE_CA_FILE: the session's own trust store is taken
away from it, so only its own settings can make TLS work. No output may hold a
secret.
"""

from __future__ import annotations

import collections
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from services.generate import Generator, produce
from tests.harness import ROOT, Model, assert_exactly_once, cli, pipeline_env, read_dlq

pytestmark = pytest.mark.integration


def _secret_file(path: Path, value: str) -> str:
    path.write_text(value + "\n")
    path.chmod(0o600)
    return str(path)


def secure_env(secure_kafka, secure_s3, session_pki, tmp_path: Path, **overrides: str) -> dict[str, str]:
    kafka = {k: v for k, v in secure_kafka.env.items() if k != "CDC_KAFKA_SASL_PASSWORD"}
    s3 = {k: v for k, v in secure_s3.env.items() if k != "AWS_SECRET_ACCESS_KEY"}
    env = pipeline_env(
        **kafka,
        **s3,
        CDC_KAFKA_SASL_PASSWORD_FILE=_secret_file(tmp_path / "kafka-password", secure_kafka.password),
        AWS_SECRET_ACCESS_KEY_FILE=_secret_file(
            tmp_path / "s3-secret", secure_s3.env["AWS_SECRET_ACCESS_KEY"]
        ),
        CDC_LOG_LEVEL="INFO",
        **overrides,
    )
    # The session's SSL_CERT_FILE trusts the session CA; the pipeline must manage without it.
    env.pop("SSL_CERT_FILE", None)
    env.pop("AWS_CA_BUNDLE", None)
    if session_pki.system_bundle is not None:
        env["SSL_CERT_FILE"] = str(session_pki.system_bundle)
    return env


def _assert_no_secret(secrets: list[str], *outputs: str) -> None:
    for out in outputs:
        for secret in secrets:
            assert secret not in out, "a secret was printed"


def test_50k_events_over_sasl_ssl_and_https_with_secrets_from_files(
    secure_kafka, secure_s3, session_pki, tmp_path
) -> None:
    gen = Generator(
        collections=3, prefix=f"sec{tmp_path.name[-6:]}", seed=12, corrupt_ratio=0.01, doc_bytes=600
    )
    messages = list(gen.messages(50_000))
    secure_kafka.create_topics(gen.topics, partitions=4)
    dlq_topic = secure_kafka.topic("dlq", partitions=1)
    produce(secure_kafka.bootstrap, iter(messages), extra=secure_kafka.config)
    model = Model()
    model.apply(messages)
    bucket = secure_s3.bucket("secure")
    env = secure_env(
        secure_kafka,
        secure_s3,
        session_pki,
        tmp_path,
        CDC_TOPICS=",".join(gen.topics),
        CDC_LAKE_URI=f"s3://{bucket}/lake",
        CDC_TABLE_MODE="merge",
        CDC_DLQ_TOPIC=dlq_topic,
        CDC_DLQ_FALLBACK=str(tmp_path / "fallback.jsonl"),
        CDC_BATCH_MAX_ROWS="5000",
        CDC_BATCH_MAX_SECONDS="2",
        CDC_RECOVERY_DIR=str(tmp_path / "recovery"),
    )
    secrets = [secure_kafka.password, secure_s3.env["AWS_SECRET_ACCESS_KEY"]]
    proc = subprocess.run(
        [sys.executable, "-m", "dataflow"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    _assert_no_secret(secrets, proc.stdout, proc.stderr)

    assert_exactly_once(model, gen, bucket, secure_s3.storage_options)
    corrupt = collections.Counter((m.topic, m.value) for m in messages if m.corrupt)
    dead = read_dlq(secure_kafka.bootstrap, dlq_topic, sum(corrupt.values()), config=secure_kafka.config)
    assert collections.Counter((d.topic, d.value) for d in dead) == corrupt
    assert not (tmp_path / "fallback.jsonl").exists()  # every dead letter reached the topic

    # The recovery store holds pickles and documents: only its owner may read or write it.
    store = tmp_path / "recovery"
    assert store.stat().st_mode & 0o777 == 0o700
    files = [f for f in store.iterdir() if f.is_file()]
    assert files and all(f.stat().st_mode & 0o077 == 0 for f in files)

    # The CLI over the same connections.
    status = orjson.loads(cli(env, "status", "--json").stdout)
    assert {t["table"].rsplit("/", 1)[1] for t in status if "/_changelog/" not in t["table"]} == set(
        model.tables
    )
    assert all(o["lag"] is not None for t in status for o in t["offsets"])
    by_pattern = {k: v for k, v in env.items() if k != "CDC_TOPICS"}
    by_pattern["CDC_TOPIC_PATTERN"] = re.escape(gen.prefix) + r"\..*"
    assert orjson.loads(cli(by_pattern, "status", "--json").stdout) == status  # the pattern over SASL_SSL too
    inspect = cli(env, "dlq", "inspect", "--json", "--all")
    assert len(inspect.stdout.splitlines()) == sum(corrupt.values())
    replay = cli(env, "dlq", "replay")  # corrupt records would fail again: none is sent
    assert "replayed 0" in replay.stdout, replay.stdout
    _assert_no_secret(
        secrets, status.__repr__(), inspect.stderr, replay.stdout, replay.stderr, cli(env, "status").stdout
    )


@pytest.mark.parametrize("wrong", ["password", "ca"])
def test_a_wrong_password_or_ca_fails_at_start_with_a_clear_message_and_no_secret(
    secure_kafka, secure_s3, session_pki, tmp_path, wrong: str
) -> None:
    topic = secure_kafka.topic("wrong", partitions=1)
    bucket = secure_s3.bucket("wrong")
    planted = "planted-Wr0ng-pa55word-" + tmp_path.name[-6:]
    env = secure_env(
        secure_kafka,
        secure_s3,
        session_pki,
        tmp_path,
        CDC_TOPICS=topic,
        CDC_LAKE_URI=f"s3://{bucket}/lake",
        CDC_RECOVERY_DIR="off",
        CDC_KAFKA_SSL_KEYSTORE_PASSWORD="planted-keystore-secret-77",
    )
    if wrong == "password":
        env["CDC_KAFKA_SASL_PASSWORD_FILE"] = _secret_file(tmp_path / "wrong-password", planted)
        expected = "Authentication failed"
    else:
        env["CDC_KAFKA_SSL_CA_LOCATION"] = str(session_pki.system_bundle or "/dev/null")
        expected = "certificate verify failed"
    proc = subprocess.run(
        [sys.executable, "-m", "bytewax.run", "dataflow.main:flow"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "refused the connection" in proc.stderr and expected in proc.stderr, proc.stderr[-3000:]
    _assert_no_secret(
        [
            planted,
            "planted-keystore-secret-77",
            secure_kafka.password,
            secure_s3.env["AWS_SECRET_ACCESS_KEY"],
        ],
        proc.stdout,
        proc.stderr,
    )
    status = cli(env, "status", ok=False)
    _assert_no_secret([planted, "planted-keystore-secret-77"], status.stdout, status.stderr)
