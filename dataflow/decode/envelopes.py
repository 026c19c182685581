"""Kafka message -> ChangeEvent, whichever connector wrote it; anything unusable -> DeadLetter.

`Decoder.parse` turns every message it can tell is unusable into a dead letter
with its original bytes; only our own bugs raise, and stop the dataflow. What
is read (DESIGN.md; the corpus in tests/data/connectors shows each):

- Debezium MongoDB envelopes (0.x/1.x with oplog `patch`/`filter`, 2.x and
  3.x, with or without pre-images), with or without the JSON converter's
  `{"schema", "payload"}` wrapper; the tombstone after a delete is skipped;
- Debezium's `ExtractNewDocumentState` output (the bare document with the
  SMT's `__op`, `__deleted`, `__source_*` fields): a tombstone or
  `__deleted: true` is the delete, Connect logical types are typed;
- MongoDB Kafka source connector change-stream documents, as JSON objects, as
  a JSON string holding the document, or schema-wrapped; update descriptions
  with nested paths, array elements, truncations and disambiguated paths;
  `drop`, `rename`, `dropDatabase` (applied), `invalidate` and the expanded
  DDL events (logged and skipped);
- `publish.full.document.only=true`: the bare document, a full-state upsert;
  its `tombstone.on.delete` tombstone is the delete;
- Debezium transaction metadata (`<prefix>.transaction`): skipped and counted.

Which of the two bare-document formats, and whether a tombstone is a delete,
is `CDC_FORMAT` (`dataflow.decode.formats`); the table of a message that does
not name it comes from the topic rule there.

Order (`ChangeEvent.seq`), from one clock only: the cluster time (seconds,
increment) of a change-stream event (`clusterTime`) or of a Debezium event
before 3.4 (`source.ts_ms` seconds, `source.ord`). Debezium 3.4 (DBZ-9683)
sets `source.ts_ms` to the wall time where MongoDB gives one while `ord`
stays the cluster increment, so from 3.4 on the sequence is the wall time
alone (`ts_ms` milliseconds; `ord` is not mixed in). A bare document or a
tombstone carries no source clock unless the SMT adds `__source_ts_ms`: its
`seq` is None, and offsets alone order it.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson
from bytewax.connectors.kafka import KafkaSourceMessage

from dataflow import speedups
from dataflow.decode import connect, debezium_fast, extjson, validate
from dataflow.decode.formats import Detections, Format, TopicTables
from dataflow.decode.identity import id_key
from dataflow.decode.order import debezium_seq
from dataflow.decode.updates import Update, UpdateError
from dataflow.model import (
    REPLAY_HEADER,
    BsonTimestamp,
    ChangeEvent,
    DeadLetter,
    Op,
    Reason,
    SourceMessage,
    cluster_seq,
)
from dataflow.runtime.failures import BadData

__all__ = ["DEFAULT_MAX_BYTES", "Decoder", "Skipped", "parse"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 16 * 1024 * 1024
_MAX_ERROR_CHARS = 1000

_CORRUPT = Reason.CORRUPTED_DATA
_SCHEMA = Reason.SCHEMA_VALIDATION_FAILED
_PARTIAL = Reason.UNSUPPORTED_PARTIAL_UPDATE
_STREAM_OPS: dict[str, Op] = {
    "insert": "insert",
    "update": "update",
    "replace": "replace",
    "delete": "delete",
}
# Expanded change-stream events (showExpandedEvents) that change no document.
_STREAM_DDL = frozenset(
    {
        "create",
        "createIndexes",
        "dropIndexes",
        "modify",
        "shardCollection",
        "reshardCollection",
        "refineCollectionShardKey",
    }
)
_DEBEZIUM_OTHER_OPS = {"t": "truncate", "m": "message"}
_UNWRAPPED_OPS: dict[str, Op] = {"c": "insert", "r": "insert", "u": "update", "d": "delete"}
_MISSING = object()
_CHECKED = object()  # in place of a key's _id text: the event is already validated
_NO_ID = object()  # a change to a whole collection

# What `Detections` records per topic.
DEBEZIUM = "Debezium change events"
CHANGE_STREAM = "MongoDB change-stream documents"
UNWRAPPED = "Debezium ExtractNewDocumentState records"
FULL_DOCUMENT = "MongoDB full documents (publish.full.document.only)"
TRANSACTIONS = "Debezium transaction metadata"
_ENVELOPES = frozenset({DEBEZIUM, CHANGE_STREAM})


class Skipped(NamedTuple):
    """A message that is not a change to apply; `kind` labels the count."""

    kind: str


TOMBSTONE = Skipped("tombstone")
TRANSACTION = Skipped("transaction")
INVALIDATE = Skipped("invalidate")
DDL = Skipped("ddl")


class _Reject(Exception):
    """Internal: this message goes to the DLQ for `reason`."""

    def __init__(self, reason: Reason, error: str) -> None:
        super().__init__(error)
        self.reason = reason
        self.error = error


@dataclass
class Decoder:
    """How to read this pipeline's topics (`CDC_FORMAT`, the topic rule) and what was found on them."""

    format: Format = Format.AUTO
    tables: TopicTables = field(default_factory=TopicTables)
    max_bytes: int = DEFAULT_MAX_BYTES
    fast: bool = True
    detections: Detections = field(default_factory=Detections)
    _fits: set[tuple[str, str, str]] = field(default_factory=set, repr=False)  # checked (topic, db, coll)

    def parse(self, msg: Any, *, max_bytes: int | None = None) -> ChangeEvent | DeadLetter | Skipped:
        """Decode one Kafka message (anything with its attributes)."""
        value: Any = None
        limit = self.max_bytes if max_bytes is None else max_bytes
        try:
            value = msg.value
            if value is None or len(value) == 0:
                return self._tombstone(msg)
            if type(value) is not bytes:
                if isinstance(value, str):
                    value = value.encode("utf-8", "surrogatepass")
                elif isinstance(value, bytearray | memoryview):
                    value = bytes(value)
                else:
                    return _dead(msg, None, _CORRUPT, f"value is a {type(value).__name__}, not bytes")
            if len(value) > limit:
                return _dead(
                    msg, value, Reason.OVERSIZED_DOCUMENT, f"value is {len(value)} bytes, limit is {limit}"
                )
            ev, key_id = self._decode(msg, value)
            if type(ev) is Skipped:
                return ev
            problem = validate.bson_problem(ev, value)
            if problem is not None:
                return _dead(msg, value, Reason.INVALID_BSON, problem)
            if key_id is not _CHECKED:
                err = validate.check_event(ev, key_id)
                if err is not None:
                    return _dead(msg, value, _SCHEMA, err)
            if ev.topic and (ev.topic, ev.db, ev.collection) not in self._fits:
                feeds = self.tables.refuses(ev.topic, ev.db, ev.collection)
                if feeds is not None:
                    return _dead(
                        msg,
                        value,
                        _SCHEMA,
                        f"namespace {ev.db}.{ev.collection} does not belong on topic "
                        f"{ev.topic!r}, which feeds {feeds} (CDC_TOPIC_TABLES, CDC_TOPIC_TABLE_REGEX)",
                    )
                if len(self._fits) < 10_000:
                    self._fits.add((ev.topic, ev.db, ev.collection))
            return ev
        except _Reject as r:
            return _dead(msg, value, r.reason, r.error)
        except extjson.InvalidBson as e:
            return _dead(msg, value, Reason.INVALID_BSON, str(e), {"path": e.path})
        # Anything else is our bug: it stops the dataflow, and the message stays in Kafka
        # (`dataflow.runtime.failures`); a topic no table rule fits is a ConfigError. The fuzz
        # tests feed this every shape of input.

    # ------------------------------------------------------------ what the message is

    def _decode(self, msg: Any, value: bytes) -> tuple[ChangeEvent | Skipped, Any]:
        """The event and the `_id` text its key carried (or `_CHECKED`: `debezium_fast` validated it)."""
        schema: Any = None
        obj = _schema_payload(value, "value")
        wrapped = obj is not _MISSING
        if obj is _MISSING:
            obj = _json(value, "value")
            if type(obj) is str:  # the change-stream document as a JSON string (StringConverter-style)
                obj = _json(obj, "value (JSON string)")
            if _is_wrapped(obj):
                wrapped, schema = True, obj["schema"]
                obj = _payload(obj["payload"], "value.payload")
        if type(obj) is not dict:
            raise _Reject(_CORRUPT, f"value is a JSON {_kind(obj)}, not an object")
        topic = msg[2] if type(msg) is SourceMessage else _attr(msg, "topic")
        topic = topic if type(topic) is str else ""
        # A change-stream document also has an `_id` (its resume token), so it is tested first; a bare
        # document is then anything with an `_id` (or the SMT's fields): Debezium payloads have none.
        if "operationType" in obj and (
            "ns" in obj or "documentKey" in obj or "clusterTime" in obj or "_id" not in obj
        ):
            self.detections.saw(topic, CHANGE_STREAM)
            return _change_stream(msg, value, obj)
        if "_id" in obj or "__op" in obj or "__deleted" in obj:
            if wrapped and schema is None:  # the fast scanner skipped the schema: it may type fields
                schema = _json(value, "value").get("schema")
            return self._bare(msg, value, obj, schema, topic)
        if "op" in obj:
            if self.detections.seen.get(topic) is not DEBEZIUM:
                self.detections.saw(topic, DEBEZIUM)
            if self.fast:
                ev = debezium_fast.event(msg, value, obj)
                if ev is not None:
                    return ev, _CHECKED
            return _debezium(msg, value, obj)
        if obj.get("status") in ("BEGIN", "END") and "id" in obj:
            self.detections.saw(topic, TRANSACTIONS)
            return TRANSACTION, None
        keys = ", ".join(list(obj)[:8])
        raise _Reject(_CORRUPT, f"not a recognisable change event envelope (keys: {keys})")

    def _is_unwrapped(self, msg: Any, obj: dict | None) -> bool:
        """A bare document or tombstone from Debezium's SMT (else from MongoDB's connector)."""
        if self.format.unwrapped:
            return True
        if self.format is not Format.AUTO:
            return False
        if obj is not None and any(k == "__op" or k == "__deleted" or k.startswith("__source_") for k in obj):
            return True
        return _key_shape(msg) == "debezium"

    def _bare(self, msg: Any, value: bytes, obj: dict, schema: Any, topic: str) -> tuple[ChangeEvent, Any]:
        if self._is_unwrapped(msg, obj):
            self.detections.saw(topic, UNWRAPPED)
            return self._unwrapped(msg, value, obj, schema, topic)
        self.detections.saw(topic, FULL_DOCUMENT)
        db, coll = self.tables.names(topic, debezium=False)
        # The bare document is the top-level object: skip the walk when no wrapper can be in it.
        doc = extjson.decode(obj) if _may_wrap(value) else obj
        if type(doc) is not dict or "_id" not in doc:
            raise _Reject(_SCHEMA, "bare document without an _id")
        key_id = _key_id_text(msg)
        ev = _event(msg, value, db, coll, doc["_id"], "replace", doc, _msg_ts_ms(msg), 0, seq=None)
        return ev, key_id

    def _unwrapped(
        self, msg: Any, value: bytes, obj: dict, schema: Any, topic: str
    ) -> tuple[ChangeEvent, Any]:
        smt = {k: obj.pop(k) for k in [k for k in obj if _is_smt_field(k)]}
        if schema is not None and connect.has_logical_types(schema):
            try:
                obj = connect.convert(obj, schema)
            except connect.ConnectValueError as e:
                raise _Reject(_SCHEMA, f"value.payload: {e}") from None
        doc = extjson.decode(obj) if _may_wrap(value) else obj
        if type(doc) is not dict:
            raise _Reject(_SCHEMA, f"value must be a document, not {_kind(doc)}")
        db, coll = smt.get("__source_db"), smt.get("__source_collection")
        if type(db) is not str or type(coll) is not str:
            db, coll = self.tables.names(topic, debezium=True)
        ts_ms = smt.get("__source_ts_ms")
        ord_ = smt.get("__source_ord")
        seq: int | None = None
        if type(ts_ms) is int:
            seq = debezium_seq(ts_ms, ord_ if type(ord_) is int else 0, smt.get("__source_version"))
        else:
            ts_ms = _msg_ts_ms(msg)
        code = smt.get("__op")
        deleted = smt.get("__deleted") in (True, "true")
        if code is not None and code not in _UNWRAPPED_OPS:
            raise _Reject(_SCHEMA, f"unknown __op {str(code)[:20]!r} (expected c, u, d or r)")
        key_id: Any = _key_id_text(msg)
        if "_id" in doc:
            id_value = doc["_id"]
        else:  # a rewrite-mode delete without `rewrite-with-id`: `{"__deleted": true}`
            id_value = _unwrapped_key_id(msg)
            if id_value is _MISSING:
                raise _Reject(_SCHEMA, 'no _id: not in the record, nor in a key {"id": ...}')
            key_id = None
        updated: dict[str, Any] | None = None
        op: Op
        if deleted or code == "d":
            op, doc = "delete", None
        elif code in ("c", "r"):
            op = "insert"
        elif self.format is Format.DEBEZIUM_UNWRAPPED_PARTIAL and code in ("u", None):
            # change_streams capture mode: only the fields the update set. The SMT leaves removed
            # fields out (Debezium 2.2+), so an update that only removed some cannot be applied.
            op, updated = "update", {k: v for k, v in doc.items() if k != "_id"}
            doc = None
            if not updated:
                raise _Reject(
                    _PARTIAL,
                    "an update record with no field but _id: ExtractNewDocumentState drops removed fields "
                    "in change_streams capture mode, so what it removed is unknown "
                    "(capture.mode=change_streams_update_full sends the whole document)",
                )
        elif code == "u":
            op = "update"
        else:
            op = "replace"
        ev = _event(msg, value, db, coll, id_value, op, doc, ts_ms, ord_ if type(ord_) is int else 0, seq=seq)
        ev.updated = updated
        return ev, key_id

    def _tombstone(self, msg: Any) -> ChangeEvent | DeadLetter | Skipped:
        """A null value: the delete itself (SMT, full-document-only) or the echo of a `d` event (skip)."""
        topic = _attr(msg, "topic")
        topic = topic if type(topic) is str else ""
        fmt = self.format
        if fmt in (Format.DEBEZIUM, Format.MONGODB):
            return TOMBSTONE
        if fmt is Format.AUTO:
            seen = self.detections.get(topic)
            if seen in _ENVELOPES or (seen is None and _envelope_key(msg)):
                return TOMBSTONE
        try:
            debezium = self._is_unwrapped(msg, None)
            id_value = _unwrapped_key_id(msg) if debezium else _document_key(msg)
            if id_value is _MISSING:
                if fmt is Format.AUTO:
                    return TOMBSTONE
                raise _Reject(_SCHEMA, "tombstone (a delete) whose key names no document _id")
            db, coll = self.tables.names(topic, debezium=debezium)
            ev = _event(msg, b"", db, coll, id_value, "delete", None, _msg_ts_ms(msg), 0, seq=None)
            ev.raw_value = None
        except _Reject as r:
            return _dead(msg, None, r.reason, r.error)
        except extjson.InvalidBson as e:
            return _dead(msg, None, Reason.INVALID_BSON, str(e), {"path": e.path})
        err = validate.check_event(ev)
        return ev if err is None else _dead(msg, None, _SCHEMA, err)


