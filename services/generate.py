"""Realistic Debezium MongoDB change events, for tests, the demo and benchmarks.

`python -m services.generate --brokers HOST:PORT --docs 10000 --collections 3`
produces to one topic per collection (`<prefix>.<db>.<collection>`), keyed by
`_id` as Debezium does, with a tombstone after every delete. Each message also
carries the logical change it encodes, so a test can build its own model of the
collections without going through the pipeline's decoding.
"""

from __future__ import annotations

import argparse
import base64
import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from dataflow.source.topics import create_topics

DEBEZIUM_VERSION = "2.7.3.Final"
KEY_SCHEMA = {
    "type": "struct",
    "fields": [{"type": "string", "optional": False, "field": "id"}],
    "optional": False,
    "name": "cdc.shop.key",
}
VALUE_SCHEMA = {
    "type": "struct",
    "optional": False,
    "name": "cdc.envelope",
    "fields": [
        {"type": "string", "optional": True, "name": "io.debezium.data.Json", "field": "before"},
        {"type": "string", "optional": True, "name": "io.debezium.data.Json", "field": "after"},
        {"type": "struct", "optional": True, "field": "updateDescription", "fields": []},
        {"type": "struct", "optional": False, "field": "source", "fields": []},
        {"type": "string", "optional": False, "field": "op"},
        {"type": "int64", "optional": True, "field": "ts_ms"},
    ],
}
COLLECTIONS = ["customers", "orders", "products", "payments", "shipments", "reviews"]
WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
]


@dataclass
class Change:
    """The logical change one message encodes (None for tombstones and corrupt messages)."""

    collection: str
    id: str
    op: str  # insert, update, replace, delete, partial
    doc: dict[str, Any] | None = None  # full document after the change (Python values)
    updated: dict[str, Any] = field(default_factory=dict)
    removed: tuple[str, ...] = ()


@dataclass
class Message:
    topic: str
    key: bytes | None
    value: bytes | None
    change: Change | None = None
    corrupt: bool = False


