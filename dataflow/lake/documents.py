"""Rows of a mirror table read back as documents: the inverse of `dataflow.lake.columns`.

An update that reaches inside a field (`a.b`, `arr.1`) changes a value the
pipeline stored earlier, so the writer reads that value back; a rename moves
every document to another table; readers and tests compare documents. Each
field is its value column, or, where that is null, its JSON-text companion.
JSON text is decoded as Extended JSON, the way it was written.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from dataflow.decode import extjson
from dataflow.lake.columns import Column, Layout
from dataflow.model import BsonTimestamp

ID = "_id"


def _values(col: pa.ChunkedArray, column: Column) -> list[Any]:
    values = col.to_pylist()
    if column.kind == "json":
        return [None if v is None else extjson.loads(v) for v in values]
    if column.kind == "bsonts":
        return [None if v is None else BsonTimestamp(v["t"], v["i"]) for v in values]
    return values  # pyarrow gives str, int, float, bool, bytes, date and UTC datetimes as they were


def read_documents(
    dt: DeltaTable,
    layout: Layout,
    *,
    ids: Iterable[str] | None = None,
    fields: Iterable[str] | None = None,
    where: pc.Expression | None = None,
    meta: Iterable[str] = (),
) -> dict[str, dict[str, Any]]:
    """Documents by `_id` text: all, or those of `ids`; every field, or only `fields`.

    `meta` names pipeline columns (`_seq`, `_ts`) to add under their own names.
    A field whose columns are both null is absent (null and absent read the same).
    """
    wanted = set(fields) if fields is not None else None
    columns: list[tuple[str, Column]] = []
    for name, c in layout.value.items():
        if wanted is None or name in wanted:
            columns.append((name, c))
            fb = layout.fallback.get(name)
            if fb is not None:
                columns.append((name, fb))
    names = [ID, *[c.name for _, c in columns], *meta]
    flt = where
    if ids is not None:
        ids = list(ids)
        if not ids:
            return {}
        match = pc.field(ID).isin(ids)
        flt = match if flt is None else (flt & match)
    table = dt.to_pyarrow_dataset().to_table(columns=names, filter=flt)
    docs: dict[str, dict[str, Any]] = {i: {} for i in table.column(ID).to_pylist()}
    order = list(docs)
    rows = table.column(ID).to_pylist()
    for name in meta:
        for i, v in zip(rows, table.column(name).to_pylist(), strict=True):
            docs[i][name] = v
    for name, c in columns:
        for i, v in zip(rows, _values(table.column(c.name), c), strict=True):
            if v is not None and docs[i].get(name) is None:
                docs[i][name] = v
    return {i: docs[i] for i in order}


def table_documents(uri: str, storage_options: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Every document of the mirror table at `uri`, by `_id` text ({} when there is no table)."""
    try:
        dt = DeltaTable(uri, storage_options=storage_options)
    except TableNotFoundError:
        return {}
    return read_documents(dt, Layout.from_schema(pa.schema(dt.schema().to_arrow()), {}))