_DEFAULT = Decoder()


def parse(
    msg: KafkaSourceMessage, *, max_bytes: int = DEFAULT_MAX_BYTES, fast: bool = True
) -> ChangeEvent | DeadLetter | Skipped:
    """Decode one message with the default settings (`CDC_FORMAT=auto`, the connectors' topic names).

    `fast=False` skips `debezium_fast`, the one-function decoder of the common
    Debezium change (the tests compare the two).
    """
    decoder = _DEFAULT if fast else _SLOW
    return decoder.parse(msg, max_bytes=max_bytes)


_SLOW = Decoder(fast=False, detections=_DEFAULT.detections)


# --- dead letters


def _attr(msg: Any, name: str) -> Any:
    try:
        return getattr(msg, name, None)
    except Exception:
        return None


def _as_bytes(x: Any) -> bytes | None:
    if x is None or type(x) is bytes:
        return x
    if isinstance(x, str):
        return x.encode("utf-8", "surrogatepass")
    if isinstance(x, bytearray | memoryview):
        return bytes(x)
    return None


def _dead(
    msg: Any, value: Any, reason: Reason, error: str, metadata: dict[str, Any] | None = None
) -> DeadLetter:
    topic, partition, offset = _attr(msg, "topic"), _attr(msg, "partition"), _attr(msg, "offset")
    if len(error) > _MAX_ERROR_CHARS:
        error = error[: _MAX_ERROR_CHARS - 3] + "..."
    return DeadLetter(
        reason=reason,
        error=error,
        key=_as_bytes(_attr(msg, "key")),
        value=_as_bytes(value),
        topic=topic if type(topic) is str else "",
        partition=partition if type(partition) is int else -1,
        offset=offset if type(offset) is int else -1,
        metadata=metadata or {},
    )


