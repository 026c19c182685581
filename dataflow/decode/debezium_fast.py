"""The common Debezium change in one function: an insert or a full-document update.

`events.parse` decodes every envelope through small helpers, each checking and
wording its own errors, then validates the event: a dozen Python calls per
message. Most Debezium messages have one shape: `op` c, r or u, `after` as an
Extended JSON string whose ObjectId or string `_id` the key names, and a plain
namespace. Given the payload `parse` has already read, this builds exactly
that event, with the same checks and the same result, in one function. For
anything else it returns None and `parse` goes on with its general path (from
the same payload), which also words any error. tests/test_debezium_fast.py
compares the two on every message the tests generate and on edits of them.
"""

from __future__ import annotations

from typing import Any

import orjson

from dataflow import speedups
from dataflow.decode import extjson
from dataflow.decode.identity import id_key
from dataflow.decode.order import debezium_seq
from dataflow.decode.validate import MAX_ORD, MAX_SECONDS, check_namespace
from dataflow.model import ChangeEvent, ObjectId, SourceMessage

_KINDS = {"c": "insert", "r": "insert", "u": "update"}


def event(msg: SourceMessage, value: bytes, p: dict[str, Any]) -> ChangeEvent | None:
    """The valid event `events.parse` would make of Debezium payload `p`, or None when not sure of it."""
    native = speedups.native
    if native is None or type(msg) is not SourceMessage:
        return None
    key, _, topic, partition, offset, _, replayed = msg
    if replayed:  # rare: the general path marks it
        return None
    if (
        type(key) is not bytes
        or type(topic) is not str
        or type(partition) is not int
        or type(offset) is not int
    ):
        return None
    try:
        kind = _KINDS.get(p["op"])
        after = p.get("after")
        source = p.get("source")
        if kind is None or type(after) is not str or type(source) is not dict:
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
        doc = extjson.loads(after, path="payload.after")
        if type(doc) is not dict:
            return None
        if not _key_agrees(key, doc.get("_id")):
            return None
        if not native.names_ok(doc):
            return None
    except Exception:  # whatever went wrong, the general path finds it again and words it
        return None
    seq = debezium_seq(ts_ms, ord_, source.get("version"))
    id_value = doc["_id"]
    return ChangeEvent(
        db,
        coll,
        id_value,
        kind,
        doc,
        ts_ms,
        ord_,
        topic,
        partition,
        offset,
        len(value),
        None,
        (),
        key,
        value,
        seq,
        key=id_key(id_value),
    )


def _key_agrees(key: bytes, id_value: Any) -> bool:
    """Whether a Debezium key `{"id": "<Extended JSON>"}` names exactly this ObjectId or string `_id`.

    Anything else (another type, another key shape, a mismatch) is left to the general path.
    """
    t = type(id_value)
    if t is not ObjectId and t is not str:
        return False
    k = orjson.loads(key)
    if type(k) is dict and len(k) == 2 and "schema" in k:
        k = k.get("payload")
    if type(k) is not dict or len(k) != 1:
        return False
    raw = k.get("id")
    if type(raw) is not str:
        return False
    if t is ObjectId and (raw == f'{{"$oid": "{id_value}"}}' or raw == f'{{"$oid":"{id_value}"}}'):
        return True  # Debezium's own spelling (and the compact one): no second parse
    kid = orjson.loads(raw)
    if t is str:
        return type(kid) is str and kid == id_value
    if type(kid) is not dict or len(kid) != 1:
        return False
    oid = kid.get("$oid")
    return type(oid) is str and oid.lower() == id_value
