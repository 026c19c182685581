"""The common Debezium message in one function: an insert, full-document update or delete.

`events.parse` decodes every envelope through small helpers, each checking and
wording its own errors: a dozen Python calls per message, about 2 of its 13 us
in a microbenchmark. Most messages have one shape: a schema-wrapped Debezium
2.x payload with `op` c, r or u and `after` as an Extended JSON string whose
`_id` text appears in the key, or `op` d with a schema-wrapped key; and a
plain namespace. This decodes exactly those, with the same checks and the same
result, in one function. For anything else it returns None and `parse` takes
its general path, which also words any error. tests/test_debezium_fast.py
compares the two on every message the tests generate and on edits of them.
"""

from __future__ import annotations

from types import ModuleType

import orjson

from dataflow import extjson, speedups
from dataflow.model import ChangeEvent, SourceMessage
from dataflow.validate import MAX_ORD, MAX_SECONDS, check_namespace

_KINDS = {"c": "insert", "r": "insert", "u": "update", "d": "delete"}


def decode(msg: SourceMessage, max_bytes: int) -> ChangeEvent | None:
    """The event `events.parse` would return for `msg`, or None when this cannot be sure of it."""
    native = speedups.native
    if native is None:
        return None
    key, value, topic, partition, offset, _ = msg
    if type(value) is not bytes or type(key) is not bytes or len(value) > max_bytes:
        return None
    if type(topic) is not str or type(partition) is not int or type(offset) is not int:
        return None
    try:
        span = native.payload_span(value)
        if span is None:
            return None
        p = orjson.loads(memoryview(value)[span[0] : span[1]])
        if type(p) is not dict or "operationType" in p or "_id" in p:
            return None  # parse tells these envelopes apart first
        kind = _KINDS.get(p.get("op"))  # type: ignore[arg-type]
        after = p.get("after")
        source = p.get("source")
        if kind is None or type(source) is not dict or (type(after) is not str and kind != "delete"):
            return None
        db = source.get("db")
        coll = source.get("collection")
        ts_ms = source.get("ts_ms")
        ord_ = source.get("ord")
        if ord_ is None:
            ord_ = 0
        if type(db) is not str or type(coll) is not str or type(ts_ms) is not int or type(ord_) is not int:
            return None
        if ts_ms < 0 or ts_ms // 1000 > MAX_SECONDS or not 0 <= ord_ <= MAX_ORD:
            return None
        if check_namespace(db, coll) is not None:
            return None
        if kind == "delete":
            doc = None
            id_value = _key_id(native, key)
            if not id_value:
                return None
        else:
            doc = extjson.loads(after, path="payload.after")
            if type(doc) is not dict:
                return None
            id_value = doc.get("_id")
            # An ObjectId (decoded to its hex) or long string _id found in the key agrees with it.
            if type(id_value) is not str or len(id_value) < 12 or id_value.encode() not in key:
                return None
            if not native.names_ok(doc):
                return None
    except Exception:  # whatever went wrong, parse finds it again and words it
        return None
    return ChangeEvent(
        db, coll, id_value, kind, doc, ts_ms, ord_, topic, partition, offset, len(value), None, (), key, value
    )


def _key_id(native: ModuleType, key: bytes) -> str | None:
    """The string `_id` of a schema-wrapped Debezium key `{"id": "<Extended JSON>"}`, else None."""
    span = native.payload_span(key)
    if span is None:
        return None
    k = orjson.loads(memoryview(key)[span[0] : span[1]])
    raw = k.get("id") if type(k) is dict else None
    if type(raw) is not str:
        return None
    id_value = extjson.loads(raw, path="key.id")
    return id_value if type(id_value) is str else None