# --- shared helpers


def _kind(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number"
    )


def _may_wrap(value: bytes) -> bool:
    """Whether a bare document must be walked: it may hold a type wrapper, or (the C walk is
    cheap) any value at all, an integer past int64 included."""
    return speedups.native is not None or b'"$' in value or b"\\u0024" in value


def _json(text: str | bytes, where: str) -> Any:
    try:
        return extjson.parse_json(text)
    except orjson.JSONDecodeError as e:
        if isinstance(text, bytes):
            try:
                text.decode("utf-8")
            except UnicodeDecodeError as u:
                raise _Reject(_CORRUPT, f"{where} is not valid UTF-8 (byte {u.start})") from None
        raise _Reject(_CORRUPT, f"{where} is not valid JSON: {e}") from None


def _ext(v: Any, where: str) -> Any:
    """An Extended JSON field: a string holding it, or the value itself."""
    if type(v) is str:
        try:
            return extjson.loads(v, path=where)
        except orjson.JSONDecodeError as e:
            raise _Reject(_CORRUPT, f"{where} is not valid Extended JSON: {e}") from None
    return extjson.decode(v, path=where)


def _doc(container: dict, name: str, where: str) -> dict | None:
    """A document field (Extended JSON string or object), or None when absent/null."""
    v = container.get(name)
    if v is None:
        return None
    if type(v) is not str and type(v) is not dict:
        raise _Reject(_SCHEMA, f"{where} must be a document or an Extended JSON string, not {_kind(v)}")
    doc = _ext(v, where)
    if type(doc) is not dict:
        raise _Reject(_SCHEMA, f"{where} must hold a document, not {_kind(doc)}")
    return doc


