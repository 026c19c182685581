"""The secured services the fixtures start: Kafka over SASL_SSL (SCRAM-SHA-512) and MinIO over HTTPS."""

from __future__ import annotations

import io
import time

import pyarrow as pa
import pytest
from confluent_kafka import Consumer, KafkaError, Producer
from deltalake import DeltaTable, write_deltalake
from minio.error import S3Error

pytestmark = pytest.mark.integration


def first_error(config: dict, timeout: float = 10.0) -> tuple[KafkaError | None, float]:
    """The first error librdkafka reports through error_cb for a client of `config`, and when.

    A metadata request (list_topics) only fails with a generic transport error when its own
    timeout runs out; error_cb hears the reason as soon as the connection fails.
    """
    errors: list[KafkaError] = []
    producer = Producer({**config, "error_cb": errors.append, "log_level": 0})
    start = time.monotonic()
    while not errors and time.monotonic() - start < timeout:
        producer.poll(0.1)
    return (errors[0] if errors else None), time.monotonic() - start


def test_produce_and_consume_over_sasl_ssl(secure_kafka) -> None:
    assert secure_kafka.config["security.protocol"] == "SASL_SSL"
    assert secure_kafka.bootstrap == secure_kafka.server.sasl_bootstrap != secure_kafka.server.bootstrap
    topic = secure_kafka.topic("sasl", partitions=2)

    producer = Producer(secure_kafka.client_config(acks="all"))
    for i in range(20):
        producer.produce(topic, key=str(i).encode(), value=f"secret-{i}".encode())
    assert producer.flush(30) == 0

    consumer = Consumer(secure_kafka.client_config(**{"group.id": "secure", "auto.offset.reset": "earliest"}))
    consumer.subscribe([topic])
    got: list[bytes] = []
    deadline = time.monotonic() + 60
    try:
        while len(got) < 20 and time.monotonic() < deadline:
            msg = consumer.poll(1)
            if msg is not None:
                assert msg.error() is None, msg.error()
                got.append(msg.value())
    finally:
        consumer.close()
    assert sorted(got) == sorted(f"secret-{i}".encode() for i in range(20))


def test_pipeline_variables_for_the_secure_broker(secure_kafka) -> None:
    env = secure_kafka.env
    assert env["CDC_KAFKA_BROKERS"] == secure_kafka.bootstrap
    assert env["CDC_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert env["CDC_KAFKA_SASL_MECHANISMS"] == "SCRAM-SHA-512"
    assert env["CDC_KAFKA_SASL_USERNAME"] == secure_kafka.username
    assert env["CDC_KAFKA_SASL_PASSWORD"] == secure_kafka.password
    assert env["CDC_KAFKA_SSL_CA_LOCATION"] == str(secure_kafka.ca_file)


def test_wrong_password_is_an_authentication_error(secure_kafka) -> None:
    err, seconds = first_error(secure_kafka.client_config(**{"sasl.password": secure_kafka.password + "x"}))
    assert err is not None, "no error reported within 10 s"
    assert err.code() == KafkaError._AUTHENTICATION, err
    assert seconds < 10


def test_client_without_the_ca_fails_tls(secure_kafka, session_pki, monkeypatch) -> None:
    # The session points SSL_CERT_FILE at a bundle holding its CA; librdkafka would find it there.
    if session_pki.system_bundle is None:
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    else:
        monkeypatch.setenv("SSL_CERT_FILE", str(session_pki.system_bundle))
    config = secure_kafka.client_config()
    del config["ssl.ca.location"]
    err, _ = first_error(config)
    assert err is not None, "no error reported within 10 s"
    assert err.code() == KafkaError._SSL, err
    assert "certificate verify failed" in err.str()


def test_delta_round_trip_on_tls_minio_as_the_pipeline_user(secure_s3, session_pki) -> None:
    env = secure_s3.env
    assert env["AWS_ENDPOINT_URL"].startswith("https://127.0.0.1:")
    assert env["CDC_STORAGE_CA_FILE"] == str(session_pki.ca_file)
    assert env["AWS_ACCESS_KEY_ID"] != secure_s3.server.access_key
    assert "CDC_STORAGE_CA_FILE" not in secure_s3.storage_options

    bucket = secure_s3.bucket("tls")
    uri = f"s3://{bucket}/db/people"
    data = pa.table({"_id": [f"id{i}" for i in range(100)], "n": list(range(100))})
    write_deltalake(uri, data, storage_options=secure_s3.storage_options)
    back = DeltaTable(uri, storage_options=secure_s3.storage_options).to_pyarrow_table().sort_by("n")
    assert back.equals(data)
    names = [o.object_name for o in secure_s3.client().list_objects(bucket, prefix="db/", recursive=True)]
    assert any(n.startswith("db/people/_delta_log/") for n in names)


def test_delta_rs_without_the_ca_is_refused(secure_s3, session_pki, monkeypatch) -> None:
    bucket = secure_s3.bucket("noca")
    if session_pki.system_bundle is None:
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    else:
        monkeypatch.setenv("SSL_CERT_FILE", str(session_pki.system_bundle))
    with pytest.raises(OSError, match="(?i)certificate|UnknownIssuer"):
        write_deltalake(
            f"s3://{bucket}/t",
            pa.table({"x": [1]}),
            storage_options={**secure_s3.storage_options, "max_retries": "0"},
        )


def test_pipeline_user_is_refused_on_another_bucket(secure_s3) -> None:
    other = secure_s3.bucket("other", grant=False)
    with pytest.raises(OSError, match="403"):
        write_deltalake(f"s3://{other}/t", pa.table({"x": [1]}), storage_options=secure_s3.storage_options)

    client = secure_s3.client()
    with pytest.raises(S3Error) as denied:
        client.put_object(other, "probe", io.BytesIO(b"x"), 1)
    assert denied.value.code == "AccessDenied"
    with pytest.raises(S3Error) as denied:
        client.make_bucket("made-by-the-pipeline-user")
    assert denied.value.code == "AccessDenied"
    # Root wrote nothing there either: the refusal was not a half-written table.
    assert list(secure_s3.server.client().list_objects(other, recursive=True)) == []