def ext(value: Any) -> Any:
    """Python value to Extended JSON v2 (canonical for numbers and dates, as Debezium writes)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return {"$numberLong": str(value)} if abs(value) >= 2**31 else {"$numberInt": str(value)}
    if isinstance(value, float):
        return {"$numberDouble": repr(value)}
    if isinstance(value, datetime):
        return {"$date": {"$numberLong": str(int(value.timestamp() * 1000))}}
    if isinstance(value, bytes):
        return {"$binary": {"base64": base64.b64encode(value).decode(), "subType": "00"}}
    if isinstance(value, ObjectId):
        return {"$oid": value.hex}
    if isinstance(value, dict):
        return {k: ext(v) for k, v in value.items()}
    if isinstance(value, list):
        return [ext(v) for v in value]
    raise TypeError(type(value))


@dataclass(frozen=True)
class ObjectId:
    hex: str


class Generator:
    """Deterministic for a seed: same arguments, same messages."""

    def __init__(
        self,
        *,
        collections: int = 3,
        prefix: str = "cdc",
        db: str = "shop",
        seed: int = 7,
        doc_bytes: int = 1024,
        corrupt_ratio: float = 0.0,
        partial_ratio: float = 0.1,
        drift_collection: bool = False,
        start: datetime = datetime(2026, 1, 1, tzinfo=UTC),
    ) -> None:
        self.rng = random.Random(seed)
        self.names = [COLLECTIONS[i] if i < len(COLLECTIONS) else f"c{i}" for i in range(collections)]
        if drift_collection:
            self.names.append("drifting")
        self.prefix, self.db = prefix, db
        self.doc_bytes = doc_bytes
        self.corrupt_ratio = corrupt_ratio
        self.partial_ratio = partial_ratio
        self.clock = start
        self.ord = 0
        self.live: dict[str, dict[str, dict[str, Any]]] = {n: {} for n in self.names}
        # The live ids again as a list, so picking one at random is O(1), not a copy of every key.
        self.ids: dict[str, list[str]] = {n: [] for n in self.names}
        self.next_id = 0

    def topic(self, collection: str) -> str:
        return f"{self.prefix}.{self.db}.{collection}"

    @property
    def topics(self) -> list[str]:
        return [self.topic(n) for n in self.names]

    def _oid(self) -> str:
        self.next_id += 1
        return f"{0x65A0_0000 + self.next_id:08x}{self.rng.getrandbits(64):016x}"

    def _doc(self, collection: str, oid: str) -> dict[str, Any]:
        r = self.rng
        doc: dict[str, Any] = {
            "_id": ObjectId(oid),
            "name": f"{r.choice(WORDS)} {r.choice(WORDS)}",
            "email": f"user{r.randrange(10**6)}@example.com",
            "qty": r.randrange(1, 500),
            "total": round(r.uniform(1, 10_000), 2),
            "big": r.randrange(2**40, 2**50),
            "active": r.random() < 0.8,
            "created": self.clock - timedelta(seconds=r.randrange(10**6)),
            "address": {"city": r.choice(WORDS).title(), "zip": f"{r.randrange(10**5):05d}"},
            "tags": r.sample(WORDS, 3),
        }
        if collection == "drifting":
            doc["value"] = r.choice(
                [r.randrange(1000), f"text-{r.randrange(1000)}", {"nested": r.randrange(9)}]
            )
        pad = self.doc_bytes - 360
        if pad > 0:
            doc["notes"] = " ".join(r.choice(WORDS) for _ in range(pad // 6))[:pad]
        return doc

    def _tick(self) -> tuple[int, int]:
        self.ord += 1
        if self.ord > 3:
            self.clock += timedelta(seconds=1)
            self.ord = 1
        return int(self.clock.timestamp() * 1000), self.ord

    def _envelope(self, collection: str, op: str, after: dict | None, update: dict | None) -> bytes:
        ts_ms, ord_ = self._tick()
        payload = {
            "before": None,
            "after": orjson.dumps(ext(after)).decode() if after is not None else None,
            "updateDescription": update,
            "source": {
                "version": DEBEZIUM_VERSION,
                "connector": "mongodb",
                "name": self.prefix,
                "ts_ms": ts_ms,
                "snapshot": "false",
                "db": self.db,
                "sequence": None,
                "collection": collection,
                "ord": ord_,
                "lsid": None,
                "txnNumber": None,
                "wallTime": ts_ms,
            },
            "op": op,
            "ts_ms": ts_ms + 5,
            "transaction": None,
        }
        return orjson.dumps({"schema": VALUE_SCHEMA, "payload": payload})

    @staticmethod
    def _key(oid: str) -> bytes:
        return orjson.dumps({"schema": KEY_SCHEMA, "payload": {"id": orjson.dumps({"$oid": oid}).decode()}})

    def _corrupt(self, collection: str) -> Message:
        r = self.rng
        kinds = [
            b"\xff\xfe not json",
            b'{"payload": {"op": "c", "after": "{\\"_id\\": {\\"$oid\\": \\"zz\\"}}", "source": {"db": "shop", "collection": "%s"}}}'
            % collection.encode(),
            b'{"payload": {"op": "x", "after": "{}", "source": {"db": "shop", "collection": "%s"}}}'
            % collection.encode(),
            b'{"schema": {}, "payload": {"op": "c", "after": "{\\"name\\": 1}", "source": {"db": "shop", "collection": "%s"}}}'
            % collection.encode(),
            b"[1, 2, 3]",
            b'{"payload": ',
        ]
        return Message(self.topic(collection), b'{"id": "bad"}', r.choice(kinds), corrupt=True)

    def messages(self, n_events: int) -> Iterator[Message]:
        """About 70% inserts, 25% updates (some partial, some replaces), 5% deletes."""
        r = self.rng
        for _ in range(n_events):
            coll = r.choice(self.names)
            if r.random() < self.corrupt_ratio:
                yield self._corrupt(coll)
                continue
            live = self.live[coll]
            roll = r.random()
            if roll < 0.70 or len(live) < 10:
                oid = self._oid()
                doc = self._doc(coll, oid)
                live[oid] = doc
                self.ids[coll].append(oid)
                yield Message(
                    self.topic(coll),
                    self._key(oid),
                    self._envelope(coll, "c", doc, None),
                    Change(coll, oid, "insert", doc),
                )
            elif roll < 0.95:
                oid = r.choice(self.ids[coll])
                doc = live[oid]
                kind = r.random()
                if kind < self.partial_ratio:
                    updated = {"qty": r.randrange(1, 500), "status": r.choice(WORDS)}
                    removed = ("tags",) if "tags" in doc and r.random() < 0.3 else ()
                    new = {k: v for k, v in doc.items() if k not in removed} | updated
                    live[oid] = new
                    desc = {
                        "removedFields": list(removed) or None,
                        "updatedFields": orjson.dumps(ext(updated)).decode(),
                        "truncatedArrays": None,
                    }
                    yield Message(
                        self.topic(coll),
                        self._key(oid),
                        self._envelope(coll, "u", None, desc),
                        Change(coll, oid, "partial", None, updated, removed),
                    )
                elif kind < self.partial_ratio + 0.2:
                    new = self._doc(coll, oid)
                    del new["address"]  # a replace drops fields
                    live[oid] = new
                    yield Message(
                        self.topic(coll),
                        self._key(oid),
                        self._envelope(coll, "u", new, None),
                        Change(coll, oid, "replace", new),
                    )
                else:
                    new = dict(doc, total=round(r.uniform(1, 10_000), 2), active=not doc.get("active"))
                    if coll == "drifting":
                        new["value"] = r.choice([r.randrange(1000), f"s{r.randrange(99)}", {"n": 1}, 2.5])
                    live[oid] = new
                    desc = {
                        "removedFields": None,
                        "updatedFields": orjson.dumps(ext({"total": new["total"]})).decode(),
                        "truncatedArrays": None,
                    }
                    yield Message(
                        self.topic(coll),
                        self._key(oid),
                        self._envelope(coll, "u", new, desc),
                        Change(coll, oid, "update", new),
                    )
            else:
                ids = self.ids[coll]
                i = r.randrange(len(ids))
                oid = ids[i]
                ids[i] = ids[-1]  # swap-remove
                ids.pop()
                del live[oid]
                yield Message(
                    self.topic(coll),
                    self._key(oid),
                    self._envelope(coll, "d", None, None),
                    Change(coll, oid, "delete"),
                )
                yield Message(self.topic(coll), self._key(oid), None)  # Debezium's tombstone


# Idempotent, batched: what the tests and the benchmarks produce with.
PRODUCER_CONFIG = {
    "enable.idempotence": True,
    "linger.ms": 20,
    "compression.type": "zstd",
    "batch.size": 1_000_000,
}


def produce(
    brokers: str,
    messages: Iterator[Message],
    extra: dict[str, str] | None = None,
    on_delivered: Callable[[Any], None] | None = None,
) -> int:
    """Produce with idempotence and confirmation; returns the number of messages sent.

    `on_delivered` sees each message Kafka confirmed (confluent-kafka's Message: its partition
    and offset)."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": brokers, **PRODUCER_CONFIG, **(extra or {})})
    errors: list[str] = []

    def report(err, msg) -> None:
        if err is not None:
            errors.append(str(err))
        elif on_delivered is not None:
            on_delivered(msg)

    n = 0
    for m in messages:
        while True:
            try:
                producer.produce(m.topic, key=m.key, value=m.value, on_delivery=report)
                break
            except BufferError:
                producer.poll(0.5)
        n += 1
        if n % 5000 == 0:
            producer.poll(0)
    remaining = producer.flush(120)
    if remaining or errors:
        raise RuntimeError(f"{remaining} messages unconfirmed, errors: {errors[:3]}")
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.generate", description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--brokers", help="produce to this Kafka broker")
    target.add_argument("--out", help="write a recorded-message file instead (the demo's sample format)")
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--collections", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--prefix", default="cdc")
    parser.add_argument("--db", default="shop")
    parser.add_argument("--corrupt-ratio", type=float, default=0.0)
    parser.add_argument("--doc-bytes", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    gen = Generator(
        collections=args.collections,
        prefix=args.prefix,
        db=args.db,
        seed=args.seed,
        corrupt_ratio=args.corrupt_ratio,
        doc_bytes=args.doc_bytes,
    )
    if args.out:
        from dataflow.source.sample import write_line

        with open(args.out, "wb") as f:
            n = sum(f.write(write_line(m.topic, m.key, m.value)) > 0 for m in gen.messages(args.events))
        print(f"wrote {n} messages to {args.out}")
        return 0
    create_topics(args.brokers, gen.topics, args.partitions)
    n = produce(args.brokers, gen.messages(args.events))
    print(f"produced {n} messages to {', '.join(gen.topics)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
