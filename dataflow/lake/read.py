"""Fresh reads: a collection as of its last committed batch, though its mirror may trail.

The mirror holds everything up to its mark; the changelog holds the rest. A
fresh read takes the mirror's rows and applies the changelog's later changes
to them in memory, by the rules the materializer's MERGE follows (the same
collapse, the same guard, tombstones for deletes). For inspection, tests and
small collections: it holds the documents it returns in memory. SQL readers
get the same with the query in the README.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from dataflow.lake.changelog import Changelog
from dataflow.lake.columns import Layout
from dataflow.lake.documents import read_documents
from dataflow.lake.layout import TableLocations
from dataflow.lake.mirror import mark_app
from dataflow.lake.writer import _before, _order, collapse
from dataflow.model import DDL_OPS, ChangeEvent

_META = ("_id", "_seq", "_deleted", "_source_topic", "_source_partition", "_source_offset")


def current_documents(
    lake_uri: str,
    db: str,
    collection: str,
    *,
    storage_options: dict[str, str] | None = None,
    pipeline: str = "cdc",
    ids: Iterable[str] | None = None,
    deleted: bool = False,
) -> dict[str, dict[str, Any]]:
    """The collection's documents by MongoDB key (`_key`), each with its `_id` text under "_id".

    `ids`: only these `_id`s (their text). `deleted`: tombstones too, as
    `{"_id": ..., "_deleted": True}`. In an append-mode lake there is no
    mirror: the changelog alone is folded.
    """
    tables = TableLocations(lake_uri, "merge")
    wanted = None if ids is None else set(ids)
    state: dict[str, dict[str, Any]] = {}
    mark = -1
    try:
        dt: DeltaTable | None = DeltaTable(
            tables.uri(db, collection, "merge"), storage_options=storage_options
        )
    except TableNotFoundError:
        dt = None
    changelog_uri = tables.uri(db, collection, "append")
    if dt is not None and dt.metadata().configuration.get("cdc.mode") == "append":
        changelog_uri, dt = tables.uri(db, collection, "merge"), None  # an append-mode lake: the changelog
    if dt is not None:
        mark = dt.transaction_version(mark_app(pipeline))
        mark = -1 if mark is None else mark
        schema = pa.schema(dt.schema().to_arrow())
        where = None if wanted is None else pc.field("_id").isin(pa.array(sorted(wanted), pa.string()))
        meta = tuple(m for m in _META if m in schema.names)
        state = read_documents(dt, Layout.from_schema(schema, {}), where=where, meta=meta, by="_key")
    log = Changelog(changelog_uri, db, collection, storage_options)
    pending, latest = log.pending(mark)
    if pending:
        events = log.events(mark + 1, latest)
        if wanted is not None:
            events = [e for e in events if e.op in DDL_OPS or e.id in wanted]
        _fold(state, events)
    keep = ("_id", "_deleted") if deleted else ("_id",)
    return {
        k: {f: v for f, v in d.items() if f in keep or not f.startswith("_")}
        for k, d in state.items()
        if deleted or not d.get("_deleted")
    }


def _fold(state: dict[str, dict[str, Any]], events: list[ChangeEvent]) -> None:
    """Apply changes to documents in memory, as the MERGE would (see `DeltaTableWriter._merge_source`)."""
    ddls = sorted((e for e in events if e.op in DDL_OPS), key=_order)
    segments: list[list[ChangeEvent]] = [[] for _ in range(len(ddls) + 1)]
    for e in events:
        if e.op not in DDL_OPS:
            segments[sum(1 for d in ddls if not _before(e, d))].append(e)
    for i, seg in enumerate(segments):
        stored = lambda k: {f: v for f, v in state.get(k, {}).items() if not f.startswith("_")}  # noqa: E731
        for row in collapse(seg, stored):
            old = state.get(row.key)
            if old is not None and not _may(old, row.seq, row.topic, row.partition, row.offset, row.replayed):
                continue
            if row.action == "patch" and old is not None:
                doc = {f: v for f, v in old.items() if not f.startswith("_")}
                for f, v in (row.values or {}).items():
                    if v is None:
                        doc.pop(f, None)
                    else:
                        doc[f] = v
            else:
                doc = {f: v for f, v in (row.values or {}).items() if v is not None and f != "_id"}
            state[row.key] = {
                "_id": row.id,
                **doc,
                "_seq": row.seq,
                "_deleted": row.action == "delete",
                "_source_topic": row.topic,
                "_source_partition": row.partition,
                "_source_offset": row.offset,
            }
        if i < len(ddls):
            d = ddls[i]
            for k, old in state.items():
                if not old.get("_deleted") and _older(old, d):
                    state[k] = {
                        "_id": old["_id"],
                        "_seq": d.seq if d.seq is not None else old.get("_seq"),
                        "_deleted": True,
                        "_source_topic": d.topic,
                        "_source_partition": d.partition,
                        "_source_offset": d.offset,
                    }


def _may(
    old: dict[str, Any], seq: int | None, topic: str, partition: int, offset: int, replayed: bool
) -> bool:
    """The MERGE's guard: may a change overwrite the stored row?"""
    if (
        not replayed
        and old.get("_source_offset") is not None
        and old.get("_source_topic") == topic
        and old.get("_source_partition") == partition
    ):
        return offset > old["_source_offset"]
    return old.get("_seq") is None or seq is None or seq >= old["_seq"]


def _older(old: dict[str, Any], ddl: ChangeEvent) -> bool:
    """Whether a stored row was last changed before a drop or rename (`_ddl_rows`)."""
    if (
        old.get("_source_offset") is not None
        and old.get("_source_topic") == ddl.topic
        and old.get("_source_partition") == ddl.partition
    ):
        return old["_source_offset"] < ddl.offset
    return ddl.seq is None or old.get("_seq") is None or old["_seq"] < ddl.seq
