"""Idempotent writes of change-event batches to one Delta table (merge or append).

Exactly once: every commit carries Delta `txn` actions, app id
`<pipeline>:<topic>:<partition>`, version = highest offset of that partition in
the commit. delta-rs records them but never skips a replay by itself, so before
each write the table is refreshed and events at or below the recorded version
are dropped (offsets are compared, never assumed contiguous). A commit that
raises is resolved the same way: if the recorded versions now cover the batch,
it landed. Retries live in `dataflow.runtime.retry`, not here.

merge mode keeps the collection's current state keyed by `_id`; a `_seq`
column (cluster seconds << 31 | ordinal) guards every update and delete so that
a replayed or late event never overwrites newer state. append mode keeps one
row per event with its source coordinates. Type decisions: `dataflow.lake.columns`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import (
    CommitProperties,
    DeltaTable,
    Field,
    PostCommitHookProperties,
    QueryBuilder,
    Transaction,
    WriterProperties,
    write_deltalake,
)
from deltalake.exceptions import TableNotFoundError

from dataflow.decode.updates import Update
from dataflow.lake.columnar import Direct
from dataflow.lake.columns import (
    ACCEPTS,
    DEFAULT_MAX_COLUMNS,
    Column,
    FirstKind,
    Layout,
    build_arrays,
    field_columns,
    json_array,
    kind_of,
    overflow_objects,
)
from dataflow.lake.documents import read_documents, read_overflow
from dataflow.model import DDL_OPS, ChangeEvent
from dataflow.runtime.failures import ConfigError, Kind, Unavailable, classify

Mode = Literal["merge", "append"]
Source = tuple[str, int]

_SOURCE_META = (
    Column("_source_topic", "string", "meta"),
    Column("_source_partition", "int64", "meta"),
    Column("_source_offset", "int64", "meta"),
)
_ROW_META = (
    Column("_id", "string", "meta"),  # readable; distinct _ids can share a text (42 and "42")
    Column("_key", "string", "meta"),  # which document, by MongoDB's equality: the MERGE key
    Column("_seq", "int64", "meta"),
    Column("_op", "string", "meta"),
    Column("_ts", "timestamp", "meta"),
    *_SOURCE_META,  # where the row's last change came from: offsets order one partition's changes
)
_MERGE_META = (
    *_ROW_META,
    # A tombstone: the document is deleted, its key and sequence stay so that an older change
    # (a replay, another partition) cannot bring it back. Null in rows from before tombstones.
    Column("_deleted", "bool", "meta"),
    # When the tombstone was written (wall clock): its retention runs from here, not from the
    # change's own time, so a backlog of old changes keeps its tombstones while it is read.
    Column("_deleted_at", "timestamp", "meta"),
)
_APPEND_META = (
    *_ROW_META,
    Column("_removed", "other", "meta", arrow_type=pa.list_(pa.string())),
    # JSON text: an update reaching inside fields (`Update.to_json`), or a rename's target
    Column("_change", "json", "meta"),
    # A top-level partial update's fields set: a field set to null reads like one not set
    Column("_set", "other", "meta", arrow_type=pa.list_(pa.string())),
    Column("_replayed", "bool", "meta"),  # a dead letter sent again: its offset says nothing of its age
)
_NO_FIELDS: dict[str, Any] = {}
_MODE_KEY = "cdc.mode"  # table property recording the writer mode
_SCHEMA_ATTEMPTS = 3  # schema commits per batch before giving the batch back to the retry layer
# A MERGE rewrites every file it touches, and random updates touch them all. Parquet's
# default row group (1M rows) makes each file one row group; smaller ones made MERGEs
# faster (bench/RESULTS.md, "Parquet row groups"). Any WriterProperties turns delta-rs'
# default compression off, hence SNAPPY, its default, named.
# Statistics: delta-rs copies each file's Parquet min/max into the commit log, so one 20 MB
# string made a 42 MB commit. The Parquet writer cuts them to STATS_BYTES: a min to a prefix
# (still <= every value), a max to a prefix with its last character incremented (still >=),
# so `_key` pruning (MERGE, `_all_new`) stays right, only less sharp past that length.
# Binary columns get no statistics in the log at all (delta-rs skips them).
STATS_BYTES = 128
WRITER_PROPERTIES = WriterProperties(
    max_row_group_size=16_384, compression="SNAPPY", statistics_truncate_length=STATS_BYTES
)
# After a commit delta-rs deletes log entries past delta.logRetentionDuration on its own. A
# changelog's mirror reads its log from the mirror's mark, however far behind: log clean-up of
# changelogs is left to `dataflow.lake.maintenance`, which keeps what the mirror still reads.
_CHANGELOG_HOOKS = PostCommitHookProperties(create_checkpoint=True, cleanup_expired_logs=False)


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What one `write()` did."""

    events: int  # events passed in
    skipped: int  # dropped: already committed (txn version) or repeated within the batch
    rows_written: int  # rows sent to Delta: collapsed rows (merge) or events (append)
    version: int | None  # table version afterwards; None while the table doesn't exist
    committed: bool = False  # a commit carrying this batch's txn actions landed
    resolved_ambiguous: bool = False  # the commit raised, yet the txn versions show it landed
    offsets: dict[Source, int] = field(default_factory=dict)  # highest offset per source committed
    new_columns: tuple[str, ...] = ()  # columns added for this batch


@dataclass(slots=True)
class _Row:
    """The collapsed effect of a batch's events on one `_id`."""

    key: str
    id: str
    action: Literal["upsert", "patch", "delete"]
    values: dict[str, Any] | None  # upsert: the whole doc; patch: fields set (removed ones as None)
    seq: int | None
    op: str
    ts_ms: int
    topic: str = ""  # the source of the last change applied
    partition: int = -1
    offset: int = -1
    replayed: bool = False  # the last change was a replayed dead letter: only its sequence may order it


