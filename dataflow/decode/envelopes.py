"""Kafka message -> ChangeEvent, whichever connector wrote it; anything unusable -> DeadLetter.

`parse` turns every message it can tell is unusable into a dead letter with its
original bytes; only our own bugs raise, and stop the dataflow. Envelopes accepted (see DESIGN.md):

- Debezium MongoDB (0.x/1.x legacy and 2.x), with or without the JSON
  converter's `{"schema", "payload"}` wrapper;
- MongoDB Kafka source connector change-stream documents, as JSON objects, as a
  JSON string holding the document, or schema-wrapped (then `fullDocument`,
  `documentKey`, `clusterTime` and `updatedFields` are Extended JSON strings);
- `publish.full.document.only=true`: the bare document, applied as a "replace"
  (full-state upsert), namespace from the topic `<prefix>.<db>.<collection>`.
"""

from __future__ import annotations

from typing import Any

import orjson
from bytewax.connectors.kafka import KafkaSourceMessage

from dataflow import speedups
from dataflow.decode import debezium_fast, extjson, validate
from dataflow.model import BsonTimestamp, ChangeEvent, DeadLetter, Op, Reason, SourceMessage

__all__ = ["DEFAULT_MAX_BYTES", "parse"]

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
_DEBEZIUM_OTHER_OPS = {"t": "truncate", "m": "message"}
_MISSING = object()
_CHECKED = object()  # in place of a key's _id text: the event is already validated


class _Reject(Exception):
    """Internal: this message goes to the DLQ for `reason`."""

    def __init__(self, reason: Reason, error: str) -> None:
        super().__init__(error)
        self.reason = reason
        self.error = error


def parse(
    msg: KafkaSourceMessage, *, max_bytes: int = DEFAULT_MAX_BYTES, fast: bool = True
) -> ChangeEvent | DeadLetter | None:
    """Decode one Kafka message (anything with its attributes). None means a tombstone: skip it.

    `fast=False` skips `debezium_fast`, the one-function decoder of the common
    Debezium change (the tests compare the two).
    """
    value: Any = None
    try:
        value = msg.value
        if value is None or len(value) == 0:
            return None
        if type(value) is not bytes:
            if isinstance(value, str):
                value = value.encode("utf-8", "surrogatepass")
            elif isinstance(value, bytearray | memoryview):
                value = bytes(value)
            else:
                return _dead(msg, None, _CORRUPT, f"value is a {type(value).__name__}, not bytes")
        if len(value) > max_bytes:
            return _dead(
                msg, value, Reason.OVERSIZED_DOCUMENT, f"value is {len(value)} bytes, limit is {max_bytes}"
            )
        ev, key_id = _decode(msg, value, fast)
        if key_id is not _CHECKED:
            err = validate.check_event(ev, key_id)
            if err is not None:
                return _dead(msg, value, _SCHEMA, err)
        return ev
    except _Reject as r:
        return _dead(msg, value, r.reason, r.error)
    except extjson.InvalidBson as e:
        return _dead(msg, value, Reason.INVALID_BSON, str(e), {"path": e.path})
    # Anything else is our bug: it stops the dataflow, and the message stays in Kafka
    # (`dataflow.runtime.failures`). The fuzz tests feed this every shape of input.


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


def _json(text: str | bytes, where: str) -> Any:
    try:
        return orjson.loads(text)
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


