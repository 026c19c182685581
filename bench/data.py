"""The benchmark's change events: `services.generate.Generator`, fast at a million events.

`Generator.messages()` picks the document to update or delete with
`rng.choice(list(live))`, which copies every live `_id` of the collection each
time: fine for tests, quadratic at a million events (and too slow to keep a
fixed produce rate). `BenchGenerator` keeps the same event mix and document
shapes, with an O(1) pick.

For the latency run, every full document carries `bench_ts_ms`, stamped with
the wall-clock time in milliseconds just before the message is produced (the
messages are generated ahead of time with a placeholder, so generating them
does not compete with the pipeline for the CPU during the measurement).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from services.generate import Generator, Message

STAMP_FIELD = "bench_ts_ms"
PLACEHOLDER = 9_999_999_999_999  # 13 digits, like a millisecond timestamp until 2286
# How the placeholder looks inside the envelope: Extended JSON, inside a JSON string.
_MARK = b'bench_ts_ms\\":{\\"$numberLong\\":\\"9999999999999\\"}'


class _Live(dict):
    """One collection's live documents, whose iteration yields a single key drawn at random.

    `Generator.messages()` only iterates this mapping as `rng.choice(list(live))`,
    which then costs O(1) instead of copying every key, and still picks uniformly.
    """

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self._rng = rng
        self._keys: list[str] = []
        self._pos: dict[str, int] = {}

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self._pos:
            self._pos[key] = len(self._keys)
            self._keys.append(key)
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        i = self._pos.pop(key)
        last = self._keys.pop()
        if i < len(self._keys):
            self._keys[i] = last
            self._pos[last] = i

    def __iter__(self) -> Iterator[str]:
        if self._keys:
            yield self._keys[self._rng.randrange(len(self._keys))]


class BenchGenerator(Generator):
    """`Generator` with an O(1) random pick; `stamped=True` adds a `bench_ts_ms` placeholder to documents."""

    def __init__(self, *, stamped: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.live = {n: _Live(self.rng) for n in self.names}  # type: ignore[assignment]
        self.stamped = stamped

    def _doc(self, collection: str, oid: str) -> dict[str, Any]:
        doc = super()._doc(collection, oid)
        if self.stamped:
            doc[STAMP_FIELD] = PLACEHOLDER
        return doc

    def live_count(self) -> int:
        return sum(len(v) for v in self.live.values())


@dataclass
class DataStats:
    """What was produced: change events (tombstones apart) and message value bytes."""

    events: int = 0
    tombstones: int = 0
    value_bytes: int = 0
    per_topic: dict[str, int] = field(default_factory=dict)
    ops: dict[str, int] = field(default_factory=dict)

    def count(self, messages: Iterable[Message]) -> Iterator[Message]:
        for m in messages:
            if m.value is None:
                self.tombstones += 1
            else:
                self.events += 1
                self.value_bytes += len(m.value)
                self.per_topic[m.topic] = self.per_topic.get(m.topic, 0) + 1
                if m.change is not None:
                    self.ops[m.change.op] = self.ops.get(m.change.op, 0) + 1
            yield m


def produce_data(
    brokers: str, events: int, *, doc_bytes: int, partitions: int
) -> tuple[DataStats, dict[str, Any]]:
    """The benchmarks' change events on their topics (created here), and what was produced.

    The summary is the result records' "data" entry: counts, per topic and op,
    live documents at the end, and the seconds producing took.
    """
    from dataflow.source.topics import create_topics
    from services.generate import produce

    gen = BenchGenerator(prefix="bench", doc_bytes=doc_bytes)
    create_topics(brokers, [*gen.topics, "bench.dlq"], partitions)
    data = DataStats()
    t0 = time.monotonic()
    produce(brokers, data.count(gen.messages(events)))
    seconds = time.monotonic() - t0
    summary = {
        "events": data.events,
        "tombstones": data.tombstones,
        "value_bytes": data.value_bytes,
        "per_topic": data.per_topic,
        "ops": data.ops,
        "live_documents": gen.live_count(),
        "produce_seconds": round(seconds, 2),
    }
    return data, summary  # the generator's documents go with it: hundreds of MB at a million events


def stamp(value: bytes, now_ms: int) -> tuple[bytes, bool]:
    """Replace the placeholder with `now_ms`; False when the message carries no full document."""
    if _MARK not in value:
        return value, False
    return value.replace(_MARK, b'bench_ts_ms\\":{\\"$numberLong\\":\\"%d\\"}' % now_ms, 1), True


@dataclass
class PacedResult:
    sent: int = 0
    stamped: int = 0
    seconds: float = 0.0
    behind_max_s: float = 0.0  # how far the producer fell behind its schedule at worst


def produce_paced(
    brokers: str, messages: list[Message], rate: float, *, deadline_s: float | None = None
) -> PacedResult:
    """Produce `messages` at `rate` events a second (tombstones ride along), stamping each at send time."""
    from confluent_kafka import Producer

    producer = Producer(
        {
            "bootstrap.servers": brokers,
            "enable.idempotence": True,
            "linger.ms": 5,
            "compression.type": "zstd",
        }
    )
    errors: list[str] = []

    def report(err, _msg) -> None:
        if err is not None:
            errors.append(str(err))

    out = PacedResult()
    start = time.monotonic()
    events = 0
    for m in messages:
        if m.value is not None:
            due = start + events / rate
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            else:
                out.behind_max_s = max(out.behind_max_s, now - due)
            events += 1
        value = m.value
        if value is not None:
            value, stamped = stamp(value, time.time_ns() // 1_000_000)
            out.stamped += stamped
        while True:
            try:
                producer.produce(m.topic, key=m.key, value=value, on_delivery=report)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
        out.sent += 1
        if deadline_s is not None and time.monotonic() - start > deadline_s:
            break
    out.seconds = time.monotonic() - start
    remaining = producer.flush(60)
    if remaining or errors:
        raise RuntimeError(f"{remaining} messages unconfirmed, errors: {errors[:3]}")
    return out