def _unwrap_schema(obj: Any, where: str) -> Any:
    """Strip the JSON converter's `{"schema", "payload"}` wrapper; parse a string payload."""
    if type(obj) is dict and len(obj) == 2 and "payload" in obj and "schema" in obj:
        return _payload(obj["payload"], f"{where}.payload")
    return obj


def _payload(obj: Any, where: str) -> Any:
    if type(obj) is str:
        obj = _json(obj, where)
    if obj is None:
        raise _Reject(_SCHEMA, f"{where} is null")
    return obj


def _schema_payload(text: bytes, where: str) -> Any:
    """The payload of a `{"schema", "payload"}` message, without building the schema; or _MISSING.

    The JSON converter's schema is about a third of a Debezium message and is
    never used: the C scanner checks its syntax and says where the payload lies,
    and only that is parsed. _MISSING (the full parse must do it, and word any
    error) when the scanner is not built, not sure, or the payload is not JSON.
    """
    native = speedups.native
    if native is None or type(text) is not bytes:
        return _MISSING
    span = native.payload_span(text)
    if span is None:
        return _MISSING
    try:
        obj = orjson.loads(memoryview(text)[span[0] : span[1]])
    except orjson.JSONDecodeError:
        return _MISSING
    return _payload(obj, f"{where}.payload")


