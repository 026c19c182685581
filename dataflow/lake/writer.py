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

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, Field, Transaction, WriterProperties, write_deltalake
from deltalake.exceptions import TableNotFoundError

from dataflow.lake.columns import (
    Column,
    Layout,
    build_arrays,
    field_columns,
)
from dataflow.model import ChangeEvent
from dataflow.runtime.failures import ConfigError, Kind, Unavailable, classify

Mode = Literal["merge", "append"]
Source = tuple[str, int]

_MERGE_META = (
    Column("_id", "string", "meta"),
    Column("_seq", "int64", "meta"),
    Column("_op", "string", "meta"),
    Column("_ts", "timestamp", "meta"),
)
_APPEND_META = (
    *_MERGE_META,
    Column("_source_topic", "string", "meta"),
    Column("_source_partition", "int64", "meta"),
    Column("_source_offset", "int64", "meta"),
    Column("_removed", "other", "meta", arrow_type=pa.list_(pa.string())),
)
_NO_FIELDS: dict[str, Any] = {}
_MODE_KEY = "cdc.mode"  # table property recording the writer mode
_SCHEMA_ATTEMPTS = 3  # schema commits per batch before giving the batch back to the retry layer
# A MERGE rewrites every file it touches, and random updates touch them all. Parquet's
# default row group (1M rows) makes each file one row group; smaller ones made MERGEs
# faster (bench/RESULTS.md, "Parquet row groups"). Any WriterProperties turns delta-rs'
# default compression off, hence SNAPPY, its default, named.
WRITER_PROPERTIES = WriterProperties(max_row_group_size=16_384, compression="SNAPPY")


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

    id: str
    action: Literal["upsert", "patch", "delete"]
    values: dict[str, Any] | None  # upsert: the whole doc; patch: fields set (removed ones as None)
    seq: int
    op: str
    ts_ms: int


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


def _q(name: str) -> str:
    """Quote a column name for a delta-rs SQL expression."""
    return "`" + name.replace("`", "``") + "`"


def _patch_values(e: ChangeEvent) -> dict[str, Any]:
    vals = dict(e.updated or _NO_FIELDS)
    for r in e.removed:
        vals[r] = None
    return vals


def _row(e: ChangeEvent) -> _Row:
    if e.op == "delete":
        return _Row(e.id, "delete", None, e.seq, e.op, e.ts_ms)
    if e.is_partial:
        return _Row(e.id, "patch", _patch_values(e), e.seq, e.op, e.ts_ms)
    return _Row(e.id, "upsert", e.doc or {}, e.seq, e.op, e.ts_ms)


