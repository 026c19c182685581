"""The dead-letter queue: a Kafka topic with confirmed delivery, and a local file fallback.

Bytewax's `KafkaSink` produces and flushes without looking at delivery reports,
so a broker outage would lose dead letters silently. This sink waits for each
record's report; whatever the topic does not confirm, and whatever exceeds the
rate limit, is appended to a JSONL file and fsync'd before `write_batch`
returns. Delivery is at least once: a record can reach both the topic and the
file when a confirmation arrives late, and replay is idempotent for that reason.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import KafkaError, Producer

from dataflow.model import DeadLetter
from dataflow.runtime.metrics import DLQ_EVENTS, DLQ_FALLBACK_WRITES

log = logging.getLogger(__name__)

DEFAULT_TOPIC = "cdc.dead_letter_queue"


class RateLimiter:
    """Token bucket: at most `per_minute` records a minute, with bursts up to the same size."""

    def __init__(self, per_minute: int, clock=time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.tokens = float(per_minute)
        self.rate = per_minute / 60.0
        self.clock = clock
        self.last = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class FallbackFile:
    """Appends dead letters as JSON lines and fsyncs them: the last resort must be durable."""

    _lock = threading.Lock()

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def append(self, records: Iterable[DeadLetter], cause: str) -> int:
        lines = [r.to_json() + b"\n" for r in records]
        if not lines:
            return 0
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, b"".join(lines))  # one write: lines of concurrent writers do not interleave
                os.fsync(fd)
            finally:
                os.close(fd)
        DLQ_FALLBACK_WRITES.labels(cause).inc(len(lines))
        return len(lines)

    def read(self) -> Iterator[DeadLetter]:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            for line in f:
                if line.strip():
                    yield DeadLetter.from_json(line)


def dlq_headers(r: DeadLetter) -> list[tuple[str, bytes]]:
    return [
        ("dlq.reason", str(r.reason).encode()),
        ("dlq.error", r.error[:1000].encode("utf-8", "replace")),
        ("dlq.source.topic", r.topic.encode()),
        ("dlq.source.partition", str(r.partition).encode()),
        ("dlq.source.offset", str(r.offset).encode()),
        ("dlq.retry_count", str(r.retry_count).encode()),
    ]


@dataclass
class DLQConfig:
    brokers: str | None
    topic: str = DEFAULT_TOPIC
    fallback_path: str = "./data/dlq/fallback.jsonl"
    rate_per_minute: int = 10_000
    delivery_timeout_s: float = 15.0
    # After the topic fails, send straight to the file for this long instead of
    # stalling every batch for a full delivery timeout while the broker is down.
    outage_backoff_s: float = 30.0
    producer_config: dict[str, str] = field(default_factory=dict, repr=False)  # CDC_KAFKA_* (TLS, SASL)


class DLQWriter:
    """Delivers dead letters to the DLQ topic with confirmation, else to the fallback file."""

    def __init__(self, config: DLQConfig) -> None:
        self.config = config
        self.fallback = FallbackFile(config.fallback_path)
        self.limiter = RateLimiter(config.rate_per_minute)
        self.skip_topic_until = 0.0
        self.counts: collections.Counter[str] = collections.Counter()
        self.producer: Producer | None = None
        if config.brokers:
            timeout_ms = int(config.delivery_timeout_s * 1000)
            self.producer = Producer(
                {
                    "bootstrap.servers": config.brokers,
                    "enable.idempotence": True,
                    "acks": "all",
                    "linger.ms": 5,
                    "message.timeout.ms": timeout_ms,
                    "message.max.bytes": 33554432,
                    "compression.type": "zstd",
                    **config.producer_config,
                }
            )

    def write(self, records: list[DeadLetter]) -> None:
        """Returns only when every record is confirmed by the topic or durable in the file."""
        for r in records:
            DLQ_EVENTS.labels(str(r.reason)).inc()
            self.counts[str(r.reason)] += 1
            log.warning(
                "dead letter %s from %s:%s@%s: %s",
                r.reason,
                r.topic,
                r.partition,
                r.offset,
                r.error[:300],
                extra={
                    "reason": str(r.reason),
                    "topic": r.topic,
                    "partition": r.partition,
                    "offset": r.offset,
                    "table": r.metadata.get("table"),
                },
            )
        to_topic: list[DeadLetter] = []
        over_limit: list[DeadLetter] = []
        for r in records:
            (to_topic if self.limiter.take() else over_limit).append(r)
        if over_limit:
            log.warning("DLQ rate limit reached: %d records to the fallback file", len(over_limit))
            self.fallback.append(over_limit, "rate_limited")
        if not to_topic:
            return
        if self.producer is None:
            self.fallback.append(to_topic, "no_broker")
            return
        if time.monotonic() < self.skip_topic_until:
            self.fallback.append(to_topic, "topic_unavailable")
            return
        failed = self._produce(to_topic)
        if failed:
            self.skip_topic_until = time.monotonic() + self.config.outage_backoff_s
            log.error(
                "DLQ topic did not confirm %d records; writing them to %s", len(failed), self.fallback.path
            )
            self.fallback.append(failed, "delivery_failed")

    def _produce(self, records: list[DeadLetter]) -> list[DeadLetter]:
        assert self.producer is not None
        status: dict[int, KafkaError | None] = {}

        def report(i: int):
            def on_delivery(err, _msg) -> None:
                status[i] = err

            return on_delivery

        unsent: list[int] = []
        for i, r in enumerate(records):
            try:
                self.producer.produce(
                    self.config.topic,
                    key=r.key,
                    value=r.to_json(),
                    headers=dlq_headers(r),
                    on_delivery=report(i),
                )
            except Exception as e:  # queue full or invalid: fall back, never drop
                log.warning("DLQ produce refused a record: %s", e)
                unsent.append(i)
            self.producer.poll(0)
        self.producer.flush(self.config.delivery_timeout_s + 5)
        if len(status) + len(unsent) < len(records):
            # Still queued after the timeout: purge so their reports arrive now, as failures.
            self.producer.purge()
            self.producer.flush(5)
        return [r for i, r in enumerate(records) if status.get(i, "missing") is not None]

    def close(self) -> None:
        if self.producer is not None:
            self.producer.flush(self.config.delivery_timeout_s)
