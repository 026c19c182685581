"""A round's changes collapsed column by column, for the documents where that is exact.

Turning every changelog row back into a `ChangeEvent` and collapsing them in
Python cost a round about as much CPU per change as ingest spends per event
(bench/RESULTS.md, "Table size"). Most documents need none of it: when all of
a document's changes in the round come from one partition (Kafka keeps their
order) and none is a replayed dead letter, its net effect is its last change
alone if that one is a whole document or a delete, and its only change if that
is a top-level partial update. Those rows go to the MERGE straight from the
changelog's columns. The rest (updates inside fields, partial updates after
other changes, several partitions, replays, rows of older changelogs without
`_set`) go the Python way, `dataflow.lake.writer.collapse`, with the same result.
So does a round that touches fields without a column (a table past its column
limit): an overflow object is JSON text a patch must combine with the stored one.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from dataflow.lake.columns import ACCEPTS, DEFAULT_MAX_COLUMNS, Layout
from dataflow.model import DDL_OPS

# The changelog's row metadata a mirror row takes over as it is.
ROW_META = ("_id", "_key", "_seq", "_op", "_ts", "_source_topic", "_source_partition", "_source_offset")


@dataclass(frozen=True, slots=True)
class Direct:
    """One changelog row per document: its last change, which alone is the round's effect on it."""

    rows: pa.Table
    changelog: Layout  # the changelog's columns: which column holds which field, as what
    changes: int  # changelog rows these documents had in the round

    @property
    def partial(self) -> pa.Array:
        """Which rows are top-level partial updates (the rest are whole documents and deletes)."""
        return _valid(self.rows, "_removed")

    def actions(self) -> pa.Array:
        """The MERGE action of each row: upsert, patch or delete."""
        op = self.rows.column("_op").combine_chunks()
        kind = pc.if_else(self.partial, pa.scalar("patch"), pa.scalar("upsert"))
        return pc.if_else(pc.equal(op, "delete"), pa.scalar("delete"), kind)

    def masks(self) -> dict[str, pa.Array]:
        """Per field a partial update sets or removes: which rows do."""
        n = self.rows.num_rows
        touched: dict[str, list[pa.Array]] = {}
        for name in ("_set", "_removed"):
            lists = self.rows.column(name).combine_chunks()
            flat, parents = pc.list_flatten(lists), pc.list_parent_indices(lists)
            for field in pc.unique(flat).to_pylist():
                touched.setdefault(field, []).append(pc.filter(parents, pc.equal(flat, field)))
        if not touched:
            return {}
        positions = pa.array(range(n), pa.int64())
        return {
            f: pc.is_in(positions, value_set=pa.concat_arrays([r.cast(pa.int64()) for r in rows]))
            for f, rows in touched.items()
        }

    def kinds(self) -> dict[str, frozenset[str]]:
        """Per field with a value in these rows, the kinds it holds (as `columns.field_kinds` says)."""
        out: dict[str, frozenset[str]] = {}
        for field, c in self.changelog.value.items():
            ks: set[str] = set()
            if _has_values(self.rows, c.name):
                ks.add(c.kind)
            fb = self.changelog.fallback.get(field)
            if fb is not None and _has_values(self.rows, fb.name):
                ks.add("json")
            if ks:
                out[field] = frozenset(ks)
        return out

    def fits(self, mirror: Layout) -> bool:
        """Whether every field with a value here has a mirror column of the same kind, or none yet."""
        for field in self.kinds():
            main, c = mirror.value.get(field), self.changelog.value[field]
            if main is not None and (main.kind != c.kind or not main.type.equals(c.type)):
                return False
        return True

    def arrays(self, mirror: Layout) -> dict[str, pa.Array]:
        """The mirror's field columns and row metadata for these rows, by mirror column name."""
        out = {m: self.rows.column(m).combine_chunks() for m in ROW_META}
        # Only columns with values: `fits` checked their kinds; an all-null column of another kind
        # (a field these rows do not hold) may not even cast, and is left null.
        for field, main in mirror.value.items():
            c = self.changelog.value.get(field)
            if c is not None and _has_values(self.rows, c.name):
                out[main.name] = self.rows.column(c.name).combine_chunks().cast(main.type)
            fb, cfb = mirror.fallback.get(field), self.changelog.fallback.get(field)
            if fb is not None and cfb is not None and _has_values(self.rows, cfb.name):
                out[fb.name] = self.rows.column(cfb.name).combine_chunks().cast(fb.type)
        return out


def _valid(table: pa.Table, name: str) -> pa.Array:
    if name not in table.column_names:
        return pa.array([False] * table.num_rows, pa.bool_())
    return pc.is_valid(table.column(name).combine_chunks())


def _has_values(table: pa.Table, name: str) -> bool:
    return name in table.column_names and table.column(name).null_count < table.num_rows