def _str_field(d: dict, name: str, where: str) -> str:
    v = d.get(name)
    if type(v) is not str:
        what = "missing" if v is None else f"a {_kind(v)}, not a string"
        raise _Reject(_SCHEMA, f"{where}.{name} is {what}")
    return v


def _opt_int(d: dict, name: str, where: str, default: int | None = 0) -> int | None:
    v = d.get(name)
    if v is None:
        return default
    if type(v) is not int:
        raise _Reject(_SCHEMA, f"{where}.{name} must be an integer, not {_kind(v)}")
    return v


def _msg_ts_ms(msg: Any) -> int:
    ts = _attr(msg, "timestamp")  # confluent-kafka: (type, ms); type 0 = not available
    if type(ts) is tuple and len(ts) == 2 and ts[0] and type(ts[1]) is int and ts[1] >= 0:
        return ts[1]
    return 0


def _event(
    msg: Any,
    value: bytes,
    db: str,
    coll: str,
    id_value: Any,
    op: Op,
    doc: dict | None,
    ts_ms: int,
    ord_: int,
    *,
    seq: int | None,
) -> ChangeEvent:
    if doc is not None and "_id" not in doc:
        doc = {"_id": id_value, **doc}
    if type(msg) is SourceMessage:  # what the Kafka source emits: no attribute can be missing
        key, _, topic, partition, offset, _, replayed = msg
    else:
        key, topic, partition, offset = (_attr(msg, a) for a in ("key", "topic", "partition", "offset"))
        headers = _attr(msg, "headers")
        replayed = type(headers) is list and any(
            type(h) is tuple and h[:1] == (REPLAY_HEADER,) for h in headers
        )
    return ChangeEvent(
        db=db,
        collection=coll,
        id="" if id_value is _NO_ID else extjson.id_text(id_value),
        key="" if id_value is _NO_ID else id_key(id_value),
        op=op,
        doc=doc,
        ts_ms=ts_ms,
        ord=ord_,
        topic=topic if type(topic) is str else "",
        partition=partition if type(partition) is int else -1,
        offset=offset if type(offset) is int else -1,
        size=len(value),
        raw_key=_as_bytes(key),
        raw_value=value,
        seq=seq,
        replayed=replayed,
    )


def _is_smt_field(name: str) -> bool:
    """A field `ExtractNewDocumentState` adds (`add.fields`, `__deleted`), not the collection's."""
    return name[:2] == "__" and (
        name in ("__op", "__deleted", "__ts_ms", "__ts_us", "__ts_ns", "__db", "__collection")
        or name.startswith(("__source_", "__transaction_"))
    )


def _is_wrapped(obj: Any) -> bool:
    return type(obj) is dict and len(obj) == 2 and "payload" in obj and "schema" in obj


def _key_object(msg: Any) -> Any:
    """The message key as JSON (schema wrapper removed), or _MISSING."""
    key = _as_bytes(_attr(msg, "key"))
    if not key:
        return _MISSING
    try:
        obj = _json(key, "key")
    except _Reject:
        return _MISSING
    if _is_wrapped(obj):
        obj = obj["payload"]
        if type(obj) is str:
            try:
                obj = _json(obj, "key.payload")
            except _Reject:
                return _MISSING
    return obj


def _envelope_key(msg: Any) -> bool:
    """Whether the key is the one Debezium's envelope carries: `{"id": "<_id as Extended JSON>"}`.

    The unwrap SMT writes the `_id` itself (a number, an ObjectId's hex), so an
    `id` that is not JSON text is its; only a string `_id` that happens to be
    JSON text (`"123"`) reads as the envelope's.
    """
    obj = _key_object(msg)
    if type(obj) is not dict or type(obj.get("id")) is not str or "_id" in obj:
        return False
    try:
        extjson.parse_json(obj["id"])
    except orjson.JSONDecodeError:
        return False
    return True


def _key_shape(msg: Any) -> str | None:
    """Which connector's key this is: `{"id": ...}` is "debezium", a document key `{"_id": ...}` "mongodb"."""
    obj = _key_object(msg)
    if type(obj) is dict:
        if "id" in obj and "_id" not in obj:
            return "debezium"
        if "_id" in obj:
            return "mongodb"
    return None


def _unwrapped_key_id(msg: Any) -> Any:
    """The `_id` in the key `ExtractNewDocumentState` writes: `{"id": <value>}`, not Extended JSON text.

    The SMT converts the key's `_id` as it converts the document's (an ObjectId
    to its hex string, a number to a number), so the two compare as they are.
    A key left as Debezium wrote it (`"id"` holding Extended JSON text) is read as that.
    """
    obj = _key_object(msg)
    if type(obj) is not dict or "id" not in obj:
        return _MISSING
    raw = obj["id"]
    if type(raw) is str and raw[:1] in ("{", '"'):  # the key as Debezium wrote it: Extended JSON text
        with contextlib.suppress(orjson.JSONDecodeError, extjson.InvalidBson):
            return extjson.loads(raw, path="key.id")
    return extjson.decode(raw, path="key.id")


