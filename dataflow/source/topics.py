"""Broker-side look-ups: creating topics, resolving a topic pattern, end offsets."""

from __future__ import annotations

import re
from collections.abc import Iterable

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from dataflow.runtime.failures import ConfigError


def create_topics(brokers: str, names: Iterable[str], partitions: int = 4, **config: str) -> None:
    """Create topics (idempotent) and wait until the broker has them."""
    admin = AdminClient({"bootstrap.servers": brokers, **config})
    futures = admin.create_topics([NewTopic(n, partitions, 1) for n in names], operation_timeout=30)
    for name, fut in futures.items():
        try:
            fut.result(timeout=60)
        except KafkaException as e:
            if e.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise RuntimeError(f"cannot create topic {name}: {e}") from e


def match_topics(brokers: str, pattern: str, timeout: float = 30, **config: str) -> list[str]:
    """Topics on the broker whose whole name matches `pattern` (internal topics excluded)."""
    regex = re.compile(pattern)
    md = AdminClient({"bootstrap.servers": brokers, **config}).list_topics(timeout=timeout)
    return sorted(t for t in md.topics if not t.startswith("__") and regex.fullmatch(t))


def partitions_of(brokers: str, topics: Iterable[str], timeout: float = 30, **config: str) -> dict[str, int]:
    md = AdminClient({"bootstrap.servers": brokers, **config}).list_topics(timeout=timeout)
    out = {}
    for t in topics:
        if t not in md.topics or md.topics[t].error is not None:
            raise ConfigError(f"topic {t!r} does not exist on {brokers}")
        out[t] = len(md.topics[t].partitions)
    return out


def end_offsets(
    brokers: str, topics: Iterable[str], timeout: float = 30, **config: str
) -> dict[tuple[str, int], int]:
    """High watermark (the offset the next message will get) of every partition."""
    counts = partitions_of(brokers, topics, timeout, **config)
    consumer = Consumer({"bootstrap.servers": brokers, "group.id": "cdc-offsets", **config})
    try:
        out = {}
        for t, n in counts.items():
            for p in range(n):
                _, high = consumer.get_watermark_offsets(TopicPartition(t, p), timeout=timeout)
                out[(t, p)] = high
        return out
    finally:
        consumer.close()
