"""The common Debezium change in one function: an insert or a full-document update.

`events.parse` decodes every envelope through small helpers, each checking and
wording its own errors, then validates the event: a dozen Python calls per
message. Most Debezium messages have one shape: `op` c, r or u, `after` as an
Extended JSON string whose `_id` text appears in the key, and a plain
namespace. Given the payload `parse` has already read, this builds exactly
that event, with the same checks and the same result, in one function. For
anything else it returns None and `parse` goes on with its general path (from
the same payload), which also words any error. tests/test_debezium_fast.py
compares the two on every message the tests generate and on edits of them.
"""

from __future__ import annotations

from typing import Any

from dataflow import speedups
from dataflow.decode import extjson
from dataflow.decode.order import debezium_seq
from dataflow.decode.validate import MAX_ORD, MAX_SECONDS, check_namespace
from dataflow.model import ChangeEvent, SourceMessage

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
        id_value = doc.get("_id")
        # An ObjectId (decoded to its hex) or long string _id found in the key agrees with it.
        if type(id_value) is not str or len(id_value) < 12 or id_value.encode() not in key:
            return None
        if not native.names_ok(doc):
            return None
    except Exception:  # whatever went wrong, the general path finds it again and words it
        return None
    seq = debezium_seq(ts_ms, ord_, source.get("version"))
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
    )