def _key_id_text(msg: Any) -> str | None:
    """The `_id` text the key names, to check against the document's (None: no usable key)."""
    shape = _key_shape(msg)
    try:
        if shape == "debezium":
            k = _unwrapped_key_id(msg)
        elif shape == "mongodb":
            k = _document_key(msg)
        else:
            return None
    except (_Reject, extjson.InvalidBson):
        return None
    return None if k is _MISSING else id_key(k)


def _document_key(msg: Any) -> Any:
    """The `_id` in a MongoDB connector key (the change's `documentKey`), or _MISSING."""
    obj = _key_object(msg)
    if type(obj) is not dict or "_id" not in obj:
        return _MISSING
    raw = obj["_id"]
    if type(raw) is dict and set(raw) == {"_data"} and type(raw["_data"]) is str:
        raise _Reject(
            _SCHEMA,
            "the message key is a change-stream resume token, not the document key: "
            "set the connector's change.stream.document.key.as.key=true to have deletes applied",
        )
    return extjson.decode(raw, path="key._id")


def _update(
    ud: dict, where: str, before: dict | None
) -> tuple[dict | None, dict[str, Any] | None, tuple[str, ...], Update | None]:
    """An update description as (doc, updated, removed, change).

    With a pre-image, the document after it (the description applied to the
    pre-image); else top-level sets and removals, or the whole description
    when it reaches inside a field.
    """
    upd = ud.get("updatedFields")
    if upd is not None:
        upd = _ext(upd, f"{where}.updatedFields")
        if type(upd) is not dict:
            raise _Reject(_SCHEMA, f"{where}.updatedFields must be a document, not {_kind(upd)}")
    removed = ud.get("removedFields")
    if removed is None:
        removed = []
    elif type(removed) is str:  # schema output writes the list as JSON text
        removed = _ext(removed, f"{where}.removedFields")
    if type(removed) is not list or any(type(f) is not str for f in removed):
        raise _Reject(_SCHEMA, f"{where}.removedFields must be a list of strings")
    truncated = ud.get("truncatedArrays")
    if type(truncated) is str:
        truncated = _ext(truncated, f"{where}.truncatedArrays")
    if truncated is None:
        truncated = []
    if type(truncated) is not list:
        raise _Reject(_SCHEMA, f"{where}.truncatedArrays must be a list")
    dis = ud.get("disambiguatedPaths")
    if type(dis) is str:
        dis = _ext(dis, f"{where}.disambiguatedPaths")
    if dis is not None and type(dis) is not dict:
        raise _Reject(_SCHEMA, f"{where}.disambiguatedPaths must be a document")
    try:
        change = Update.parse(upd or {}, removed, truncated, dis)
    except UpdateError as e:
        raise _Reject(_SCHEMA, f"{where}: {e}") from None
    return _applied(change, before, where)


def _applied(
    change: Update, before: dict | None, where: str
) -> tuple[dict | None, dict[str, Any] | None, tuple[str, ...], Update | None]:
    if before is not None:
        try:
            return change.apply(before), None, (), None
        except BadData as e:
            raise _Reject(e.reason, f"{where} applied to the pre-image: {e}") from None
    if change.top_level:
        updated = {str(p[0]): v for p, v in change.set}
        return None, updated, tuple(str(p[0]) for p in change.unset), None
    return None, None, (), change


# --- Debezium


def _key_id(msg: Any, required: bool) -> Any:
    """The `_id` in a Debezium key `{"id": "<Extended JSON>"}`; _MISSING if absent.

    When not `required`, a key we cannot read is ignored rather than rejected.
    """
    key = _as_bytes(_attr(msg, "key"))
    if not key:
        if required:
            raise _Reject(_SCHEMA, "no _id: no message key")
        return _MISSING
    try:
        obj = _schema_payload(key, "key")
        if obj is _MISSING:
            obj = _unwrap_schema(_json(key, "key"), "key")
        if type(obj) is not dict or "id" not in obj:
            raise _Reject(_SCHEMA, 'key is not a Debezium key {"id": ...}')
        raw = obj["id"]
        if type(raw) is str:
            try:
                return extjson.loads(raw, path="key.id")
            except orjson.JSONDecodeError:
                raise _Reject(_SCHEMA, f"key.id is not Extended JSON: {raw[:100]!r}") from None
        return extjson.decode(raw, path="key.id")
    except (_Reject, extjson.InvalidBson):
        if required:
            raise
        return _MISSING


