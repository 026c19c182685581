"""The records that flow between steps: a Kafka message, a decoded change, a chunk of them, a dead letter."""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, NamedTuple

import orjson

from dataflow import __version__

Op = Literal["insert", "update", "replace", "delete", "drop", "rename"]
DDL_OPS = frozenset({"drop", "rename"})  # change a whole collection, not one document


class SourceMessage(NamedTuple):
    """What the parse step reads of a Kafka message (the attributes `KafkaSourceMessage` has too)."""

    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int
    timestamp: tuple[int, int]
    replayed: bool = False  # carries REPLAY_HEADER: `cdc dlq replay` sent it again


REPLAY_HEADER = "cdc.replay.source"  # set by `cdc dlq replay`: the message's original topic:partition:offset


class BsonTimestamp(NamedTuple):
    """BSON `$timestamp` (seconds, increment); stored as struct<t:int64, i:int64>."""

    t: int
    i: int


# The BSON values Python has no type of its own for. Each is a NamedTuple, which orjson
# refuses to write, so JSON text always goes through `dataflow.lake.columns`' canonical form.


class ObjectId(str):
    """An ObjectId: its 24 lower-case hex digits, as a str that keeps its BSON type.

    Equal to the plain string of its hex (so code and tests can compare with one),
    yet a column, a JSON text and an `_id` key can tell it from a string.
    """

    __slots__ = ()


class Binary(NamedTuple):
    """BSON binary of a subtype other than generic (00, plain `bytes`) or a UUID (04, `Uuid`)."""

    data: bytes
    subtype: int


class Uuid(NamedTuple):
    """BSON binary subtype 04 of 16 bytes; `text` is its lower-case hyphenated form."""

    text: str


class DateMs(NamedTuple):
    """A BSON date outside years 1..9999, which `datetime` cannot hold: milliseconds since the epoch."""

    ms: int


class ExtValue(NamedTuple):
    """A BSON value with no column type of its own (regex, code, symbol, minKey, ...).

    `canonical` is its canonical Extended JSON v2 object, what it is stored as.
    """

    canonical: dict[str, Any]


_CLUSTER: Any = -1  # ChangeEvent.seq default: from `ts_ms` and `ord`, a cluster time


def cluster_seq(seconds: int, increment: int) -> int:
    """A cluster time (BSON timestamp) as one int64: seconds << 31 | increment.

    BSON cluster seconds are uint32 (good to 2106) and validation keeps the
    increment below 2**31, so the result always fits a signed int64.
    """
    return (seconds << 31) | increment


@dataclass(slots=True)
class ChangeEvent:
    """One MongoDB change, whatever envelope it came in.

    `doc` is the full document after the change (with `_id`), decoded from
    Extended JSON into Python values (see `dataflow.decode.extjson`). A partial update
    has `doc=None` and carries `updated` (top-level fields set) and `removed`
    (top-level fields unset) instead, or, when it reaches inside a field (a
    nested path, an array element, a truncation), `change`: the whole update
    description, applied to the stored document. A delete has neither.

    `drop` empties the collection; `rename` moves it to `target` (db, collection).
    Both have an empty `id`.

    `seq` orders changes across partitions and replays: built from one source
    clock only (see `dataflow.decode.envelopes`), or None when the message has
    no source clock; then offsets alone order it.
    """

    db: str
    collection: str
    id: str
    op: Op
    doc: dict[str, Any] | None
    ts_ms: int
    ord: int
    topic: str
    partition: int
    offset: int
    size: int
    updated: dict[str, Any] | None = None
    removed: tuple[str, ...] = ()
    # The message's own bytes, kept by reference (no copy) so that an event
    # Delta refuses later can still be dead-lettered with its original bytes.
    raw_key: bytes | None = None
    raw_value: bytes | None = None
    seq: int | None = _CLUSTER
    change: Any = None  # dataflow.decode.updates.Update, for updates inside fields
    target: tuple[str, str] | None = None  # rename: the new (db, collection)
    replayed: bool = False  # a dead letter sent again: its offset says nothing of its age
    # Which document this is, by MongoDB's equality (`dataflow.decode.identity.id_key`); `id` is
    # only its readable text. An event built without one is keyed as a string `_id` of `id`.
    key: str = ""
    table: str = field(init=False, default="")

    def __post_init__(self) -> None:
        # Stored, not a property: read per event by the keying, the metrics and the sink.
        self.table = f"{self.db}.{self.collection}"
        if not self.key and self.id:
            self.key = "s:" + self.id
        if self.seq is _CLUSTER:
            self.seq = cluster_seq(self.ts_ms // 1000, self.ord)

    @property
    def is_partial(self) -> bool:
        return self.op == "update" and self.doc is None


@dataclass(slots=True)
class EventChunk:
    """Consecutive events of one table out of one source batch.

    Bytewax charges every item it moves between steps a few Python calls
    (the branch predicate, the key function, routing); moving chunks of a few
    hundred to a few thousand events, instead of each event, saves them.
    """

    table: str
    events: list[ChangeEvent]


class Reason(StrEnum):
    """Why a message went to the dead-letter queue: always the data, never an outage or our bug."""

    CORRUPTED_DATA = "CORRUPTED_DATA"
    SCHEMA_VALIDATION_FAILED = "SCHEMA_VALIDATION_FAILED"
    OVERSIZED_DOCUMENT = "OVERSIZED_DOCUMENT"
    INVALID_BSON = "INVALID_BSON"
    UNSUPPORTED_PARTIAL_UPDATE = "UNSUPPORTED_PARTIAL_UPDATE"
    DELTA_WRITE_ERROR = "DELTA_WRITE_ERROR"  # decoded fine; the table refused a value


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


@dataclass(slots=True)
class DeadLetter:
    """A message the pipeline could not apply, with everything needed to replay it.

    `key` and `value` are the original bytes, untouched; in JSON they are base64.
    """

    reason: Reason
    error: str
    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int
    retry_count: int = 0
    first_failure_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    pipeline_version: str = __version__
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "reason": str(self.reason),
                "error": self.error,
                "key_b64": _b64(self.key),
                "value_b64": _b64(self.value),
                "source": {"topic": self.topic, "partition": self.partition, "offset": self.offset},
                "retry_count": self.retry_count,
                "first_failure_ms": self.first_failure_ms,
                "pipeline_version": self.pipeline_version,
                "metadata": self.metadata,
            },
            default=str,
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> DeadLetter:
        d = orjson.loads(data)
        src = d["source"]
        return cls(
            reason=Reason(d["reason"]),
            error=d["error"],
            key=_unb64(d.get("key_b64")),
            value=_unb64(d.get("value_b64")),
            topic=src["topic"],
            partition=src["partition"],
            offset=src["offset"],
            retry_count=d.get("retry_count", 0),
            first_failure_ms=d["first_failure_ms"],
            pipeline_version=d.get("pipeline_version", ""),
            metadata=d.get("metadata") or {},
        )

    @property
    def source_id(self) -> tuple[str, int, int]:
        return (self.topic, self.partition, self.offset)