def _partial(
    updated: Any, removed: Any, truncated: Any, where: str, disambiguated: Any = None
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Top-level fields set / removed by an update, or reject what cannot be applied that way."""
    if updated is None:
        updated = {}
    elif type(updated) is not dict:
        raise _Reject(_SCHEMA, f"{where}.updatedFields must be a document, not {_kind(updated)}")
    if removed is None:
        removed = []
    elif type(removed) is not list or any(type(f) is not str for f in removed):
        raise _Reject(_SCHEMA, f"{where}.removedFields must be a list of strings")
    if truncated:
        if type(truncated) is not list:
            raise _Reject(_SCHEMA, f"{where}.truncatedArrays must be a list")
        raise _Reject(
            _PARTIAL, f"{where}.truncatedArrays is not empty: array truncation needs the full document"
        )
    if type(disambiguated) is not dict:
        disambiguated = {}
    for names, what in ((updated, "updatedFields"), (removed, "removedFields")):
        for name in names:
            if "." in name:
                # MongoDB 6.1+ says when a dotted name is one top-level field literally named so.
                parts = disambiguated.get(name)
                if not (type(parts) is list and len(parts) == 1 and parts[0] == name):
                    raise _Reject(
                        _PARTIAL, f"{where}.{what} touches the nested path {name!r}: needs the full document"
                    )
    return updated, tuple(removed)


def _event(
    msg: Any, value: bytes, db: str, coll: str, id_value: Any, op: Op, doc: dict | None, ts_ms: int, ord_: int
) -> ChangeEvent:
    if doc is not None and "_id" not in doc:
        doc = {"_id": id_value, **doc}
    if type(msg) is SourceMessage:  # what the Kafka source emits: no attribute can be missing
        key, _, topic, partition, offset, _ = msg
    else:
        key, topic, partition, offset = (_attr(msg, a) for a in ("key", "topic", "partition", "offset"))
    return ChangeEvent(
        db=db,
        collection=coll,
        id=extjson.id_text(id_value),
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
    )


# --- envelope detection


def _decode(msg: Any, value: bytes, fast: bool = False) -> tuple[ChangeEvent, Any]:
    """The event and the `_id` text its key carried (or `_CHECKED`: `debezium_fast` validated it)."""
    obj = _schema_payload(value, "value")
    if obj is _MISSING:
        obj = _json(value, "value")
        if type(obj) is str:  # the change-stream document as a JSON string (StringConverter-style)
            obj = _json(obj, "value (JSON string)")
        obj = _unwrap_schema(obj, "value")
    if type(obj) is not dict:
        raise _Reject(_CORRUPT, f"value is a JSON {_kind(obj)}, not an object")
    # A change-stream document also has an `_id` (its resume token), so it is tested first; a bare
    # document (publish.full.document.only) is then anything with an `_id`: Debezium payloads have none.
    if "operationType" in obj and (
        "ns" in obj or "documentKey" in obj or "clusterTime" in obj or "_id" not in obj
    ):
        return _change_stream(msg, value, obj)
    if "_id" in obj:
        return _full_document(msg, value, obj)
    if "op" in obj:
        if fast:
            ev = debezium_fast.event(msg, value, obj)
            if ev is not None:
                return ev, _CHECKED
        return _debezium(msg, value, obj)
    keys = ", ".join(list(obj)[:8])
    raise _Reject(_CORRUPT, f"not a recognisable change event envelope (keys: {keys})")


# --- Debezium


def _key_id(msg: Any, required: bool) -> Any:
    """The `_id` in a Debezium key `{"id": "<Extended JSON>"}`; _MISSING if absent.

    When not `required`, a key we cannot read is ignored rather than rejected.
    """
    key = _as_bytes(_attr(msg, "key"))
    if not key:
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
    if ts_ms is None:
        sec = _opt_int(source, "sec", "payload.source", None)  # 0.x
        if sec is None:
            raise _Reject(_SCHEMA, "payload.source.ts_ms is missing")
        ts_ms = sec * 1000
    ord_ = _opt_int(source, "ord", "payload.source")

    updated: dict[str, Any] | None = None
    removed: tuple[str, ...] = ()
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
        if ud is not None:
            if type(ud) is not dict:
                raise _Reject(_SCHEMA, f"payload.updateDescription must be an object, not {_kind(ud)}")
            upd = ud.get("updatedFields")
            if upd is not None:
                upd = _ext(upd, "payload.updateDescription.updatedFields")
            updated, removed = _partial(
                upd, ud.get("removedFields"), ud.get("truncatedArrays"), "payload.updateDescription"
            )
            kind = "update"
        elif patch is not None:
            if type(patch) is not str and type(patch) is not dict:
                raise _Reject(_SCHEMA, f"payload.patch must be an Extended JSON string, not {_kind(patch)}")
            kind, doc, updated, removed = _legacy_patch(_ext(patch, "payload.patch"))
        else:
            raise _Reject(_SCHEMA, "update without payload.after, updateDescription or patch")

    key_id: str | None = None
    if doc is not None and "_id" in doc:
        id_value = doc["_id"]
        key = _as_bytes(_attr(msg, "key"))
        # Fast path (most events): an ObjectId or long string _id whose text appears in the key
        # agrees with it; decoding the key as well would cost as much as the document's _id.
        if not (type(id_value) is str and len(id_value) >= 12 and key and id_value.encode() in key):
            k = _key_id(msg, required=False)
            if k is not _MISSING:
                key_id = extjson.id_text(k)
    else:
        filt = p.get("filter")  # legacy 1.x: '{"_id": ...}', the fallback for an unreadable key
        id_value = _key_id(msg, required=filt is None)
        if id_value is _MISSING and filt is not None:
            f = _doc(p, "filter", "payload.filter")
            if f is not None and "_id" in f:
                id_value = f["_id"]
        if id_value is _MISSING:
            raise _Reject(_SCHEMA, "no _id: not in the document, the message key or payload.filter")
    ev = _event(msg, value, db, coll, id_value, kind, doc, ts_ms, ord_)
    ev.updated, ev.removed = updated, removed
    return ev, key_id


def _legacy_patch(patch: Any) -> tuple[Op, dict | None, dict[str, Any] | None, tuple[str, ...]]:
    """Debezium 1.x oplog `patch`: `$set`/`$unset` (oplog v1), a `diff` (oplog v2), or a replacement."""
    if type(patch) is not dict:
        raise _Reject(_SCHEMA, f"payload.patch must hold a document, not {_kind(patch)}")
    if not any(k[:1] == "$" for k in patch):
        return "replace", patch, None, ()
    if "diff" in patch:
        diff = patch["diff"]
        extra = [k for k in patch if k not in ("$v", "diff")]
        if extra or type(diff) is not dict:
            raise _Reject(_PARTIAL, f"payload.patch: unsupported oplog v2 update with keys {list(patch)[:8]}")
        updated: dict[str, Any] = {}
        removed: list[str] = []
        for section, fields in diff.items():
            if section in ("u", "i") and type(fields) is dict:
                updated.update(fields)
            elif section == "d" and type(fields) is dict:
                removed.extend(fields)
            else:
                raise _Reject(
                    _PARTIAL,
                    f"payload.patch.diff.{section[:40]} changes a nested field: needs the full document",
                )
        u, r = _partial(updated, removed, None, "payload.patch")
        return "update", None, u, r
    unsupported = [k for k in patch if k not in ("$v", "$set", "$unset")]
    if unsupported:
        raise _Reject(_PARTIAL, f"payload.patch uses {unsupported[:5]}: only $set and $unset can be applied")
    set_, unset = patch.get("$set"), patch.get("$unset")
    if unset is not None and type(unset) is not dict:
        raise _Reject(_SCHEMA, f"payload.patch.$unset must be a document, not {_kind(unset)}")
    u, r = _partial(set_, list(unset or ()), None, "payload.patch")
    return "update", None, u, r


# --- MongoDB Kafka source connector


def _change_stream(msg: Any, value: bytes, d: dict) -> tuple[ChangeEvent, str | None]:
    ot = d.get("operationType")
    if type(ot) is not str:
        raise _Reject(_SCHEMA, f"operationType must be a string, not {_kind(ot)}")
    op = _STREAM_OPS.get(ot)
    if op is None:
        raise _Reject(
            _SCHEMA,
            f"operationType {ot[:40]!r} is not a document change (only insert, update, replace, delete apply)",
        )
    ns = d.get("ns")
    if type(ns) is not dict:
        raise _Reject(_SCHEMA, f"ns is {'missing' if ns is None else _kind(ns)}")
    db = _str_field(ns, "db", "ns")
    coll = _str_field(ns, "coll", "ns")

    ct = d.get("clusterTime")
    if ct is None:
        ts_ms, ord_ = _msg_ts_ms(msg), 0
    else:
        ts = _ext(ct, "clusterTime") if type(ct) in (str, dict) else ct
        if type(ts) is not BsonTimestamp:
            raise _Reject(_SCHEMA, f"clusterTime must be a $timestamp, not {_kind(ct)}")
        ts_ms, ord_ = ts.t * 1000, ts.i

    doc = None if op == "delete" else _doc(d, "fullDocument", "fullDocument")
    dk = _doc(d, "documentKey", "documentKey")
    updated: dict[str, Any] | None = None
    removed: tuple[str, ...] = ()
    if op in ("insert", "replace") and doc is None:
        raise _Reject(_SCHEMA, f"{ot} without fullDocument")
    if op == "update" and doc is None:
        ud = d.get("updateDescription")
        if type(ud) is not dict:
            raise _Reject(_SCHEMA, "update without fullDocument or updateDescription")
        upd = ud.get("updatedFields")
        if upd is not None:
            upd = _ext(upd, "updateDescription.updatedFields")
        updated, removed = _partial(
            upd,
            ud.get("removedFields"),
            ud.get("truncatedArrays"),
            "updateDescription",
            ud.get("disambiguatedPaths"),
        )

    key_id: str | None = None
    if dk is not None and "_id" in dk:
        id_value = dk["_id"]
        if doc is not None and "_id" in doc:
            key_id = extjson.id_text(id_value)
            id_value = doc["_id"]
    elif doc is not None and "_id" in doc:
        id_value = doc["_id"]
    else:
        raise _Reject(_SCHEMA, "no _id: documentKey._id is missing")
    ev = _event(msg, value, db, coll, id_value, op, doc, ts_ms, ord_)
    ev.updated, ev.removed = updated, removed
    return ev, key_id


def _full_document(msg: Any, value: bytes, d: dict) -> tuple[ChangeEvent, str | None]:
    topic = _attr(msg, "topic")
    parts = topic.split(".") if type(topic) is str else []
    if len(parts) < 2:
        raise _Reject(
            _SCHEMA, f"bare document on topic {topic!r}: need <prefix>.<db>.<collection> to name the table"
        )
    # The bare document is the top-level object: skip the walk when no wrapper can be in it.
    doc = extjson.decode(d) if (b'"$' in value or b"\\u0024" in value) else d
    if type(doc) is not dict:
        raise _Reject(_SCHEMA, f"value must be a document, not {_kind(doc)}")
    return _event(msg, value, parts[-2], parts[-1], doc["_id"], "replace", doc, _msg_ts_ms(msg), 0), None
