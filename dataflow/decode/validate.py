"""Checks on a decoded ChangeEvent that decoding alone does not make.

`events.py` works out what a message says; these checks decide whether it can be
keyed and stored as a row. A non-None result is the SCHEMA_VALIDATION_FAILED text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from dataflow import speedups
from dataflow.decode.identity import id_key
from dataflow.model import DDL_OPS, ChangeEvent, ExtValue

_OPS = frozenset({"insert", "update", "replace", "delete", "drop", "rename"})
_BAD_DB_CHARS = frozenset('/\\. "$\x00')  # MongoDB refuses these in database names
MAX_SECONDS = 2**32 - 1  # ChangeEvent.seq packs seconds << 31 into an int64 (BSON t is uint32)
MAX_ORD = 0x7FFFFFFF  # ... and the ordinal within the second into the low 31 bits


_GOOD_NAMESPACES: set[tuple[str, str]] = set()  # checked once each: a pipeline sees a handful


def check_namespace(db: str, collection: str) -> str | None:
    """Error text if `db` / `collection` cannot be MongoDB names (they become table paths)."""
    if type(db) is str and type(collection) is str and (db, collection) in _GOOD_NAMESPACES:
        return None
    if type(db) is not str or not db or not _BAD_DB_CHARS.isdisjoint(db):
        return f"invalid database name {db!r}"
    if type(collection) is not str or not collection or "\x00" in collection or "$" in collection:
        return f"invalid collection name {collection!r}"
    if len(_GOOD_NAMESPACES) < 10_000:
        _GOOD_NAMESPACES.add((db, collection))
    return None


def check_field_names(names: Iterable[str]) -> str | None:
    """Error text if a top-level field name is empty or holds NUL (they become columns)."""
    native = speedups.native
    if native is not None and type(names) is dict and native.names_ok(names):
        return None
    for name in names:
        if not name or "\x00" in name:
            return f"invalid field name {name!r}"
    return None


# Text that may hold what BSON cannot: a NUL in a field name (JSON must escape it), or an
# integer of 2**63 or more (orjson reads up to 2**64 - 1). The C walk notes both as it decodes;
# without it, only a message whose bytes may hold one is walked here.
_NUL = b"\\u0000"
_WIDE_INT = re.compile(rb"9[2-9][0-9]{17}|[0-9]{20}")
_INT64_MAX = 2**63 - 1


def _bson_problem(value: Any, path: str) -> str | None:
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        v, where = stack.pop()
        t = type(v)
        if t is dict:
            for k, x in v.items():
                if "\x00" in k:
                    return f"field name {k!r} at {where or '<root>'} holds a NUL character"
                stack.append((x, f"{where}.{k}" if where else k))
        elif t is list or t is tuple:
            stack.extend((x, f"{where}[{i}]") for i, x in enumerate(v))
        elif t is ExtValue:
            stack.append((v.canonical, where))
        elif t is int and v > _INT64_MAX:
            return f"integer {v} at {where or '<root>'} is beyond int64, the widest BSON integer"
    return None


def bson_problem(ev: ChangeEvent, raw: bytes) -> str | None:
    """Error text if the event holds a value BSON cannot (the INVALID_BSON text), else None."""
    if speedups.native is not None:
        return None  # the C walk has found both while decoding (`extjson.decode`)
    if _NUL not in raw and _WIDE_INT.search(raw) is None:
        return None
    if ev.doc is not None:
        return _bson_problem(ev.doc, "")
    if ev.updated is not None:
        err = _bson_problem(ev.updated, "")
        if err:
            return err
    if ev.change is not None:
        for path, v in ev.change.set:
            err = _bson_problem(v, ".".join(map(str, path)))
            if err:
                return err
    return None


def _check_ddl(ev: ChangeEvent) -> str | None:
    err = check_namespace(ev.db, ev.collection or "-")  # no collection: a dropDatabase
    if err:
        return err
    if ev.target is not None:
        err = check_namespace(*ev.target)
        if err:
            return f"rename target: {err}"
    return None


def check_event(ev: ChangeEvent, key_id: str | None = None) -> str | None:
    """Error text if `ev` cannot be applied, else None.

    `key_id` is the `_id` key (`identity.id_key`) the message key (or change-stream documentKey)
    carried, when it differs in origin from the one in `ev.doc`; they must agree.
    """
    if ev.ts_ms < 0 or ev.ts_ms // 1000 > MAX_SECONDS:
        return f"ts_ms {ev.ts_ms} cannot be sequenced (must be 0 <= seconds < 2**32)"
    if not 0 <= ev.ord <= MAX_ORD:
        return f"ord {ev.ord} is outside 0..2**31-1"
    if ev.op in DDL_OPS:
        return _check_ddl(ev)
    if not ev.id:
        return "empty _id"
    if key_id is not None and key_id != ev.key:
        return f"key _id {key_id!r} disagrees with document _id {ev.key!r}"
    if ev.op not in _OPS:  # pragma: no cover - the decoder makes only these
        return f"unknown op {ev.op!r}"
    err = check_namespace(ev.db, ev.collection)
    if err:
        return err
    doc = ev.doc
    if doc is not None:
        if "_id" not in doc:
            return "document has no _id"
        if id_key(doc["_id"]) != ev.key:
            return f"document _id {id_key(doc['_id'])!r} disagrees with event key {ev.key!r}"
        return check_field_names(doc)
    if ev.op == "delete":
        return None
    if ev.op != "update":
        return f"{ev.op} without a document"
    if ev.change is not None:
        fields = ev.change.fields()
        return "update changes _id" if "_id" in fields else check_field_names(fields)
    updated = ev.updated if ev.updated is not None else {}
    removed = ev.removed
    err = check_field_names(updated) or check_field_names(removed)
    if err:
        return err
    if "_id" in removed:
        return "partial update removes _id"
    if "_id" in updated and id_key(updated["_id"]) != ev.key:
        return "partial update changes _id"
    if removed and not updated.keys().isdisjoint(removed):
        return f"fields both set and removed: {sorted(updated.keys() & set(removed))}"
    return None
