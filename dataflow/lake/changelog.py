"""A table's changelog read back as change events: what the materializer applies to the mirror.

The changelog (`<lake>/_changelog/<db>/<collection>` in merge mode) is an
append-only Delta table, one commit per batch, written exactly once by the
sink. The rows a range of its versions added come from delta-rs' change data
feed (`load_cdf`), which skips commits that only rearrange files. Each row
becomes the `ChangeEvent` it was written from: its fields typed back by the
column decisions (`dataflow.lake.documents`) and its overflow object, a top-level partial update with
the fields it set (`_set`, so a field set to null is not mistaken for one left
alone) and removed, an update inside fields with its description (`_change`),
a rename with its target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from dataflow.decode import extjson
from dataflow.decode.updates import Update
from dataflow.lake.columns import Layout
from dataflow.lake.documents import column_values, merge_overflow
from dataflow.lake.writer import row_count
from dataflow.model import DDL_OPS, ChangeEvent

_META = (
    "_id",
    "_key",
    "_seq",
    "_op",
    "_ts",
    "_source_topic",
    "_source_partition",
    "_source_offset",
    "_removed",
    "_change",
    "_set",
    "_replayed",
)


@dataclass(frozen=True, slots=True)
class Version:
    """One changelog commit: how many rows it added, and when (ms since the epoch)."""

    version: int
    rows: int
    timestamp_ms: int


class Changelog:
    """Reads one changelog table; refreshes incrementally."""

    def __init__(
        self, uri: str, db: str, collection: str, storage_options: dict[str, str] | None = None
    ) -> None:
        self.uri = uri
        self.db = db
        self.collection = collection
        self._storage_options = storage_options
        self._dt: DeltaTable | None = None
        # Versions already counted by `pending`: a commit's rows never change, so each later call
        # reads the feed of the versions committed since, not of the whole backlog again.
        self._counted: dict[int, Version] = {}
        self._counted_to = -1  # every version up to here is in `_counted` (those past the floor)
        self._floor = -1  # the versions up to here were let go

    def table(self) -> DeltaTable | None:
        """The latest version, None while there is no changelog."""
        if self._dt is None:
            try:
                self._dt = DeltaTable(self.uri, storage_options=self._storage_options)
            except TableNotFoundError:
                return None
        else:
            self._dt.update_incremental()
        return self._dt

    def pending(self, after: int) -> tuple[list[Version], int]:
        """The versions after `after` that added rows, oldest first, and the latest version.

        Counted from the change feed (one small column), not from the commit
        history: delta-rs labels history entries from the version it loaded,
        so a commit landing in between shifts every label by one.
        """
        dt = self.table()
        if dt is None:
            return [], after
        latest = dt.version()
        if after < self._floor or latest < self._counted_to:  # asked further back, or a new table
            self._counted, self._counted_to, self._floor = {}, -1, -1
        if latest <= after:
            return [], latest
        start = max(after, self._counted_to) + 1
        if start <= latest:
            for v in _count(_feed(dt, start, latest, ["_seq", "_commit_version", "_commit_timestamp"])):
                self._counted[v.version] = v
            self._counted_to = latest
        if after > self._floor:
            self._counted = {k: v for k, v in self._counted.items() if k > after}
            self._floor = after
        return sorted((v for k, v in self._counted.items() if k > after), key=lambda x: x.version), latest

    def row_count(self) -> int:
        """Rows in the changelog now (0 while there is none): it only grows, by the rows committed."""
        dt = self.table()
        return 0 if dt is None else row_count(dt)

    def layout(self) -> Layout:
        dt = self.table()
        assert dt is not None
        return Layout.from_schema(pa.schema(dt.schema().to_arrow()), {})

    def events(self, first: int, last: int) -> list[ChangeEvent]:
        """The changes committed in versions `first`..`last`, in commit order."""
        return self.to_events(self.rows(first, last), self.layout())

    def rows(self, first: int, last: int) -> pa.Table:
        """The rows committed in versions `first`..`last`, in commit order (empty when none)."""
        dt = self.table()
        assert dt is not None
        table = _feed(dt, first, last, None)
        if table is None:
            return pa.schema(dt.schema().to_arrow()).empty_table()
        return _in_commit_order(table)

    def to_events(self, table: pa.Table, layout: Layout) -> list[ChangeEvent]:
        """Changelog rows as the change events they were written from."""
        if table.num_rows == 0:
            return []
        n = table.num_rows
        names = set(table.column_names)
        meta: dict[str, list[Any]] = {
            m: table.column(m).to_pylist() if m in names else [None] * n for m in _META if m != "_ts"
        }
        ts = table.column("_ts").cast(pa.int64()).to_pylist()
        docs: list[dict[str, Any]] = [{} for _ in range(n)]
        for field, col in layout.value.items():
            for c in (col, layout.fallback.get(field)):
                if c is None or c.name not in names:
                    continue
                for i, v in enumerate(column_values(table.column(c.name), c)):
                    if v is not None and field not in docs[i]:
                        docs[i][field] = v
        spill = layout.overflow
        if spill is not None and spill.name in names:  # the fields past the table's column limit
            for i, obj in enumerate(column_values(table.column(spill.name), spill)):
                if obj:
                    merge_overflow(docs[i], obj)
        out = []
        for i in range(n):
            op = meta["_op"][i]
            change = meta["_change"][i]
            change = extjson.loads(change) if change is not None else None
            doc: dict[str, Any] | None = None
            updated: dict[str, Any] | None = None
            removed: tuple[str, ...] = ()
            nested = target = None
            if op in DDL_OPS:
                if op == "rename" and change is not None:
                    target = (change["to"]["db"], change["to"]["coll"])
            elif op == "delete":
                pass
            elif change is not None and "set" in change:
                nested = Update.from_json(change)
            elif meta["_removed"][i] is not None:  # a top-level partial update
                fields = docs[i]
                chosen = meta["_set"][i]
                updated = fields if chosen is None else {f: fields.get(f) for f in chosen}
                removed = tuple(meta["_removed"][i])
            else:
                doc = docs[i]
            out.append(
                ChangeEvent(
                    db=self.db,
                    collection=self.collection,
                    id=meta["_id"][i] or "",
                    key=meta["_key"][i] or "",
                    op=op,
                    doc=doc,
                    ts_ms=ts[i] // 1000 if ts[i] is not None else 0,
                    ord=0,
                    topic=meta["_source_topic"][i],
                    partition=meta["_source_partition"][i],
                    offset=meta["_source_offset"][i],
                    size=0,
                    updated=updated,
                    removed=removed,
                    seq=meta["_seq"][i],
                    change=nested,
                    target=target,
                    replayed=bool(meta["_replayed"][i]),
                )
            )
        return out


_PLAIN = {pa.string_view(): pa.string(), pa.binary_view(): pa.binary()}


def _plain_schema(schema: pa.Schema) -> pa.Schema:
    """The change feed's view types (string_view, binary_view) as the plain types the table has."""
    return pa.schema([f.with_type(_PLAIN.get(f.type, f.type)) for f in schema])


