"""The DLQ writer against the real broker: confirmed delivery, fallback file, rate limit."""

from __future__ import annotations

import pytest

from dataflow.dlq.writer import DLQConfig, DLQWriter, FallbackFile, RateLimiter
from dataflow.model import DeadLetter, Reason
from tests.harness import read_topic


def letters(n: int, topic: str = "src", start: int = 0) -> list[DeadLetter]:
    reasons = list(Reason)
    return [
        DeadLetter(
            reason=reasons[i % len(reasons)],
            error=f"error {i}",
            key=f'{{"id": "{i}"}}'.encode(),
            value=bytes([i % 256, 0xFF, 0x00]) + f"payload {i}".encode(),
            topic=topic,
            partition=i % 3,
            offset=i,
            metadata={"table": "db.c"},
        )
        for i in range(start, start + n)
    ]


def test_dead_letter_json_keeps_original_bytes() -> None:
    for r in letters(20):
        back = DeadLetter.from_json(r.to_json())
        assert back == r
    assert (
        DeadLetter.from_json(DeadLetter(Reason.CORRUPTED_DATA, "x", None, None, "t", 0, 1).to_json()).value
        is None
    )


def test_rate_limiter_refills_with_time() -> None:
    now = [0.0]
    limiter = RateLimiter(60, clock=lambda: now[0])
    assert sum(limiter.take() for _ in range(100)) == 60
    now[0] += 10  # 10 seconds at 1 a second
    assert sum(limiter.take() for _ in range(100)) == 10


@pytest.mark.integration
def test_records_are_confirmed_on_the_topic(kafka, tmp_path) -> None:
    topic = kafka.topic("dlq", partitions=1)
    writer = DLQWriter(DLQConfig(kafka.bootstrap, topic, str(tmp_path / "fb.jsonl")))
    sent = letters(300)
    writer.write(sent)
    msgs = read_topic(kafka.bootstrap, topic, len(sent))
    assert len(msgs) == len(sent)
    got = {(m.key(), DeadLetter.from_json(m.value()).source_id): m for m in msgs}
    for r in sent:
        m = got[(r.key, r.source_id)]
        assert DeadLetter.from_json(m.value()) == r
        headers = dict(m.headers())
        assert headers["dlq.reason"] == str(r.reason).encode()
        assert headers["dlq.source.offset"] == str(r.offset).encode()
    assert not (tmp_path / "fb.jsonl").exists()


@pytest.mark.integration
def test_rate_limit_sends_the_excess_to_the_file(kafka, tmp_path) -> None:
    topic = kafka.topic("dlq-rate", partitions=1)
    fallback = tmp_path / "fb.jsonl"
    writer = DLQWriter(DLQConfig(kafka.bootstrap, topic, str(fallback), rate_per_minute=100))
    sent = letters(250)
    writer.write(sent)
    on_topic = [DeadLetter.from_json(m.value()) for m in read_topic(kafka.bootstrap, topic, 100)]
    in_file = list(FallbackFile(fallback).read())
    assert len(on_topic) == 100 and len(in_file) == 150
    assert sorted(r.offset for r in on_topic + in_file) == [r.offset for r in sent]


@pytest.mark.integration
def test_broker_down_sends_everything_to_the_fallback_file(own_kafka, tmp_path) -> None:
    topic = own_kafka.topic("dlq-down", partitions=2)
    fallback = tmp_path / "fb.jsonl"
    writer = DLQWriter(DLQConfig(own_kafka.bootstrap, topic, str(fallback), delivery_timeout_s=3))
    first = letters(50)
    writer.write(first)
    own_kafka.server.stop()
    during = letters(200, start=50)
    writer.write(during[:100])  # waits out the delivery timeout, then falls back
    writer.write(during[100:])  # the topic is known to be down: straight to the file
    in_file = list(FallbackFile(fallback).read())
    assert sorted(r.offset for r in in_file) == [r.offset for r in during]
    assert all(a == b for a, b in zip(sorted(in_file, key=lambda r: r.offset), during, strict=True))
    own_kafka.server.start()
    on_topic = [DeadLetter.from_json(m.value()) for m in read_topic(own_kafka.bootstrap, topic, len(first))]
    assert sorted(r.offset for r in on_topic) == [r.offset for r in first]