def _debezium(msg: Any, value: bytes, p: dict) -> tuple[ChangeEvent, str | None]:
    op = p["op"]
    if type(op) is not str:
        raise _Reject(_SCHEMA, f"payload.op must be a string, not {_kind(op)}")
    if op in _DEBEZIUM_OTHER_OPS:
        raise _Reject(_SCHEMA, f"Debezium op {op!r} ({_DEBEZIUM_OTHER_OPS[op]}) is not a document change")
    if op not in ("c", "r", "u", "d"):
        raise _Reject(_SCHEMA, f"unknown Debezium op {op[:20]!r} (expected c, u, d or r)")

    source = p.get("source")
    if type(source) is not dict:
        raise _Reject(_SCHEMA, f"payload.source is {'missing' if source is None else _kind(source)}")
    if source.get("db") is None and source.get("collection") is None and type(source.get("ns")) is str:
        db, _, coll = source["ns"].partition(".")  # 0.x: "ns": "db.collection"
    else:
        db = _str_field(source, "db", "payload.source")
        coll = _str_field(source, "collection", "payload.source")
    ts_ms = _opt_int(source, "ts_ms", "payload.source", None)
    version = source.get("version")
    if ts_ms is None:
        sec = _opt_int(source, "sec", "payload.source", None)  # 0.x
        if sec is None:
            raise _Reject(_SCHEMA, "payload.source.ts_ms is missing")
        ts_ms, version = sec * 1000, "0.x"
    ord_ = _opt_int(source, "ord", "payload.source")
    assert ord_ is not None

    updated: dict[str, Any] | None = None
    removed: tuple[str, ...] = ()
    change: Update | None = None
    doc = None if op == "d" else _doc(p, "after", "payload.after")
    kind: Op
    if op == "d":
        kind = "delete"
    elif op in ("c", "r"):
        if doc is None:
            raise _Reject(_SCHEMA, f"op {op!r} without payload.after")
        kind = "insert"
    elif doc is not None:
        kind = "update"
    else:
        ud = p.get("updateDescription")
        patch = p.get("patch")
        before = _doc(p, "before", "payload.before")  # capture modes *_with_pre_image
        if ud is not None:
            if type(ud) is not dict:
                raise _Reject(_SCHEMA, f"payload.updateDescription must be an object, not {_kind(ud)}")
            doc, updated, removed, change = _update(ud, "payload.updateDescription", before)
            kind = "update"
        elif patch is not None:
            if type(patch) is not str and type(patch) is not dict:
                raise _Reject(_SCHEMA, f"payload.patch must be an Extended JSON string, not {_kind(patch)}")
            kind, doc, change = _legacy_patch(_ext(patch, "payload.patch"))
            if change is not None:
                doc, updated, removed, change = _applied(change, before, "payload.patch")
        else:
            raise _Reject(_SCHEMA, "update without payload.after, updateDescription or patch")

    key_id: str | None = None
    if doc is not None and "_id" in doc:
        id_value = doc["_id"]
        k = _key_id(msg, required=False)
        if k is not _MISSING:
            key_id = id_key(k)
    else:
        filt = p.get("filter")  # legacy 1.x: '{"_id": ...}', the fallback for an unreadable key
        id_value = _key_id(msg, required=filt is None)
        if id_value is _MISSING and filt is not None:
            f = _doc(p, "filter", "payload.filter")
            if f is not None and "_id" in f:
                id_value = f["_id"]
        if id_value is _MISSING:
            raise _Reject(_SCHEMA, "no _id: not in the document, the message key or payload.filter")
    seq = debezium_seq(ts_ms, ord_, version)
    ev = _event(msg, value, db, coll, id_value, kind, doc, ts_ms, ord_, seq=seq)
    ev.updated, ev.removed, ev.change = updated, removed, change
    return ev, key_id


def _legacy_patch(patch: Any) -> tuple[Op, dict | None, Update | None]:
    """Debezium 1.x oplog `patch`: `$set`/`$unset` (oplog v1), a `diff` (oplog v2), or a replacement."""
    if type(patch) is not dict:
        raise _Reject(_SCHEMA, f"payload.patch must hold a document, not {_kind(patch)}")
    if not any(k[:1] == "$" for k in patch):
        return "replace", patch, None
    if "diff" in patch:
        extra = [k for k in patch if k not in ("$v", "diff")]
        if extra or type(patch["diff"]) is not dict:
            raise _Reject(_SCHEMA, f"payload.patch: an oplog v2 update with keys {list(patch)[:8]}")
        sets: list[tuple[tuple[str | int, ...], Any]] = []
        unsets: list[tuple[str | int, ...]] = []
        truncs: list[tuple[tuple[str | int, ...], int]] = []
        _oplog_diff(patch["diff"], (), sets, unsets, truncs)
        return "update", None, Update(tuple(sets), tuple(unsets), tuple(truncs))
    unsupported = [k for k in patch if k not in ("$v", "$set", "$unset")]
    if unsupported:
        raise _Reject(
            _PARTIAL, f"payload.patch uses {unsupported[:5]}: only $set and $unset are oplog updates"
        )
    set_, unset = patch.get("$set") or {}, patch.get("$unset") or {}
    if type(set_) is not dict or type(unset) is not dict:
        raise _Reject(_SCHEMA, "payload.patch.$set and $unset must be documents")
    try:
        return "update", None, Update.parse(set_, list(unset))
    except UpdateError as e:
        raise _Reject(_SCHEMA, f"payload.patch: {e}") from None


