"""Broker-side look-ups: creating topics, resolving a topic pattern, end offsets."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
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


def _refusal(err: KafkaError) -> bool:
    """A broker refusing these credentials or this CA: configuration, never worth waiting for."""
    if err.code() in (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED):
        return True
    return err.code() == KafkaError._SSL and "certificate verify failed" in err.str()


def metadata(brokers: str, timeout: float = 30, **config: str) -> Any:
    """The cluster's metadata; a refused login or certificate is a ConfigError at once.

    librdkafka's `list_topics` only says "transport failure" after its whole
    timeout; the real reason reaches the error callback within a second.
    """
    refused: list[KafkaError] = []
    admin = AdminClient({"bootstrap.servers": brokers, **config, "error_cb": refused.append})
    deadline = time.monotonic() + timeout
    while True:
        try:
            return admin.list_topics(timeout=max(0.1, min(2.0, deadline - time.monotonic())))
        except KafkaException:
            admin.poll(0)
            bad = [e for e in refused if _refusal(e)]
            if bad:
                raise ConfigError(
                    f"Kafka at {brokers} refused the connection: {bad[0].str()} (check the CDC_KAFKA_SASL_* "
                    "credentials, CDC_KAFKA_SECURITY_PROTOCOL and CDC_KAFKA_SSL_CA_LOCATION)"
                ) from None
            if time.monotonic() >= deadline:
                raise


def match_topics(brokers: str, pattern: str, timeout: float = 30, **config: str) -> list[str]:
    """Topics on the broker whose whole name matches `pattern` (internal topics excluded)."""
    regex = re.compile(pattern)
    md = metadata(brokers, timeout, **config)
    return sorted(t for t in md.topics if not t.startswith("__") and regex.fullmatch(t))


def partitions_of(brokers: str, topics: Iterable[str], timeout: float = 30, **config: str) -> dict[str, int]:
    md = metadata(brokers, timeout, **config)
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
