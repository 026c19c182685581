"""Bad input end to end: every bad message reaches the DLQ once, with its reason and its bytes."""

from __future__ import annotations

import collections
import random

import orjson
import pytest
from bytewax import operators as op
from bytewax.connectors.kafka import KafkaSourceMessage
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main

from dataflow.decode.envelopes import Decoder
from dataflow.decode.step import parse_events
from dataflow.dlq.sink import DLQSink
from dataflow.dlq.writer import DLQConfig, FallbackFile
from dataflow.model import Reason
from services.generate import Generator, Message, produce
from tests.harness import pipeline_env, read_dlq, run_pipeline

pytestmark = pytest.mark.integration
MAX_DOC = 20_000


def debezium(payload: dict) -> bytes:
    return orjson.dumps({"schema": {"type": "struct"}, "payload": payload})


def source(collection: str) -> dict:
    return {
        "db": "shop",
        "collection": collection,
        "ts_ms": 1_767_225_600_000,
        "ord": 1,
        "connector": "mongodb",
    }


def bad_message(topic: str, collection: str, i: int) -> tuple[bytes | None, bytes, Reason]:
    """One bad message of kind i % 8, and the reason it must be dead-lettered with."""
    key = orjson.dumps({"id": orjson.dumps({"$oid": f"{i:024x}"}).decode()})
    after_ok = orjson.dumps({"_id": {"$oid": f"{i:024x}"}, "n": i}).decode()
    kinds = [
        (key, b"\xff\xfe\x00 not json at all %d" % i, Reason.CORRUPTED_DATA),
        (key, b'{"payload": {"op": "c", "after": ' + str(i).encode(), Reason.CORRUPTED_DATA),
        (key, orjson.dumps([i, "array, not an envelope"]), Reason.CORRUPTED_DATA),
        (
            key,
            debezium({"op": "x", "after": after_ok, "source": source(collection)}),
            Reason.SCHEMA_VALIDATION_FAILED,
        ),
        (
            None,
            debezium({"op": "c", "after": orjson.dumps({"n": i}).decode(), "source": source(collection)}),
            Reason.SCHEMA_VALIDATION_FAILED,
        ),
        (
            key,
            debezium(
                {
                    "op": "c",
                    "after": orjson.dumps({"_id": {"$oid": "zz"}, "n": i}).decode(),
                    "source": source(collection),
                }
            ),
            Reason.INVALID_BSON,
        ),
        (
            key,
            debezium(
                {
                    "op": "c",
                    "after": orjson.dumps({"_id": {"$oid": f"{i:024x}"}, "pad": "x" * MAX_DOC}).decode(),
                    "source": source(collection),
                }
            ),
            Reason.OVERSIZED_DOCUMENT,
        ),
        (
            key,
            debezium(
                {
                    "op": "u",
                    "after": None,
                    "source": source(collection),
                    # an oplog operator that is not a $set or $unset: nothing to apply it to
                    "patch": orjson.dumps({"$v": 1, "$inc": {"n": i}}).decode(),
                }
            ),
            Reason.UNSUPPORTED_PARTIAL_UPDATE,
        ),
    ]
    return kinds[i % len(kinds)]


def mixed_messages(gen: Generator, n: int, bad_ratio: float, seed: int = 5) -> tuple[list[Message], dict]:
    rng = random.Random(seed)
    good = gen.messages(n)
    out: list[Message] = []
    expected: dict[tuple[str, bytes], Reason] = {}
    for i in range(n):
        if rng.random() < bad_ratio:
            coll = rng.choice(gen.names)
            key, value, reason = bad_message(gen.topic(coll), coll, i)
            out.append(Message(gen.topic(coll), key, value, corrupt=True))
            assert (gen.topic(coll), value) not in expected
            expected[(gen.topic(coll), value)] = reason
        else:
            out.append(next(good))
    return out, expected


def test_every_bad_message_is_on_the_dlq_topic_once_with_its_reason(kafka, s3, tmp_path) -> None:
    gen = Generator(collections=3, prefix=f"bad{tmp_path.name[-6:]}", seed=2, doc_bytes=400)
    messages, expected = mixed_messages(gen, 10_000, 0.05)
    assert set(expected.values()) == {  # every kind is there
        Reason.CORRUPTED_DATA,
        Reason.SCHEMA_VALIDATION_FAILED,
        Reason.INVALID_BSON,
        Reason.OVERSIZED_DOCUMENT,
        Reason.UNSUPPORTED_PARTIAL_UPDATE,
    }
    kafka.create_topics(gen.topics, partitions=3)
    dlq_topic = kafka.topic("dlq", partitions=2)
    produce(kafka.bootstrap, iter(messages))
    bucket = s3.bucket("bad")
    env = pipeline_env(
        CDC_KAFKA_BROKERS=kafka.bootstrap,
        CDC_TOPICS=",".join(gen.topics),
        CDC_LAKE_URI=f"s3://{bucket}/lake",
        CDC_DLQ_TOPIC=dlq_topic,
        CDC_DLQ_FALLBACK=str(tmp_path / "fallback.jsonl"),
        CDC_MAX_DOCUMENT_BYTES=str(MAX_DOC),
        **s3.env,
    )
    run_pipeline(env)
    dead = read_dlq(kafka.bootstrap, dlq_topic, len(expected))
    assert len(dead) == len(expected)
    assert len({d.source_id for d in dead}) == len(dead)  # once each
    for d in dead:
        assert expected[(d.topic, d.value)] == d.reason, d.error
        assert d.error and d.pipeline_version and d.first_failure_ms > 0
    wanted_keys = collections.Counter((m.topic, m.key, m.value) for m in messages if m.corrupt)
    assert collections.Counter((d.topic, d.key, d.value) for d in dead) == wanted_keys
    assert not (tmp_path / "fallback.jsonl").exists()


def test_with_the_broker_down_dead_letters_land_in_the_fallback_file(own_kafka, tmp_path) -> None:
    gen = Generator(collections=2, prefix="down", seed=4, doc_bytes=300)
    messages, expected = mixed_messages(gen, 2_000, 0.1)
    dlq_topic = own_kafka.topic("dlq", partitions=1)
    own_kafka.server.stop()
    offsets: dict[str, int] = collections.Counter()
    inputs = []
    for m in messages:
        inputs.append(KafkaSourceMessage(m.key, m.value, topic=m.topic, partition=0, offset=offsets[m.topic]))
        offsets[m.topic] += 1
    fallback = tmp_path / "fallback.jsonl"
    good: list = []
    flow = Dataflow("dlq_down")
    parsed = parse_events(
        "parse",
        op.input("in", flow, TestingSource(inputs, batch_size=100)),
        decoder=Decoder(max_bytes=MAX_DOC),
    )
    op.output(
        "dlq",
        parsed.dead,
        DLQSink(DLQConfig(own_kafka.bootstrap, dlq_topic, str(fallback), delivery_timeout_s=3)),
    )
    op.output("good", parsed.events, TestingSink(good))
    run_main(flow)

    in_file = list(FallbackFile(fallback).read())
    assert len(in_file) == len(expected)
    assert {(d.topic, d.value): d.reason for d in in_file} == expected
    assert sum(len(c.events) for c in good) + len(in_file) == sum(1 for m in messages if m.value is not None)