def _oplog_diff(
    diff: dict,
    at: tuple[str | int, ...],
    sets: list[tuple[tuple[str | int, ...], Any]],
    unsets: list[tuple[str | int, ...]],
    truncs: list[tuple[tuple[str | int, ...], int]],
) -> None:
    """An oplog v2 (`$v: 2`) diff: `u`/`i` set, `d` unset, `s<field>` a sub-diff, `a: true` an array diff."""
    if diff.get("a") is True:  # array: `l` new length, `u<n>` set element, `s<n>` sub-diff of element
        for k, v in diff.items():
            if k == "a":
                continue
            if k == "l" and type(v) is int and v >= 0:
                truncs.append((at, v))
            elif k[:1] in ("u", "s") and k[1:].isdigit():
                path = (*at, int(k[1:]))
                if k[0] == "u":
                    sets.append((path, v))
                elif type(v) is dict:
                    _oplog_diff(v, path, sets, unsets, truncs)
                else:
                    raise _Reject(_SCHEMA, f"payload.patch.diff: {k} must hold a diff")
            else:
                raise _Reject(_SCHEMA, f"payload.patch.diff: unknown array diff entry {k[:40]!r}")
        return
    for section, fields in diff.items():
        if section in ("u", "i") and type(fields) is dict:
            sets.extend(((*at, name), v) for name, v in fields.items())
        elif section == "d" and type(fields) is dict:
            unsets.extend((*at, name) for name in fields)
        elif section[:1] == "s" and len(section) > 1 and type(fields) is dict:
            _oplog_diff(fields, (*at, section[1:]), sets, unsets, truncs)
        else:
            raise _Reject(_SCHEMA, f"payload.patch.diff: unknown diff section {section[:40]!r}")


# --- MongoDB Kafka source connector


def _change_stream(msg: Any, value: bytes, d: dict) -> tuple[ChangeEvent | Skipped, str | None]:
    ot = d.get("operationType")
    if type(ot) is not str:
        raise _Reject(_SCHEMA, f"operationType must be a string, not {_kind(ot)}")
    if ot == "invalidate":
        log.warning(
            "change stream invalidated (a drop, rename or dropDatabase of what the connector watches): "
            "the connector must be restarted to capture more",
            extra={"topic": _attr(msg, "topic")},
        )
        return INVALIDATE, None
    if ot in _STREAM_DDL:
        return DDL, None
    op: Op | None = _STREAM_OPS.get(ot)
    if op is None and ot not in ("drop", "rename", "dropDatabase"):
        raise _Reject(_SCHEMA, f"operationType {ot[:40]!r} is not a change this pipeline knows")
    ns = d.get("ns")
    if type(ns) is not dict:
        raise _Reject(_SCHEMA, f"ns is {'missing' if ns is None else _kind(ns)}")
    db = _str_field(ns, "db", "ns")
    ct = d.get("clusterTime")
    seq: int | None
    if ct is None:
        ts_ms, ord_, seq = _msg_ts_ms(msg), 0, None
    else:
        ts = _ext(ct, "clusterTime") if type(ct) in (str, dict) else ct
        if type(ts) is not BsonTimestamp:
            raise _Reject(_SCHEMA, f"clusterTime must be a $timestamp, not {_kind(ct)}")
        ts_ms, ord_ = ts.t * 1000, ts.i
        seq = cluster_seq(ts.t, ts.i)
    if op is None:  # drop, rename, dropDatabase: the whole collection (or database)
        coll = "" if ot == "dropDatabase" else _str_field(ns, "coll", "ns")
        ev = _event(
            msg, value, db, coll, _NO_ID, "rename" if ot == "rename" else "drop", None, ts_ms, ord_, seq=seq
        )
        if ot == "rename":
            to = d.get("to")
            if type(to) is not dict:
                raise _Reject(_SCHEMA, "rename without `to`")
            ev.target = (_str_field(to, "db", "to"), _str_field(to, "coll", "to"))
        return ev, None
    coll = _str_field(ns, "coll", "ns")

    doc = None if op == "delete" else _doc(d, "fullDocument", "fullDocument")
    dk = _doc(d, "documentKey", "documentKey")
    updated: dict[str, Any] | None = None
    removed: tuple[str, ...] = ()
    change: Update | None = None
    if op in ("insert", "replace") and doc is None:
        raise _Reject(_SCHEMA, f"{ot} without fullDocument")
    if op == "update" and doc is None:
        ud = d.get("updateDescription")
        if type(ud) is str:  # schema output
            ud = _ext(ud, "updateDescription")
        if type(ud) is not dict:
            raise _Reject(_SCHEMA, "update without fullDocument or updateDescription")
        before = _doc(d, "fullDocumentBeforeChange", "fullDocumentBeforeChange")
        doc, updated, removed, change = _update(ud, "updateDescription", before)

    key_id: str | None = None
    if dk is not None and "_id" in dk:
        id_value = dk["_id"]
        if doc is not None and "_id" in doc:
            key_id = id_key(id_value)
            id_value = doc["_id"]
    elif doc is not None and "_id" in doc:
        id_value = doc["_id"]
    else:
        raise _Reject(_SCHEMA, "no _id: documentKey._id is missing")
    ev = _event(msg, value, db, coll, id_value, op, doc, ts_ms, ord_, seq=seq)
    ev.updated, ev.removed, ev.change = updated, removed, change
    return ev, key_id