@dataclass(slots=True)
class _Prepared:
    events: int
    skipped: int
    rows: int
    offsets: dict[Source, int]
    source: pa.Table
    schema: pa.Schema  # the table's schema (source may carry extra MERGE control columns)
    new_columns: tuple[str, ...]
    merge: dict[str, Any] | None = None  # clause expressions, merge mode only
    marks: dict[str, int] = field(default_factory=dict)  # txn actions beside the offsets: app id -> version
    append_only: bool = False  # merge mode: no row's key is in the table, so the rows are appended


def _q(name: str) -> str:
    """Quote a column name for a delta-rs SQL expression."""
    return "`" + name.replace("`", "``") + "`"


def _sql_timestamp(ms: int) -> str:
    """A timestamp[us, UTC] literal for a delta-rs SQL expression."""
    return f"arrow_cast({int(ms) * 1000}, 'Timestamp(Microsecond, Some(\"UTC\"))')"


def _sql_text(text: str) -> str:
    """A string literal for a delta-rs SQL expression."""
    return "'" + text.replace("'", "''") + "'"


def release_arrow_memory() -> None:
    """Hand the memory Arrow's allocator kept after freeing it back to the system.

    The allocator keeps what a round's feed and its copies freed for reuse,
    but the MERGE allocates through delta-rs' own allocator: what Arrow kept
    would only add to the round's peak.
    """
    pa.default_memory_pool().release_unused()


def _key_range(source: pa.Table) -> str:
    """The MERGE condition's bounds on the target's `_key`: the source's least and greatest.

    Keys with control characters are left out of SQL text; their MERGE scans
    every target file, which gives the same result.
    """
    lo, hi = (v.as_py() for v in pc.min_max(source.column("_key")).values())
    if lo is None or any(ord(c) < 32 for c in lo + hi):
        return ""
    return f" AND t.`_key` >= {_sql_text(lo)} AND t.`_key` <= {_sql_text(hi)}"


def _patch_values(e: ChangeEvent) -> dict[str, Any]:
    vals = dict(e.updated or _NO_FIELDS)
    for r in e.removed:
        vals[r] = None
    return vals


Stored = Callable[[str], dict[str, Any]]  # a key's stored fields (those nested updates touch)


def _no_store(_id: str) -> dict[str, Any]:
    return {}


def _apply_nested(row: _Row, change: Update, stored: Stored) -> None:
    """Fold an update that reaches inside fields into the row: onto its document, or its patch."""
    if row.action == "upsert":
        row.values = change.apply(row.values or {})
        return
    if row.action == "delete":  # the document is gone: the update makes one of just its fields
        row.action, row.values = "upsert", change.apply({})
        return
    values = row.values if row.values is not None else {}
    base = stored(row.key)
    doc = {}
    for f in change.fields():
        v = values[f] if f in values else base.get(f)
        if v is not None:
            doc[f] = v
    after = change.apply(doc)
    for f in change.fields():
        values[f] = after.get(f)
    row.values = values


def _row(e: ChangeEvent, stored: Stored) -> _Row:
    src = (e.topic, e.partition, e.offset, e.replayed)
    if e.op == "delete":
        return _Row(e.key, e.id, "delete", None, e.seq, e.op, e.ts_ms, *src)
    if e.is_partial:
        row = _Row(e.key, e.id, "patch", _patch_values(e), e.seq, e.op, e.ts_ms, *src)
        if e.change is not None:
            _apply_nested(row, e.change, stored)
        return row
    return _Row(e.key, e.id, "upsert", e.doc or {}, e.seq, e.op, e.ts_ms, *src)


def _order(e: ChangeEvent) -> tuple[int, int, int]:
    return (-1 if e.seq is None else e.seq, e.offset, e.partition)


def _in_order(evs: list[ChangeEvent]) -> list[ChangeEvent]:
    """One document's changes in the order they happened.

    Kafka's order is the source's within a partition, so each partition's own
    changes keep their offset order whatever their sequences say. Sequences
    only interleave partitions and place replayed dead letters (whose offsets
    say nothing of their age): sorted by sequence, each partition's changes are
    then put back into the places its changes took, in offset order.
    """
    if len({(e.topic, e.partition) for e in evs}) == 1 and not any(e.replayed for e in evs):
        return sorted(evs, key=lambda e: e.offset)
    out = sorted(evs, key=_order)
    places: dict[Source, list[int]] = {}
    for i, e in enumerate(out):
        if not e.replayed:
            places.setdefault((e.topic, e.partition), []).append(i)
    for idx in places.values():
        if len(idx) > 1:
            for i, e in zip(idx, sorted((out[i] for i in idx), key=lambda e: e.offset), strict=True):
                out[i] = e
    return out


def collapse(events: Iterable[ChangeEvent], stored: Stored = _no_store) -> list[_Row]:
    """One row per `_id` with the net effect of its events, as delta-rs MERGE needs.

    Order per id: `_in_order` (offsets within a partition, sequences between
    partitions and for replayed dead letters). The row carries the sequence
    and source of the last change in that order. A partial update
    folds into an earlier full doc, combines with earlier partial updates, and
    after a delete becomes a doc made of just its fields. An update that
    reaches inside a field applies to the field's value as the batch left it,
    or as `stored(id)` holds it.
    """
    groups: dict[str, list[ChangeEvent]] = {}
    for e in events:
        g = groups.get(e.key)
        if g is None:
            groups[e.key] = [e]
        else:
            g.append(e)
    rows = []
    for evs in groups.values():
        if len(evs) == 1:
            rows.append(_row(evs[0], stored))
            continue
        evs = _in_order(evs)
        row = _row(evs[0], stored)
        if row.values is not None:
            row.values = dict(row.values)
        for e in evs[1:]:
            if e.op == "delete":
                row.action, row.values = "delete", None
            elif not e.is_partial:
                row.action, row.values = "upsert", dict(e.doc or _NO_FIELDS)
            elif row.values is None:  # patch after delete: the doc is just these fields
                row.action, row.values = "upsert", _patch_values(e)
                if e.change is not None:
                    row.values = e.change.apply(row.values)
            elif e.change is not None:
                _apply_nested(row, e.change, stored)
            else:  # onto a patch it combines, onto a full doc it folds in
                row.values.update(_patch_values(e))
            row.seq, row.op, row.ts_ms, row.id = e.seq, e.op, e.ts_ms, e.id  # as the last change left it
            row.topic, row.partition, row.offset, row.replayed = e.topic, e.partition, e.offset, e.replayed
        rows.append(row)
    return rows