def _in_commit_order(table: pa.Table) -> pa.Table:
    """The feed's rows by commit version, each version's rows in the order read.

    A feed's batches each come from one data file, so one version: they are
    reordered whole, without copying the rows (a round's feed can be a million
    rows wide). A batch that mixes versions falls back to sorting the rows.
    """
    batches, starts = [], []
    for b in table.to_batches():
        if b.num_rows == 0:
            continue
        lo, hi = pc.min_max(b.column("_commit_version")).values()
        if lo != hi:
            return table.take(pc.sort_indices(table, [("_commit_version", "ascending")]))
        batches.append(b)
        starts.append(lo.as_py())
    order = sorted(range(len(batches)), key=starts.__getitem__)  # stable: read order within a version
    return pa.Table.from_batches([batches[i] for i in order], schema=table.schema)


_NO_FEED = "that does not have change data enabled"


def _count(feed: pa.Table | None) -> list[Version]:
    """Each version's rows in a feed, and its commit time."""
    if feed is None or feed.num_rows == 0:
        return []
    counts = feed.group_by("_commit_version").aggregate(
        [("_commit_version", "count"), ("_commit_timestamp", "min")]
    )
    versions = counts.column("_commit_version").to_pylist()
    rows = counts.column("_commit_version_count").to_pylist()
    ts = counts.column("_commit_timestamp_min").cast(pa.int64()).to_pylist()
    return [Version(v, n, t) for v, n, t in zip(versions, rows, ts, strict=True)]


def _feed(dt: DeltaTable, first: int, last: int, columns: list[str] | None) -> pa.Table | None:
    """The rows versions `first`..`last` added (delta-rs' change data feed), with `_commit_version`.

    delta-rs refuses to start a feed at a commit that sets table metadata
    (the creation, added columns) unless the table has
    delta.enableChangeDataFeed; such commits add no rows, so the feed starts
    after them instead.
    """
    while first <= last:
        try:
            reader = pa.RecordBatchReader.from_stream(
                dt.load_cdf(starting_version=first, ending_version=last, columns=columns)
            )
            # batch by batch, so that the feed as read and its plain copy are never both whole
            schema = _plain_schema(reader.schema)
            plain = schema.equals(reader.schema)
            return pa.Table.from_batches([b if plain else b.cast(schema) for b in reader], schema=schema)
        except Exception as e:
            if _NO_FEED not in str(e):
                raise
            first += 1
    return None