def _spills(feed: pa.Table, changelog: Layout, mirror: Layout, max_columns: int) -> bool:
    """Whether the round touches a field without a column, in the changelog or the mirror.

    Wide documents are rare: such a round goes the Python way whole, which
    combines overflow objects (`DeltaTableWriter._overflow_rows`).
    """
    if changelog.overflow is not None and _has_values(feed, changelog.overflow.name):
        return True
    fields = {f for f, c in changelog.value.items() if _has_values(feed, c.name)}
    for name in ("_set", "_removed"):
        if name in feed.column_names:
            fields.update(v for v in pc.unique(pc.list_flatten(feed.column(name))).to_pylist() if v)
    if changelog.overflow is not None and any(f not in changelog.value for f in fields):
        return True  # a partial update removing a field the changelog keeps in its overflow
    new = [f for f in fields if f not in mirror.value]
    return bool(new) and (mirror.overflow is not None or len(mirror.value) + len(new) > max_columns)


def split(
    feed: pa.Table, changelog: Layout, mirror: Layout, max_columns: int = DEFAULT_MAX_COLUMNS
) -> tuple[Direct | None, pa.Table]:
    """The documents whose changes collapse column-wise, and the changelog rows of all others.

    `feed` is a round's changelog rows in commit order; the rows returned keep
    that order. None when no document qualifies, or when the round holds a drop
    or rename (those split the round in the writer), fields whose mirror
    columns hold another kind (a mirror from an older version), or fields
    without a column (`_spills`; `max_columns` is the mirror's limit): then
    every row goes the Python way.
    """
    n = feed.num_rows
    if n == 0 or "_set" not in feed.column_names:
        return None, feed
    op = feed.column("_op").combine_chunks()
    if pc.any(pc.is_in(op, value_set=pa.array(sorted(DDL_OPS), pa.string()))).as_py():
        return None, feed
    if any(c.kind not in ACCEPTS for c in (*changelog.value.values(), *changelog.fallback.values())):
        return None, feed
    if _spills(feed, changelog, mirror, max_columns):
        return None, feed
    order = pc.sort_indices(feed, [("_key", "ascending"), ("_source_offset", "ascending")])
    s = feed.select(["_key", "_source_topic", "_source_partition"]).take(order)
    key, topic, part = (s.column(c).combine_chunks() for c in ("_key", "_source_topic", "_source_partition"))
    replayed = pc.take(pc.fill_null(_column(feed, "_replayed", pa.bool_()), False), order)
    partial = pc.take(_valid(feed, "_removed"), order)
    nested = pc.take(_valid(feed, "_change"), order)
    legacy = pc.and_(partial, pc.invert(pc.take(_valid(feed, "_set"), order)))

    first = pa.array([True], pa.bool_())
    if n > 1:
        differs = pc.not_equal(key.slice(1), key.slice(0, n - 1))
        start = pa.concat_arrays([first, differs])
        end = pa.concat_arrays([differs, first])
        # another source than the row before it, within the document's run
        moved = pc.or_(
            pc.not_equal(topic.slice(1), topic.slice(0, n - 1)),
            pc.not_equal(part.slice(1), part.slice(0, n - 1)),
        )
        other = pc.and_(pa.concat_arrays([pa.array([False]), moved]), pc.invert(start))
    else:
        start = end = first
        other = pa.array([False])
    bad = pc.cast(pc.or_(replayed, other), pa.int64())
    starts, ends = pc.indices_nonzero(start), pc.indices_nonzero(end)
    seen = pc.cumulative_sum(bad)
    bad_runs = pc.greater(
        pc.subtract(pc.take(seen, ends), pc.subtract(pc.take(seen, starts), pc.take(bad, starts))), 0
    )
    length = pc.add(pc.subtract(ends, starts), 1)
    last_partial = pc.take(partial, ends)
    simple = pc.and_(
        pc.invert(pc.or_(pc.or_(bad_runs, pc.take(nested, ends)), pc.take(legacy, ends))),
        pc.or_(pc.invert(last_partial), pc.equal(length, 1)),
    )
    if not pc.any(simple).as_py():
        return None, feed
    direct = Direct(
        rows=feed.take(pc.take(order, pc.filter(ends, simple))),
        changelog=changelog,
        changes=pc.sum(pc.filter(length, simple)).as_py(),
    )
    if not direct.fits(mirror):
        return None, feed
    run = pc.subtract(pc.cumulative_sum(pc.cast(start, pa.int64())), 1)
    rest = pc.filter(order, pc.invert(pc.take(simple, run)))
    return direct, feed.take(pc.take(rest, pc.array_sort_indices(rest)))


def _column(table: pa.Table, name: str, type_: pa.DataType) -> pa.Array:
    if name not in table.column_names:
        return pa.nulls(table.num_rows, type_)
    return table.column(name).combine_chunks()