def _first_kinds(
    events: list[ChangeEvent], values: dict[str, list[Any]], decided: Layout | None = None
) -> FirstKind:
    """A new field's first non-null value kind in change order (merge rows are collapsed, so the
    events are searched first: what a field held before a later change in the batch counts).
    A field `decided` has a column for (a mirror's changelog) takes that column's kind."""

    def first(field: str) -> str:
        if decided is not None and (c := decided.value.get(field)) is not None and c.kind in ACCEPTS:
            return c.kind
        for e in events:
            for vals in (e.doc, e.updated):
                if vals is not None:
                    v = vals.get(field)
                    if v is not None:
                        return kind_of(type(v)) or "json"
            if e.change is not None:
                for path, v in e.change.set:
                    if path[0] == field:
                        return kind_of(type(v)) if len(path) == 1 and v is not None else "json"
        for v in values.get(field, ()):
            if v is not None:
                return kind_of(type(v)) or "json"
        return "json"

    return first


def _change_of(e: ChangeEvent) -> dict[str, Any] | None:
    """What the changelog's `_change` column says of an event (None for most)."""
    if e.change is not None:
        return e.change.to_json()
    if e.op == "rename" and e.target is not None:
        return {"to": {"db": e.target[0], "coll": e.target[1]}}
    return None


_SOURCES = ("_source_topic", "_source_partition", "_source_offset")
# what a patch sets beside its fields
_PATCH_META = ("_seq", "_op", "_ts", "_deleted", "_deleted_at", *_SOURCES)
_SAME_SOURCE = "t.`_source_topic` = s.`_source_topic` AND t.`_source_partition` = s.`_source_partition`"
# Whether a change may overwrite the stored row. From the row's own partition, a later offset
# always may (Kafka's order is the source's; a crash's re-reads are filtered by the txn versions
# before). From another partition, as a replayed dead letter, or over a row that records no
# source, the sequence decides; without one on either side, arrival order does.
_GUARD = (
    f"(CASE WHEN NOT s.{{replayed}} AND t.`_source_offset` IS NOT NULL AND {_SAME_SOURCE} "
    "THEN s.`_source_offset` > t.`_source_offset` "
    "ELSE (t.`_seq` IS NULL OR s.`_seq` IS NULL OR s.`_seq` >= t.`_seq`) END)"
)


def row_count(dt: DeltaTable) -> int:
    """Rows in a table version, from the file statistics of its log (no data read)."""
    counts = dt.get_add_actions(flatten=True).column("num_records").to_pylist()
    return sum(n for n in counts if n is not None)


def _before(e: ChangeEvent, ddl: ChangeEvent) -> bool:
    """Whether `e` happened before the collection-wide change `ddl`."""
    if e.topic == ddl.topic and e.partition == ddl.partition:
        return e.offset < ddl.offset
    if e.seq is not None and ddl.seq is not None:
        return e.seq < ddl.seq
    return e.ts_ms < ddl.ts_ms