def collapse(events: Iterable[ChangeEvent]) -> list[_Row]:
    """One row per `_id` with the net effect of its events, as delta-rs MERGE needs.

    Order per id: by offset when all its events come from one partition (Kafka
    order is the truth), else by (seq, offset, partition). A partial update
    folds into an earlier full doc, combines with earlier partial updates, and
    after a delete becomes a doc made of just its fields.
    """
    groups: dict[str, list[ChangeEvent]] = {}
    for e in events:
        g = groups.get(e.id)
        if g is None:
            groups[e.id] = [e]
        else:
            g.append(e)
    rows = []
    for evs in groups.values():
        if len(evs) == 1:
            rows.append(_row(evs[0]))
            continue
        if len({e.partition for e in evs}) == 1:
            evs.sort(key=lambda e: e.offset)
        else:
            evs.sort(key=lambda e: (e.seq, e.offset, e.partition))
        row = _row(evs[0])
        if row.values is not None:
            row.values = dict(row.values)
        for e in evs[1:]:
            if e.op == "delete":
                row.action, row.values = "delete", None
            elif not e.is_partial:
                row.action, row.values = "upsert", dict(e.doc or _NO_FIELDS)
            elif row.values is None:  # patch after delete: the doc is just these fields
                row.action, row.values = "upsert", _patch_values(e)
            else:  # onto a patch it combines, onto a full doc it folds in
                row.values.update(_patch_values(e))
            row.seq = max(row.seq, e.seq)
            row.op, row.ts_ms = e.op, e.ts_ms
        rows.append(row)
    return rows


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
        prepared = self._prepare(events)
        if isinstance(prepared, WriteResult):
            return prepared
        return self._commit(prepared)

    def _prepare(self, events: list[ChangeEvent]) -> _Prepared | WriteResult:
        """Refresh, drop what is committed, collapse, evolve the schema, build the Arrow source.

        The txn check must be made on the very table version the data commit
        starts from: delta-rs refuses that commit if a later one recorded the
        same app ids, but not if the check itself looked at an older version.
        Creating the table or adding columns is a commit of its own, in which a
        rival writer may land this batch, so after one the check starts over.
        """
        sources = {(e.topic, e.partition) for e in events}
        added: tuple[str, ...] = ()
        for attempt in range(_SCHEMA_ATTEMPTS):
            dt = self._refresh()
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
            if not fresh:
                return WriteResult(len(events), skipped, 0, None if dt is None else dt.version())

            if self.mode == "merge":
                rows: list[Any] = collapse(fresh)
                docs = [r.values or _NO_FIELDS for r in rows]
            else:
                rows = fresh
                docs = [e.doc if e.doc is not None else (e.updated or _NO_FIELDS) for e in fresh]
            n = len(rows)
            values, kinds = field_columns(docs)

            layout = self._layout(dt)
            new = layout.plan(kinds)
            if new or dt is None:
                try:
                    self._add_columns(dt, layout, new)
                    added += tuple(c.name for c in new)
                except Exception as e:
                    # A rival added the same columns first ("Metadata changed"): look again.
                    if classify(e) is not Kind.UNAVAILABLE or attempt == _SCHEMA_ATTEMPTS - 1:
                        raise
                continue

            arrays = build_arrays(layout, values, kinds)
            arrays.update(self._meta_arrays(rows))
            columns = [arrays[c.name] if c.name in arrays else pa.nulls(n, c.type) for c in layout.columns]
            schema = layout.schema()
            prepared = _Prepared(
                events=len(events),
                skipped=skipped,
                rows=n,
                offsets=offsets,
                source=pa.Table.from_arrays(columns, schema=schema),
                schema=schema,
                new_columns=added,
            )
            if self.mode == "merge":
                self._merge_source(prepared, layout, rows)
            return prepared
        raise Unavailable(
            f"the schema of {self.uri} kept changing under a rival writer; the batch is retried"
        )

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
                },
                storage_options=self._storage_options,
                raise_if_key_not_exists=False,  # lets the custom cdc.mode key through
            )
            return
        dt.alter.add_columns([Field.from_arrow(c.arrow_field()) for c in new])

    def _meta_arrays(self, rows: list[Any]) -> dict[str, pa.Array]:
        out = {
            "_id": pa.array([r.id for r in rows], pa.string()),
            "_seq": pa.array([r.seq for r in rows], pa.int64()),
            "_op": pa.array([r.op for r in rows], pa.string()),
            "_ts": pa.array([r.ts_ms * 1000 for r in rows], pa.int64()).cast(self._meta["_ts"].type),
        }
        if self.mode == "append":
            out["_source_topic"] = pa.array([e.topic for e in rows], pa.string())
            out["_source_partition"] = pa.array([e.partition for e in rows], pa.int64())
            out["_source_offset"] = pa.array([e.offset for e in rows], pa.int64())
            out["_removed"] = pa.array(
                [list(e.removed) if e.is_partial else None for e in rows], pa.list_(pa.string())
            )
        return out

    def _merge_source(self, prepared: _Prepared, layout: Layout, rows: list[_Row]) -> None:
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
        src = prepared.source
        action = layout.claim("__cdc_action")
        src = src.append_column(action, pa.array([r.action for r in rows], pa.string()))
        patch_set: dict[str, str] = {}
        for j, (k, m) in enumerate(masks.items()):
            main = layout.value.get(k)
            if main is None:  # a field removed but never stored: nothing to clear
                continue
            name = layout.claim(f"__cdc_set_{j}")
            src = src.append_column(name, pa.array(m, pa.bool_()))
            for c in (main, layout.fallback.get(k)):
                if c is not None:
                    patch_set[_q(c.name)] = (
                        f"CASE WHEN s.{_q(name)} THEN s.{_q(c.name)} ELSE t.{_q(c.name)} END"
                    )
        actions = {r.action for r in rows}
        cols = [c.name for c in layout.columns]
        guard = "(t.`_seq` IS NULL OR s.`_seq` >= t.`_seq`)"
        prepared.source = src
        prepared.merge = {
            "upsert": {_q(c): f"s.{_q(c)}" for c in cols if c != "_id"} if "upsert" in actions else None,
            "patch": (
                {**patch_set, **{_q(c): f"s.{_q(c)}" for c in ("_seq", "_op", "_ts")}}
                if "patch" in actions
                else None
            ),
            "delete": "delete" in actions,
            "insert": {_q(c): f"s.{_q(c)}" for c in cols},
            "guard": guard,
            "action": _q(action),
        }

    def _commit(self, prepared: _Prepared) -> WriteResult:
        """One commit with the txn actions; on error, decide from the txn versions whether it landed."""
        dt = self._dt
        assert dt is not None
        cp = CommitProperties(
            app_transactions=[Transaction(self.app_id(*src), off) for src, off in prepared.offsets.items()]
        )
        try:
            if prepared.merge is None:
                write_deltalake(
                    dt,
                    prepared.source,
                    mode="append",
                    commit_properties=cp,
                    writer_properties=self._writer_properties,
                )
            else:
                before = dt.version()
                self._execute_merge(dt, prepared, cp)
                if dt.version() == before:
                    # delta-rs makes no commit for a MERGE that changes nothing (all events
                    # stale): record the offsets with an empty append instead.
                    write_deltalake(dt, prepared.schema.empty_table(), mode="append", commit_properties=cp)
        except Exception:
            if not self._landed(prepared.offsets):
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

    def _execute_merge(self, dt: DeltaTable, prepared: _Prepared, cp: CommitProperties) -> None:
        m = prepared.merge
        assert m is not None
        act, guard = m["action"], m["guard"]
        merger = dt.merge(
            prepared.source,
            "t.`_id` = s.`_id`",
            source_alias="s",
            target_alias="t",
            streamed_exec=False,  # batches are small; lets delta-rs prune target files by _id stats
            commit_properties=cp,
            writer_properties=self._writer_properties,
        )
        if m["upsert"] is not None:
            merger = merger.when_matched_update(m["upsert"], predicate=f"s.{act} = 'upsert' AND {guard}")
        if m["patch"] is not None:
            merger = merger.when_matched_update(m["patch"], predicate=f"s.{act} = 'patch' AND {guard}")
        if m["delete"]:
            merger = merger.when_matched_delete(predicate=f"s.{act} = 'delete' AND {guard}")
        merger = merger.when_not_matched_insert(m["insert"], predicate=f"s.{act} <> 'delete'")
        merger.execute()

    def _landed(self, offsets: dict[Source, int]) -> bool:
        """After a failed commit: do the recorded txn versions cover this batch?"""
        try:
            recorded = self._recorded(self._refresh(), offsets)
        except Exception:
            return False
        return all(recorded.get(src, -1) >= off for src, off in offsets.items())

    # ------------------------------------------------------------ maintenance

    def compact(self) -> dict[str, Any]:
        """Rewrite small files into larger ones; run between batches, never beside a MERGE writer."""
        dt = self._refresh()
        if dt is None:
            return {}
        return dt.optimize.compact()
