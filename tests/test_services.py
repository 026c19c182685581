"""The real services the other tests build on: Kafka through Bytewax, Delta on MinIO, restarts."""

from __future__ import annotations

import collections

import pyarrow as pa
import pytest
from bytewax import operators as op
from bytewax.connectors.kafka import KafkaSource
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, run_main
from confluent_kafka import Producer
from deltalake import DeltaTable, write_deltalake

from tests.harness import read_topic

pytestmark = pytest.mark.integration


def produce(bootstrap: str, topic: str, n: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True})
    for i in range(n):
        producer.produce(topic, key=str(i).encode(), value=f"message-{i}".encode())
        if i % 10_000 == 0:
            producer.poll(0)
    assert producer.flush(60) == 0


def test_bytewax_reads_every_kafka_message_once(kafka) -> None:
    n = 100_000
    topic = kafka.topic("read-once", partitions=4)
    produce(kafka.bootstrap, topic, n)

    out: list[tuple[int, int, bytes]] = []
    flow = Dataflow("read_once")
    msgs = op.input("in", flow, KafkaSource([kafka.bootstrap], [topic], tail=False))
    op.output("out", op.map("fields", msgs, lambda m: (m.partition, m.offset, m.value)), TestingSink(out))
    run_main(flow)

    assert len(out) == n
    values = collections.Counter(v for _, _, v in out)
    assert set(values) == {f"message-{i}".encode() for i in range(n)}
    assert max(values.values()) == 1
    assert {p for p, _, _ in out} == {0, 1, 2, 3}


def test_delta_table_round_trip_on_minio(s3) -> None:
    bucket = s3.bucket("roundtrip")
    uri = f"s3://{bucket}/db/people"
    data = pa.table({"_id": [f"id{i}" for i in range(1000)], "n": list(range(1000))})
    write_deltalake(uri, data, storage_options=s3.storage_options)
    write_deltalake(uri, data.slice(0, 10), mode="append", storage_options=s3.storage_options)

    table = DeltaTable(uri, storage_options=s3.storage_options)
    assert table.version() == 1
    back = table.to_pyarrow_table().sort_by([("n", "ascending")])
    assert back.num_rows == 1010
    assert sorted(back.column("n").to_pylist()) == sorted(list(range(1000)) + list(range(10)))
    # The objects really are in the bucket.
    names = [o.object_name for o in s3.client().list_objects(bucket, prefix="db/people/", recursive=True)]
    assert any(n.startswith("db/people/_delta_log/") for n in names)
    assert any(n.endswith(".parquet") for n in names)


def test_minio_restart_keeps_the_table(own_s3) -> None:
    bucket = own_s3.bucket("restart")
    uri = f"s3://{bucket}/t"
    write_deltalake(uri, pa.table({"x": [1, 2, 3]}), storage_options=own_s3.storage_options)
    own_s3.server.stop()
    assert not own_s3.server.ready()
    with pytest.raises(OSError):
        DeltaTable(uri, storage_options={**own_s3.storage_options, "timeout": "3s"})
    own_s3.server.start()
    table = DeltaTable(uri, storage_options=own_s3.storage_options)
    assert sorted(table.to_pyarrow_table().column("x").to_pylist()) == [1, 2, 3]


def test_kafka_restart_keeps_the_messages(own_kafka) -> None:
    topic = own_kafka.topic("restart", partitions=3)
    produce(own_kafka.bootstrap, topic, 500)
    own_kafka.server.stop()
    assert not own_kafka.server.ready()
    own_kafka.server.start()
    values = [m.value() for m in read_topic(own_kafka.bootstrap, topic, 500, timeout=300)]
    assert sorted(values) == sorted(f"message-{i}".encode() for i in range(500))