class DeltaTableWriter:
    """Owns one Delta table: refreshes it incrementally, evolves its schema, commits exactly once."""

    def __init__(
        self,
        uri: str,
        *,
        mode: Mode,
        pipeline: str = "cdc",
        storage_options: dict[str, str] | None = None,
        checkpoint_interval: int = 100,
        writer_properties: WriterProperties | None = WRITER_PROPERTIES,
        table_of: Callable[[str, str], DeltaTableWriter] | None = None,
        max_columns: int = DEFAULT_MAX_COLUMNS,
    ) -> None:
        if mode not in ("merge", "append"):
            raise ValueError(f"mode must be 'merge' or 'append', not {mode!r}")
        self.uri = uri
        self.mode: Mode = mode
        self.pipeline = pipeline
        self._storage_options = dict(storage_options) if storage_options else None
        self._checkpoint_interval = checkpoint_interval
        self._writer_properties = writer_properties
        self._meta = {c.name: c for c in (_MERGE_META if mode == "merge" else _APPEND_META)}
        self._dt: DeltaTable | None = None
        self._table_of = table_of  # a rename's target: its changelog's writer, or its mirror's
        self._hooks = _CHANGELOG_HOOKS if mode == "append" else None
        self.max_columns = max_columns  # value columns before fields go to the overflow column
        self.last_merge: dict[str, Any] = {}  # delta-rs' metrics of the last MERGE

    def app_id(self, topic: str, partition: int) -> str:
        """The Delta txn app id under which a source partition's offsets are recorded."""
        return f"{self.pipeline}:{topic}:{partition}"

    @property
    def version(self) -> int | None:
        """Version of the table as last loaded (None before the table exists)."""
        return None if self._dt is None else self._dt.version()

    # ------------------------------------------------------------ reading state

    def _refresh(self) -> DeltaTable | None:
        """Load the latest version: open once, then apply only the new log entries."""
        if self._dt is None:
            try:
                dt = DeltaTable(self.uri, storage_options=self._storage_options)
            except TableNotFoundError:
                return None
            mode = dt.metadata().configuration.get(_MODE_KEY, self.mode)
            if mode != self.mode:
                raise ConfigError(
                    f"{self.uri} is a {mode}-mode table, and this pipeline writes {self.mode} mode "
                    f"(CDC_TABLE_MODE): set CDC_TABLE_MODE to match the lake, or point CDC_LAKE_URI at another one"
                )
            self._dt = dt
        else:
            self._dt.update_incremental()
        return self._dt

    def _recorded(self, dt: DeltaTable | None, sources: Iterable[Source]) -> dict[Source, int]:
        out = {}
        if dt is not None:
            for src in sources:
                v = dt.transaction_version(self.app_id(*src))
                if v is not None:
                    out[src] = v
        return out

    def committed_offsets(self, sources: Iterable[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """Highest committed offset per (topic, partition), for resuming; sources never committed are absent."""
        return self._recorded(self._refresh(), sources)

    def _layout(self, dt: DeltaTable | None) -> Layout:
        if dt is None:
            return Layout(self._meta.values())
        return Layout.from_schema(pa.schema(dt.schema().to_arrow()), self._meta)

    # ------------------------------------------------------------ writing

    def write(self, events: list[ChangeEvent]) -> WriteResult:
        """Commit the events not yet in the table, with their offsets, in one Delta commit.

        Raises what delta-rs raised when a commit failed and did not land.
        """
        if self.mode == "merge" and any(e.op in DDL_OPS for e in events):
            return self._write_with_ddl(events)
        prepared = self._prepare(events)
        if isinstance(prepared, WriteResult):
            return prepared
        return self._commit(prepared)

    def apply(
        self,
        events: list[ChangeEvent],
        mark: tuple[str, int],
        kinds: Layout | None = None,
        direct: Direct | None = None,
        *,
        collapse: Callable[[], tuple[list[ChangeEvent], Direct | None, Layout]] | None = None,
    ) -> WriteResult:
        """Apply changes read back from a changelog to this mirror, recording `mark` (app id, version).

        The mirror records no Kafka offsets (the changelog does); `mark` says
        how far into the changelog it is, in the same commit. A mark already
        at or past `mark[1]` means the changes are applied: nothing is written.
        `kinds`, the changelog's layout, gives new columns the changelog's kind.
        `direct` holds the round's other documents, already collapsed column-wise
        (`dataflow.lake.columnar`): their rows join the same MERGE.
        `collapse`, instead of those three, makes them here: what it returns is
        held only by this call, which lets it go once the MERGE source is built.
        """
        if self.mode != "merge":
            raise ValueError("apply() is for merge-mode tables")
        if collapse is not None:
            events, direct, kinds = collapse()
        if any(e.op in DDL_OPS for e in events):
            if direct is not None:
                raise ValueError("a round with a drop or rename is collapsed in Python only")
            return self._write_with_ddl(events, mark=mark, kinds=kinds)
        prepared = self._prepare(events, record=False, mark=mark, kinds=kinds, direct=direct)
        if collapse is not None:  # in the MERGE source now: a large round's rows go before it runs
            events, direct = [], None
            release_arrow_memory()
        if not isinstance(prepared, WriteResult):
            return self._commit(prepared)
        if not self._marked(self._dt, mark) and self._dt is not None:
            # nothing to write (no rows in the versions, or all recorded by an older mirror)
            self._record_only({}, {mark[0]: mark[1]})
            return dataclasses.replace(prepared, committed=True, version=self.version)
        return prepared

    def rows(self) -> int:
        """Rows in the table as last loaded, from its file statistics (no data read)."""
        return 0 if self._dt is None else row_count(self._dt)

    def layout(self) -> Layout:
        """The table's columns as of its latest version."""
        return self._layout(self._refresh())

    def applied(self, app_id: str) -> int | None:
        """The version recorded under `app_id` (a mirror's mark), None when none is."""
        dt = self._refresh()
        return None if dt is None else dt.transaction_version(app_id)

    def _write_with_ddl(
        self, events: list[ChangeEvent], *, mark: tuple[str, int] | None = None, kinds: Layout | None = None
    ) -> WriteResult:
        """A merge-mode batch holding drops or renames: the events before each, the change, the rest.

        Only the last commit records the batch's offsets. A crash before it
        replays the whole batch, which is safe: every step is idempotent (upserts
        and patches pass the same guard again, the drop deletes what is older
        than it again, a rename's copy is guarded like any upsert).
        """
        dt = self._refresh()
        if mark is not None and self._marked(dt, mark):
            return WriteResult(len(events), len(events), 0, None if dt is None else dt.version())
        sources = {(e.topic, e.partition) for e in events}
        done = self._recorded(dt, sources)
        fresh = [e for e in events if e.offset > done.get((e.topic, e.partition), -1)]
        if not fresh:
            return WriteResult(len(events), len(events), 0, None if dt is None else dt.version())
        ddls = sorted((e for e in fresh if e.op in DDL_OPS), key=_order)
        segments: list[list[ChangeEvent]] = [[] for _ in range(len(ddls) + 1)]
        for e in fresh:
            if e.op not in DDL_OPS:
                segments[sum(1 for d in ddls if not _before(e, d))].append(e)
        written = 0
        for seg, ddl in zip(segments, ddls, strict=False):
            if seg:
                prepared = self._prepare(seg, record=False, kinds=kinds)
                if not isinstance(prepared, WriteResult):
                    self._commit(prepared, record=False)
                    written += prepared.rows
            self._apply_ddl(ddl)
        offsets: dict[Source, int] = {}
        if mark is None:  # a mirror fed from a changelog records its mark, not the changelog's offsets
            for e in fresh:
                if e.offset > offsets.get((e.topic, e.partition), -1):
                    offsets[(e.topic, e.partition)] = e.offset
        marks = {} if mark is None else {mark[0]: mark[1]}
        last = self._prepare(segments[-1], record=False, kinds=kinds) if segments[-1] else None
        if isinstance(last, _Prepared):
            last.offsets, last.events, last.skipped = offsets, len(events), len(events) - len(fresh)
            last.marks = marks
            result = self._commit(last)
            return dataclasses.replace(result, rows_written=result.rows_written + written)
        self._record_only(offsets, marks)
        return WriteResult(
            len(events), len(events) - len(fresh), written, self.version, committed=True, offsets=offsets
        )

    def _ddl_rows(self, ddl: ChangeEvent) -> tuple[str, pc.Expression]:
        """The rows a drop or rename at `ddl` takes, those last changed before it (SQL, and Arrow)."""
        topic, partition, offset = ddl.topic, ddl.partition, ddl.offset
        same = (pc.field("_source_topic") == topic) & (pc.field("_source_partition") == partition)
        same_sql = f"`_source_topic` = {_sql_text(topic)} AND `_source_partition` = {partition}"
        if ddl.seq is None:
            older, older_sql = pc.scalar(True), "true"
        else:
            older = pc.field("_seq").is_null() | (pc.field("_seq") < ddl.seq)
            older_sql = f"(`_seq` IS NULL OR `_seq` < {ddl.seq})"
        expr = pc.if_else(
            pc.field("_source_offset").is_valid() & same, pc.field("_source_offset") < offset, older
        )
        sql = (
            f"CASE WHEN `_source_offset` IS NOT NULL AND {same_sql} THEN `_source_offset` < {offset} "
            f"ELSE {older_sql} END"
        )
        return sql, expr

    def _apply_ddl(self, ddl: ChangeEvent) -> None:
        dt = self._refresh()
        if dt is None:
            return
        layout = self._layout(dt)
        missing = layout.missing(self._meta.values())  # a table from before rows recorded their source
        self._check_keys(dt, missing)
        if missing:
            self._add_columns(dt, layout, missing)
            dt = self._refresh()
            assert dt is not None
        predicate, where = self._ddl_rows(ddl)
        if ddl.op == "rename":
            if ddl.target is None or self._table_of is None:
                raise RuntimeError(
                    f"a rename of {self.uri} needs its target and the writer of the target's table"
                )
            live = pc.invert(pc.coalesce(pc.field("_deleted"), pc.scalar(False)))
            docs = read_documents(dt, layout, where=where & live, meta=("_seq", "_ts", "_id"), by="_key")
            target = self._table_of(*ddl.target)
            # One source "partition" per rename event, so that the target's changelog records each
            # rename's copy once under its own txn app id.
            moved = [
                ChangeEvent(
                    db=ddl.target[0],
                    collection=ddl.target[1],
                    id=d["_id"],
                    key=k,
                    op="replace",
                    doc={f: v for f, v in d.items() if f not in ("_seq", "_ts", "_id")},
                    ts_ms=ddl.ts_ms,
                    ord=0,
                    topic=f"rename:{self.uri}:{ddl.topic}:{ddl.partition}",
                    partition=ddl.offset,
                    offset=n,
                    size=0,
                    seq=d["_seq"],
                )
                for n, (k, d) in enumerate(docs.items())
            ]
            if moved and target.mode == "append":  # the target's changelog: its mirror follows
                target.write(moved)
            elif moved:
                prepared = target._prepare(moved, record=False)
                if not isinstance(prepared, WriteResult):
                    target._commit(prepared, record=False)
        # Every row the change takes becomes a tombstone stamped with it: an older change that
        # arrives late (a replay, another partition) cannot bring a document back.
        tomb = {_q(c.name): "NULL" for c in layout.columns if c.role != "meta"}
        tomb["`_deleted`"] = "true"
        tomb["`_deleted_at`"] = _sql_timestamp(int(time.time() * 1000))
        tomb["`_op`"] = _sql_text(ddl.op)
        tomb["`_source_topic`"] = _sql_text(ddl.topic)
        tomb["`_source_partition`"] = str(ddl.partition)
        tomb["`_source_offset`"] = str(ddl.offset)
        if ddl.seq is not None:
            tomb["`_seq`"] = str(ddl.seq)
        dt.update(updates=tomb, predicate=predicate, writer_properties=self._writer_properties)

    def _check_keys(self, dt: DeltaTable | None, missing: list[Column]) -> None:
        """A mirror with rows but no `_key` column cannot be merged into: its `_id` text is ambiguous.

        Tables written before typed keys hold `_id` as text only, and the text does
        not say whether "42" was a number or a string, or a 24-hex string an
        ObjectId (Debezium's unwrap SMT turns ObjectIds into strings). Guessing
        would duplicate documents, so the pipeline stops instead.
        """
        if self.mode != "merge" or dt is None or not any(c.name == "_key" for c in missing):
            return
        if dt.file_uris():
            raise ConfigError(
                f"the mirror at {self.uri} was written by a version without typed _id keys (no _key "
                "column), and its _id text cannot say which type each _id had: rebuild it by pointing "
                "CDC_LAKE_URI at a new location and reading the topics from the start, or delete the table"
            )

    def _marked(self, dt: DeltaTable | None, mark: tuple[str, int]) -> bool:
        v = None if dt is None else dt.transaction_version(mark[0])
        return v is not None and v >= mark[1]

    def _txns(self, offsets: dict[Source, int], marks: dict[str, int]) -> list[Transaction]:
        return [Transaction(self.app_id(*src), off) for src, off in offsets.items()] + [
            Transaction(app, v) for app, v in marks.items()
        ]

    def _record_only(self, offsets: dict[Source, int], marks: dict[str, int] | None = None) -> None:
        """A commit with no rows: the txn actions alone (a batch whose changes are all applied)."""
        dt = self._refresh()
        if dt is None or not (offsets or marks):
            return
        cp = CommitProperties(app_transactions=self._txns(offsets, marks or {}))
        schema = pa.schema(dt.schema().to_arrow())
        write_deltalake(
            dt,
            schema.empty_table(),
            mode="append",
            commit_properties=cp,
            post_commithook_properties=self._hooks,
        )

    def _prepare(
        self,
        events: list[ChangeEvent],
        *,
        record: bool = True,
        mark: tuple[str, int] | None = None,
        kinds: Layout | None = None,
        direct: Direct | None = None,
    ) -> _Prepared | WriteResult:
        """Refresh, drop what is committed, collapse, evolve the schema, build the Arrow source.

        The txn check must be made on the very table version the data commit
        starts from: delta-rs refuses that commit if a later one recorded the
        same app ids, but not if the check itself looked at an older version.
        Creating the table or adding columns is a commit of its own, in which a
        rival writer may land this batch, so after one the check starts over.
        """
        sources = {(e.topic, e.partition) for e in events}
        added: tuple[str, ...] = ()
        created = False
        total = len(events) + (0 if direct is None else direct.changes)
        if direct is not None and kinds is None:
            kinds = direct.changelog
        for attempt in range(_SCHEMA_ATTEMPTS):
            dt = self._refresh()
            if dt is None and created:
                # Waiting will not bring back a table this writer has just created: the path it
                # writes and the path delta-rs opens differ. A bug, never an outage.
                raise RuntimeError(f"created the Delta table at {self.uri}, and then found none there")
            if mark is not None and self._marked(dt, mark):
                return WriteResult(total, total, 0, None if dt is None else dt.version())
            done = self._recorded(dt, sources)
            fresh: list[ChangeEvent] = []
            offsets: dict[Source, int] = {}
            seen: set[tuple[str, int, int]] = set()
            for e in events:
                src = (e.topic, e.partition)
                key = (e.topic, e.partition, e.offset)
                if e.offset <= done.get(src, -1) or key in seen:
                    continue
                seen.add(key)
                fresh.append(e)
                if e.offset > offsets.get(src, -1):
                    offsets[src] = e.offset
            skipped = len(events) - len(fresh)
            if not fresh and direct is None:
                return WriteResult(len(events), skipped, 0, None if dt is None else dt.version())

            layout = self._layout(dt)
            if self.mode == "merge":
                rows: list[Any] = collapse(fresh, self._stored(dt, layout, fresh))
                docs = [r.values or _NO_FIELDS for r in rows]
            else:
                rows = fresh
                docs = [e.doc if e.doc is not None else (e.updated or _NO_FIELDS) for e in fresh]
            n = len(rows)
            values, field_kinds = field_columns(docs)
            planned = dict(field_kinds)
            if direct is not None:
                for f, ks in direct.kinds().items():
                    planned[f] = planned.get(f, frozenset()) | ks

            missing = layout.missing(self._meta.values())
            self._check_keys(dt, missing)
            new = layout.plan(planned, _first_kinds(fresh, values, kinds), self.max_columns) + missing
            if new or dt is None:
                try:
                    self._add_columns(dt, layout, new)
                    created = created or dt is None
                    added += tuple(c.name for c in new)
                except Exception as e:
                    # A rival added the same columns first ("Metadata changed"): look again.
                    if classify(e) is not Kind.UNAVAILABLE or attempt == _SCHEMA_ATTEMPTS - 1:
                        raise
                continue

            if direct is not None and (
                not direct.fits(layout) or any(layout.overflows(f) for f in direct.kinds())
            ):
                # a rival writer gave a field a column of another kind since the round was split
                raise Unavailable(f"the columns of {self.uri} changed under the round; it is retried")
            spilled = None
            if self.mode == "merge" and layout.overflow is not None:
                spilled = self._overflow_rows(dt, layout, rows, values)
            arrays = build_arrays(layout, values, field_kinds, spilled)
            arrays.update(self._meta_arrays(rows))
            columns = [arrays[c.name] if c.name in arrays else pa.nulls(n, c.type) for c in layout.columns]
            schema = layout.schema()
            source = pa.Table.from_arrays(columns, schema=schema)
            if direct is not None:
                source = pa.concat_tables([source, self._direct_source(direct, layout, schema)])
            prepared = _Prepared(
                events=total,
                skipped=skipped,
                rows=source.num_rows,
                offsets=offsets if record else {},
                source=source,
                schema=schema,
                new_columns=added,
                marks={} if mark is None else {mark[0]: mark[1]},
            )
            if self.mode == "merge":
                keys = pa.array([r.key for r in rows], pa.string())
                ops = pa.array([r.op for r in rows], pa.string())
                if direct is not None:
                    keys = pa.concat_arrays([keys, direct.rows.column("_key").combine_chunks()])
                    ops = pa.concat_arrays([ops, direct.rows.column("_op").combine_chunks()])
                prepared.append_only = self._all_new(dt, keys, ops)
                if not prepared.append_only:
                    self._merge_source(prepared, layout, rows, direct)
            return prepared
        raise Unavailable(
            f"the schema of {self.uri} kept changing under a rival writer; the batch is retried"
        )

    def _all_new(self, dt: DeltaTable | None, keys: pa.Array, ops: pa.Array) -> bool:
        """Whether no row's key is in the table, so appending equals merging (an initial snapshot).

        Checked only when the table is empty or every row is an insert. The keys
        stored within the round's key range are read by delta-rs' own query engine,
        which skips every file whose `_key` statistics lie outside it: ObjectId keys
        grow with time, so new documents usually fall past every file and nothing is
        read at all.
        """
        if dt is None or not dt.file_uris():
            return True
        if not pc.all(pc.equal(ops, "insert")).as_py():
            return False
        keys = pc.take(keys, pc.array_sort_indices(keys))
        low, high = _sql_text(keys[0].as_py()), _sql_text(keys[-1].as_py())
        query = QueryBuilder().register("mirror", dt)
        found = query.execute(f"SELECT `_key` FROM mirror WHERE `_key` >= {low} AND `_key` <= {high}")
        stored = pa.RecordBatchReader.from_stream(found).read_all().column(0).cast(pa.string())
        return not pc.any(pc.is_in(stored, keys)).as_py()

    def _stored(self, dt: DeltaTable | None, layout: Layout, events: list[ChangeEvent]) -> Stored:
        """The stored fields that this batch's updates inside fields start from, read in one scan."""
        nested = [e for e in events if e.change is not None]
        if not nested or dt is None:
            return _no_store
        fields: set[str] = set()
        for e in nested:
            fields |= e.change.fields()
        docs = read_documents(dt, layout, ids={e.key for e in nested}, fields=fields, by="_key")
        return lambda i: docs.get(i, _NO_FIELDS)

    def _overflow_rows(
        self, dt: DeltaTable | None, layout: Layout, rows: list[_Row], values: dict[str, list[Any]]
    ) -> list[dict[str, Any] | None]:
        """Each merge row's overflow object: an upsert's own; a patch's stored one with its changes.

        A patch writes the overflow column whole, so one that sets or removes
        fields without a column starts from the object stored for its key
        (read in one scan) and carries the combined object.
        """
        objs = overflow_objects(layout, values, len(rows))
        patched = [
            i
            for i, r in enumerate(rows)
            if r.action == "patch" and any(layout.overflows(f) for f in r.values or _NO_FIELDS)
        ]
        if not patched:
            return objs
        stored = {} if dt is None else read_overflow(dt, layout, {rows[i].key for i in patched})
        for i in patched:
            r = rows[i]
            obj = dict(stored.get(r.key, _NO_FIELDS))
            for f, v in (r.values or _NO_FIELDS).items():
                if not layout.overflows(f):
                    continue
                if v is None:
                    obj.pop(f, None)
                else:
                    obj[f] = v
            objs[i] = obj or None
        return objs

    def _add_columns(self, dt: DeltaTable | None, layout: Layout, new: list[Column]) -> None:
        """Record new columns, with their type decisions as field metadata, in one commit."""
        if dt is None:
            DeltaTable.create(
                self.uri,
                layout.schema(),
                mode="ignore",  # lost a creation race: the winner's schema is re-read by the caller
                configuration={
                    "delta.checkpointInterval": str(self._checkpoint_interval),
                    _MODE_KEY: self.mode,  # merge and append tables must never be mixed up
                    # a changelog's log is cleaned by maintenance alone, which keeps what the
                    # mirror still reads; other writers' commits (Spark's too) leave it
                    **({"delta.enableExpiredLogCleanup": "false"} if self.mode == "append" else {}),
                },
                storage_options=self._storage_options,
                raise_if_key_not_exists=False,  # lets the custom cdc.mode key through
            )
            return
        dt.alter.add_columns(
            [Field.from_arrow(c.arrow_field()) for c in new], post_commithook_properties=self._hooks
        )

    def _meta_arrays(self, rows: list[Any]) -> dict[str, pa.Array]:
        out = {
            "_id": pa.array([r.id or None for r in rows], pa.string()),  # none for a drop or rename
            "_key": pa.array([r.key or None for r in rows], pa.string()),
            "_seq": pa.array([r.seq for r in rows], pa.int64()),
            "_op": pa.array([r.op for r in rows], pa.string()),
            "_ts": pa.array([r.ts_ms * 1000 for r in rows], pa.int64()).cast(self._meta["_ts"].type),
            "_source_topic": pa.array([r.topic for r in rows], pa.string()),
            "_source_partition": pa.array([r.partition for r in rows], pa.int64()),
            "_source_offset": pa.array([r.offset for r in rows], pa.int64()),
        }
        if self.mode == "append":
            top = [e.is_partial and e.change is None for e in rows]
            out["_removed"] = pa.array(
                [list(e.removed) if t else None for e, t in zip(rows, top, strict=True)],
                pa.list_(pa.string()),
            )
            out["_change"] = json_array([_change_of(e) for e in rows])
            out["_set"] = pa.array(
                [list(e.updated or ()) if t else None for e, t in zip(rows, top, strict=True)],
                pa.list_(pa.string()),
            )
            out["_replayed"] = pa.array([e.replayed for e in rows], pa.bool_())
        else:
            deleted = [r.action == "delete" for r in rows]
            now = int(time.time() * 1_000_000)
            out["_deleted"] = pa.array(deleted, pa.bool_())
            out["_deleted_at"] = pa.array([now if d else None for d in deleted], pa.int64()).cast(
                self._meta["_deleted_at"].type
            )
        return out

    def _direct_source(self, direct: Direct, layout: Layout, schema: pa.Schema) -> pa.Table:
        """The MERGE source rows of documents collapsed column-wise, in the mirror's columns."""
        arrays = direct.arrays(layout)
        n = direct.rows.num_rows
        deleted = pc.equal(arrays["_op"], "delete")
        at = self._meta["_deleted_at"].type
        arrays["_deleted"] = deleted
        arrays["_deleted_at"] = pc.if_else(
            deleted, pa.scalar(int(time.time() * 1_000_000), at), pa.scalar(None, at)
        )
        columns = [
            arrays[c.name].cast(c.type) if c.name in arrays else pa.nulls(n, c.type) for c in layout.columns
        ]
        return pa.Table.from_arrays(columns, schema=schema)

    def _merge_source(
        self, prepared: _Prepared, layout: Layout, rows: list[_Row], direct: Direct | None = None
    ) -> None:
        """Add the action and per-field "set by a patch" columns, and the MERGE clauses using them."""
        n = len(rows)
        masks: dict[str, list[bool]] = {}
        for i, r in enumerate(rows):
            if r.action == "patch":
                for k in r.values:  # type: ignore[union-attr]
                    m = masks.get(k)
                    if m is None:
                        m = masks[k] = [False] * n
                    m[i] = True
        actions = pa.array([r.action for r in rows], pa.string())
        replayed = pa.array([r.replayed for r in rows], pa.bool_())
        set_by: dict[str, pa.Array] = {k: pa.array(m, pa.bool_()) for k, m in masks.items()}
        if direct is not None:  # their rows follow the Python-collapsed ones in the source
            d = direct.rows.num_rows
            actions = pa.concat_arrays([actions, direct.actions()])
            replayed = pa.concat_arrays([replayed, pa.array([False] * d, pa.bool_())])
            theirs = direct.masks()
            for k in set_by.keys() | theirs.keys():
                mine = set_by.get(k, pa.array([False] * n, pa.bool_()))
                set_by[k] = pa.concat_arrays([mine, theirs.get(k, pa.array([False] * d, pa.bool_()))])
        src = prepared.source
        action = layout.claim("__cdc_action")
        src = src.append_column(action, actions)
        replay = layout.claim("__cdc_replayed")
        src = src.append_column(replay, replayed)
        patch_set: dict[str, str] = {}
        spill: pa.Array | None = None  # rows whose patch changes the overflow object
        for j, (k, m) in enumerate(set_by.items()):
            main = layout.value.get(k)
            if main is None and layout.overflows(k):
                spill = m if spill is None else pc.or_(spill, m)
                continue
            if main is None:  # a field removed but never stored: nothing to clear
                continue
            name = layout.claim(f"__cdc_set_{j}")
            src = src.append_column(name, m)
            for c in (main, layout.fallback.get(k)):
                if c is not None:
                    patch_set[_q(c.name)] = (
                        f"CASE WHEN s.{_q(name)} THEN s.{_q(c.name)} ELSE t.{_q(c.name)} END"
                    )
        if spill is not None and layout.overflow is not None:
            name, o = layout.claim("__cdc_set_overflow"), _q(layout.overflow.name)
            src = src.append_column(name, spill)
            patch_set[o] = f"CASE WHEN s.{_q(name)} THEN s.{o} ELSE t.{o} END"
        kinds_of_action = set(pc.unique(actions).to_pylist())
        cols = [c.name for c in layout.columns]
        guard = _GUARD.format(replayed=_q(replay))
        prepared.source = src
        prepared.merge = {
            # a delete writes its tombstone over the row: every field null, `_deleted` set
            "upsert": {_q(c): f"s.{_q(c)}" for c in cols if c != "_key"}
            if kinds_of_action - {"patch"}
            else None,
            "patch": (
                {**patch_set, **{_q(c): f"s.{_q(c)}" for c in ("_id", *_PATCH_META)}}
                if "patch" in kinds_of_action
                else None
            ),
            "insert": {_q(c): f"s.{_q(c)}" for c in cols},
            "guard": guard,
            "action": _q(action),
        }

    def _commit(self, prepared: _Prepared, *, record: bool = True) -> WriteResult:
        """One commit with the txn actions; on error, decide from the txn versions whether it landed.

        Without `record`, the commit carries no txn actions (a step of a batch
        whose last commit records it), and an error is simply raised.
        """
        dt = self._dt
        assert dt is not None
        cp = CommitProperties(app_transactions=self._txns(prepared.offsets, prepared.marks))
        try:
            if prepared.merge is None:
                write_deltalake(
                    dt,
                    prepared.source,
                    mode="append",
                    commit_properties=cp,
                    writer_properties=self._writer_properties,
                    post_commithook_properties=self._hooks,
                )
            else:
                before = dt.version()
                self.last_merge = self._execute_merge(dt, prepared, cp)
                if dt.version() == before and (prepared.offsets or prepared.marks):
                    # delta-rs makes no commit for a MERGE that changes nothing (all events
                    # stale): record the offsets with an empty append instead.
                    write_deltalake(dt, prepared.schema.empty_table(), mode="append", commit_properties=cp)
        except Exception:
            if not record or not self._landed(prepared.offsets, prepared.marks):
                raise
            resolved = True
        else:
            resolved = False
        return WriteResult(
            events=prepared.events,
            skipped=prepared.skipped,
            rows_written=prepared.rows,
            version=dt.version(),
            committed=True,
            resolved_ambiguous=resolved,
            offsets=prepared.offsets,
            new_columns=prepared.new_columns,
        )

    def _execute_merge(self, dt: DeltaTable, prepared: _Prepared, cp: CommitProperties) -> dict[str, Any]:
        m = prepared.merge
        assert m is not None
        act, guard = m["action"], m["guard"]
        merger = dt.merge(
            prepared.source,
            "t.`_key` = s.`_key`" + _key_range(prepared.source),
            source_alias="s",
            target_alias="t",
            # Streamed: the source is in Arrow already, and delta-rs then does not plan over it in
            # memory (`python -m bench.merge_source`). Streamed, delta-rs reads every target
            # file unless the condition bounds `_key`: `_key_range` does, as its in-memory plan did.
            streamed_exec=True,
            commit_properties=cp,
            writer_properties=self._writer_properties,
        )
        if m["upsert"] is not None:
            merger = merger.when_matched_update(m["upsert"], predicate=f"s.{act} <> 'patch' AND {guard}")
        if m["patch"] is not None:
            merger = merger.when_matched_update(m["patch"], predicate=f"s.{act} = 'patch' AND {guard}")
        merger = merger.when_not_matched_insert(m["insert"])  # a delete of an unseen _id: its tombstone
        return merger.execute()

    def _landed(self, offsets: dict[Source, int], marks: dict[str, int] | None = None) -> bool:
        """After a failed commit: do the recorded txn versions cover this batch?"""
        if not offsets and not marks:
            return False
        try:
            dt = self._refresh()
            recorded = self._recorded(dt, offsets)
            got = {app: dt.transaction_version(app) for app in marks or {}} if dt is not None else {}
        except Exception:
            return False
        return all(recorded.get(src, -1) >= off for src, off in offsets.items()) and all(
            (got.get(app) or -1) >= v for app, v in (marks or {}).items()
        )

    # ------------------------------------------------------------ maintenance

    def purge_tombstones(self, before_ms: int) -> int:
        """Delete tombstones written before `before_ms` (wall clock); how many went.

        Past the retention a tombstone no longer guards against anything expected
        (a replay or a lagging partition that late is not), and it costs space.
        """
        dt = self._refresh()
        if dt is None or "_deleted" not in pa.schema(dt.schema().to_arrow()).names:
            return 0
        if "_deleted_at" not in pa.schema(dt.schema().to_arrow()).names:
            return 0
        predicate = f"`_deleted` AND `_deleted_at` < {_sql_timestamp(before_ms)}"
        out = dt.delete(predicate, writer_properties=self._writer_properties)
        return int(out.get("num_deleted_rows", 0) or 0)

    def compact(self) -> dict[str, Any]:
        """Rewrite small files into larger ones; run between batches, never beside a MERGE writer."""
        dt = self._refresh()
        if dt is None:
            return {}
        return dt.optimize.compact()
