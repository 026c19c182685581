"""Rows of a mirror table read back as documents: the inverse of `dataflow.lake.columns`.

An update that reaches inside a field (`a.b`, `arr.1`) changes a value the
pipeline stored earlier, so the writer reads that value back; a rename moves
every document to another table; readers and tests compare documents. Each
field is its value column, or, where that is null, its JSON-text companion;
a field without a column (a table past its column limit) is in the row's
overflow object. JSON text is decoded as Extended JSON, the way it was written.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from bson.decimal128 import Decimal128
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from dataflow.decode import extjson
from dataflow.lake.columns import Column, Layout
from dataflow.model import BsonTimestamp, ObjectId, Uuid

ID = "_id"
_FILTERED = ("_key", "_seq", "_deleted", "_source_topic", "_source_partition", "_source_offset")


def column_values(col: pa.ChunkedArray, column: Column) -> list[Any]:
    kind = column.kind
    if kind == "timestamp":  # through the microseconds: a date past year 9999 is no datetime
        return [
            None if v is None else extjson.date_of_ms(v // 1000) for v in col.cast(pa.int64()).to_pylist()
        ]
    values = col.to_pylist()
    if kind == "json":
        return [None if v is None else extjson.loads(v) for v in values]
    if kind == "bsonts":
        return [None if v is None else BsonTimestamp(v["t"], v["i"]) for v in values]
    if kind == "objectid":
        return [None if v is None else ObjectId(v) for v in values]
    if kind == "uuid":
        return [None if v is None else Uuid(v) for v in values]
    if kind == "decimal":
        return [None if v is None else Decimal128(v) for v in values]
    return values  # pyarrow gives str, int, float, bool, bytes and dates as they were


def read_documents(
    dt: DeltaTable,
    layout: Layout,
    *,
    ids: Iterable[str] | None = None,
    fields: Iterable[str] | None = None,
    where: pc.Expression | None = None,
    meta: Iterable[str] = (),
    by: str = ID,
) -> dict[str, dict[str, Any]]:
    """Documents by `_id` text (or by `by`, `_key`): all, or those of `ids`; every field, or only `fields`.

    `meta` names pipeline columns (`_seq`, `_ts`) to add under their own names.
    A field whose columns are both null is absent (null and absent read the same).
    By `_id` text, documents whose `_id`s share a text (42 and "42") share an entry: the last wins.
    """
    wanted = set(fields) if fields is not None else None
    columns: list[tuple[str, Column]] = []
    for name, c in layout.value.items():
        if wanted is None or name in wanted:
            columns.append((name, c))
            fb = layout.fallback.get(name)
            if fb is not None:
                columns.append((name, fb))
    spill = layout.overflow
    if spill is not None and wanted is not None and wanted <= layout.value.keys():
        spill = None  # every field wanted has a column: the overflow holds none of them
    extra_cols = [] if spill is None else [spill.name]
    names = list(dict.fromkeys([by, *[c.name for _, c in columns], *extra_cols, *meta]))
    flt = where
    if ids is not None:
        ids = list(ids)
        if not ids:
            return {}
        match = pc.field(by).isin(ids)
        flt = match if flt is None else (flt & match)
    # Filtered after the read: with a filter, pyarrow compares delta-rs' file statistics
    # (string_view) with the filter's strings, and refuses.
    ds = dt.to_pyarrow_dataset()
    if flt is None:
        table = ds.to_table(columns=names)
    else:  # with the pipeline columns a filter may name
        extra = [n for n in _FILTERED if n in ds.schema.names and n not in names]
        table = ds.to_table(columns=names + extra).filter(flt)
    docs: dict[str, dict[str, Any]] = {i: {} for i in table.column(by).to_pylist()}
    order = list(docs)
    rows = table.column(by).to_pylist()
    for name in meta:
        for i, v in zip(rows, table.column(name).to_pylist(), strict=True):
            docs[i][name] = v
    for name, c in columns:
        for i, v in zip(rows, column_values(table.column(c.name), c), strict=True):
            if v is not None and docs[i].get(name) is None:
                docs[i][name] = v
    if spill is not None:
        for i, obj in zip(rows, column_values(table.column(spill.name), spill), strict=True):
            if obj:
                merge_overflow(docs[i], obj, wanted)
    return {i: docs[i] for i in order}


def merge_overflow(doc: dict[str, Any], obj: dict[str, Any], wanted: set[str] | None = None) -> None:
    """Add an overflow object's fields (those `wanted`) to a document; a column's value wins."""
    for f, v in obj.items():
        if v is not None and (wanted is None or f in wanted) and doc.get(f) is None:
            doc[f] = v


def read_overflow(dt: DeltaTable, layout: Layout, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The stored overflow object of each `_key` in `keys` that has one (a patch rewrites it whole)."""
    keys = list(keys)
    if layout.overflow is None or not keys:
        return {}
    table = dt.to_pyarrow_dataset().to_table(columns=["_key", layout.overflow.name])
    table = table.filter(pc.field("_key").isin(keys))
    out = {}
    for k, obj in zip(
        table.column("_key").to_pylist(),
        column_values(table.column(layout.overflow.name), layout.overflow),
        strict=True,
    ):
        if obj:
            out[k] = obj
    return out


def table_documents(uri: str, storage_options: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Every live document of the mirror table at `uri`, by `_id` text ({} when there is no table)."""
    try:
        dt = DeltaTable(uri, storage_options=storage_options)
    except TableNotFoundError:
        return {}
    schema = pa.schema(dt.schema().to_arrow())
    return read_documents(dt, Layout.from_schema(schema, {}), where=live(schema))


def live(schema: pa.Schema) -> pc.Expression | None:
    """The filter that leaves a mirror's tombstones out (None for a table without them)."""
    if "_deleted" not in schema.names:
        return None
    return pc.invert(pc.coalesce(pc.field("_deleted"), pc.scalar(False)))
