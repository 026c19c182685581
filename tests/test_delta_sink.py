"""DeltaTableWriter against real Delta tables (local directories; `lake_uri` can later point at S3)."""

from __future__ import annotations

import math
import os
from datetime import UTC, datetime
from typing import Any

import orjson
import pyarrow as pa
import pytest
from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError

from dataflow.lake.writer import DeltaTableWriter
from dataflow.model import BsonTimestamp, ChangeEvent
from dataflow.runtime.failures import ConfigError
from tests.harness import BASE_MS, TOPIC, ev

ROW_META = {"_id", "_key", "_seq", "_op", "_ts", "_source_topic", "_source_partition", "_source_offset"}
MERGE_META = ROW_META | {"_deleted", "_deleted_at"}
APPEND_META = ROW_META | {"_removed", "_change", "_set", "_replayed"}


@pytest.fixture
def lake_uri(tmp_path) -> str:
    return str(tmp_path / "lake" / "shop" / "orders")


@pytest.fixture
def storage_options() -> dict[str, str] | None:
    return None


@pytest.fixture
def writer(lake_uri, storage_options):
    """A factory: each call is a fresh writer object, as after a process restart."""

    def make(mode: str = "merge", **kw: Any) -> DeltaTableWriter:
        return DeltaTableWriter(lake_uri, mode=mode, storage_options=storage_options, **kw)

    return make


def table(uri: str, storage_options: dict[str, str] | None = None) -> DeltaTable:
    return DeltaTable(uri, storage_options=storage_options)


def rows(uri: str, storage_options: dict[str, str] | None = None) -> list[dict[str, Any]]:
    return table(uri, storage_options).to_pyarrow_table().to_pylist()


def state(uri: str, storage_options: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """The merge table as {_id: {field: value}}, without metadata columns, nulls or tombstones."""
    return {
        r["_id"]: {k: v for k, v in r.items() if k not in MERGE_META and v is not None}
        for r in rows(uri, storage_options)
        if not r["_deleted"]
    }


def reference(events: list[ChangeEvent]) -> dict[str, dict[str, Any]]:
    """Independent model: apply events one by one in offset order, like MongoDB did."""
    out: dict[str, dict[str, Any]] = {}
    for e in sorted(events, key=lambda e: e.offset):
        if e.op == "delete":
            out.pop(e.id, None)
        elif e.doc is not None:
            out[e.id] = {k: v for k, v in e.doc.items() if k != "_id" and v is not None}
        else:
            d = out.setdefault(e.id, {})  # partial update without a row: its fields become the row
            d.update(e.updated or {})
            for k in e.removed:
                d.pop(k, None)
    return {i: {k: v for k, v in d.items() if v is not None} for i, d in out.items()}  # null == absent


def schema_meta(uri: str, storage_options=None) -> dict[str, dict[str, str]]:
    s = pa.schema(table(uri, storage_options).schema().to_arrow())
    return {f.name: {k.decode(): v.decode() for k, v in (f.metadata or {}).items()} for f in s}


# ------------------------------------------------------------------ merge mode


def test_insert_update_replace_delete_partial_match_reference(writer, lake_uri, storage_options):
    w = writer()
    batches = [
        [
            ev("a", doc={"name": "ann", "qty": 1}, offset=0),
            ev("b", doc={"name": "bob", "qty": 2, "tag": "x"}, offset=1),
            ev("c", doc={"name": "cy"}, offset=2),
        ],
        [
            ev("a", "update", updated={"qty": 5}, offset=3),
            ev("b", "replace", doc={"name": "bobby"}, offset=4),
            ev("c", "delete", offset=5),
            ev("d", doc={"name": "di", "qty": 7, "tag": "y"}, offset=6),
        ],
        [
            ev("d", "update", updated={"qty": 8}, removed=("tag",), offset=7),
            ev("a", "update", doc={"name": "ann2", "qty": 6}, offset=8),  # update with full doc
            ev("e", "update", updated={"qty": 9}, offset=9),  # no row yet
        ],
    ]
    seen: list[ChangeEvent] = []
    for batch in batches:
        result = w.write(batch)
        assert result.committed and result.skipped == 0
        seen += batch
        assert state(lake_uri, storage_options) == reference(seen)
    assert state(lake_uri, storage_options) == {
        "a": {"name": "ann2", "qty": 6},
        "b": {"name": "bobby"},
        "d": {"name": "di", "qty": 8},
        "e": {"qty": 9},
    }
    by_id = {r["_id"]: r for r in rows(lake_uri, storage_options)}
    assert by_id["d"]["_op"] == "update"
    assert by_id["d"]["_seq"] == batches[2][0].seq
    assert by_id["d"]["_ts"] == datetime.fromtimestamp((BASE_MS + 7000) / 1000, UTC)
    assert w.committed_offsets([(TOPIC, 0)]) == {(TOPIC, 0): 9}


def test_collapse_within_one_batch(writer, lake_uri, storage_options):
    w = writer()
    first = [
        ev("c", doc={"x": 1}, offset=0),
        ev("e", doc={"x": 1, "y": 2}, offset=1),
        ev("f", doc={"x": 1, "y": 2}, offset=2),
        ev("g", doc={"x": 1, "y": 2}, offset=3),
        ev("h", doc={"x": 1, "y": 2}, offset=4),
    ]
    w.write(first)
    batch = [
        ev("a", doc={"x": 1, "y": 1}, offset=10),
        ev("a", "update", updated={"x": 2}, offset=11),
        ev("a", "update", removed=("y",), offset=12),
        ev("a", "update", updated={"z": 3}, offset=13),
        ev("b", doc={"x": 1}, offset=14),
        ev("b", "delete", offset=15),
        ev("c", "delete", offset=16),
        ev("c", doc={"q": 1}, offset=17),
        ev("d", "update", updated={"x": 4}, offset=18),
        ev("d", "update", updated={"y": 5}, removed=("w",), offset=19),
        ev("e", "update", updated={"x": 5}, offset=20),
        ev("e", "update", removed=("y",), offset=21),
        ev("f", "replace", doc={"w": 1}, offset=22),
        ev("g", "delete", offset=23),
        ev("g", "update", updated={"x": 9}, offset=24),
        ev("h", "update", updated={"x": 7}, offset=25),
        ev("h", "update", updated={"y": None, "x": 8}, offset=26),
    ]
    before = table(lake_uri, storage_options).version()
    result = w.write(batch)
    assert result.rows_written == 8  # one MERGE source row per _id
    expected = {
        "a": {"x": 2, "z": 3},
        "c": {"q": 1},
        "d": {"x": 4, "y": 5},
        "e": {"x": 5},
        "f": {"w": 1},
        "g": {"x": 9},
        "h": {"x": 8},
    }
    assert state(lake_uri, storage_options) == expected
    assert reference(first + batch) == expected
    dt = table(lake_uri, storage_options)
    history = dt.history(dt.version() - before)
    assert [h["operation"] for h in history] == ["MERGE", "ADD COLUMN"]


def test_order_within_partition_is_offset_across_partitions_is_seq(writer, lake_uri, storage_options):
    w = writer()
    w.write(
        [
            # same partition: the later offset wins even though its cluster time is older
            ev("a", doc={"v": "first"}, offset=1, ts_ms=BASE_MS + 9000),
            ev("a", "replace", doc={"v": "second"}, offset=2, ts_ms=BASE_MS + 5000),
            # different partitions: the later cluster time wins even though its offset is lower
            ev("b", doc={"v": "old"}, offset=50, partition=0, ts_ms=BASE_MS + 1000),
            ev("b", "replace", doc={"v": "new"}, offset=3, partition=1, ts_ms=BASE_MS + 2000),
        ]
    )
    assert state(lake_uri, storage_options) == {"a": {"v": "second"}, "b": {"v": "new"}}
    assert w.committed_offsets([(TOPIC, 0), (TOPIC, 1)]) == {(TOPIC, 0): 50, (TOPIC, 1): 3}


def _replayed(e: ChangeEvent) -> ChangeEvent:
    e.replayed = True  # sent again by `cdc dlq replay`, as the source marks it from its header
    return e


def test_a_replayed_older_change_never_overwrites(writer, lake_uri, storage_options):
    w = writer()
    new_ts = BASE_MS + 10_000_000
    w.write([ev("a", doc={"v": 2}, offset=0, ts_ms=new_ts), ev("b", doc={"v": 2}, offset=1, ts_ms=new_ts)])
    stale = BASE_MS  # a DLQ replay of events older than the stored state
    late = [
        _replayed(ev("a", "replace", doc={"v": 1}, offset=5, ts_ms=stale)),
        _replayed(ev("b", "delete", offset=6, ts_ms=stale)),
    ]
    result = w.write(late)
    assert state(lake_uri, storage_options) == {"a": {"v": 2}, "b": {"v": 2}}
    # nothing changed, yet the offsets are recorded (delta-rs skips the commit of a no-op MERGE)
    assert result.committed
    assert w.committed_offsets([(TOPIC, 0)]) == {(TOPIC, 0): 6}
    w.write([_replayed(ev("a", "update", updated={"v": 0}, offset=7, ts_ms=stale))])
    assert state(lake_uri, storage_options) == {"a": {"v": 2}, "b": {"v": 2}}
    # same sequence is applied (>=): a re-delivered change of the same instant
    w.write([_replayed(ev("a", "update", updated={"v": 3}, offset=8, ts_ms=new_ts))])
    assert state(lake_uri, storage_options)["a"] == {"v": 3}
    # in one batch too: the replayed older change is ordered by its sequence, not its offset
    w.write([ev("a", "update", updated={"v": 4}, offset=9, ts_ms=new_ts + 1000), late[0]])
    late[0].offset = 10
    w.write([ev("a", "update", updated={"v": 5}, offset=11, ts_ms=new_ts + 2000), late[0]])
    assert state(lake_uri, storage_options)["a"] == {"v": 5}


def test_a_later_offset_of_the_same_partition_wins_over_an_older_sequence(writer, lake_uri, storage_options):
    """Kafka's order within a partition is the source's: a clock that runs backwards does not reorder it."""
    w = writer()
    w.write([ev("a", doc={"v": 1}, offset=0, ts_ms=BASE_MS + 5000)])
    w.write([ev("a", "update", updated={"v": 2}, offset=1, ts_ms=BASE_MS + 4000)])
    assert state(lake_uri, storage_options) == {"a": {"v": 2}}
    # from another partition the sequence decides
    w.write([ev("a", "update", updated={"v": 3}, offset=0, partition=1, ts_ms=BASE_MS + 3000)])
    assert state(lake_uri, storage_options) == {"a": {"v": 2}}


# ------------------------------------------------------------------ exactly once


@pytest.mark.parametrize("mode", ["merge", "append"])
def test_replayed_batch_adds_nothing(writer, lake_uri, storage_options, mode):
    batch = [ev(f"id{i}", doc={"n": i}, offset=i) for i in range(5)]
    w = writer(mode)
    first = w.write(batch)
    assert first.committed and first.rows_written == 5
    snapshot = rows(lake_uri, storage_options)
    version = table(lake_uri, storage_options).version()

    again = w.write(batch)
    assert (again.committed, again.skipped, again.rows_written, again.version) == (False, 5, 0, version)
    restarted = writer(mode).write(batch)  # a new process replaying from its recovery snapshot
    assert (restarted.committed, restarted.skipped, restarted.version) == (False, 5, version)
    assert table(lake_uri, storage_options).version() == version
    assert rows(lake_uri, storage_options) == snapshot

    overlap = writer(mode).write(batch[3:] + [ev("id9", doc={"n": 9}, offset=9)])
    assert (overlap.skipped, overlap.rows_written) == (2, 1)
    assert len(rows(lake_uri, storage_options)) == 6


def test_duplicates_inside_a_batch_count_once(writer, lake_uri, storage_options):
    e = ev("a", doc={"n": 1}, offset=4)
    result = writer("append").write([e, e, ev("b", offset=5)])
    assert (result.skipped, result.rows_written) == (1, 2)
    assert len(rows(lake_uri, storage_options)) == 2


def test_non_contiguous_offsets_and_several_partitions(writer, lake_uri, storage_options):
    w = writer("append")
    w.write([ev("a", offset=3), ev("b", offset=7), ev("c", offset=20), ev("x", offset=100, partition=2)])
    assert w.committed_offsets([(TOPIC, 0), (TOPIC, 1), (TOPIC, 2)]) == {(TOPIC, 0): 20, (TOPIC, 2): 100}
    # a gap (transaction markers, compaction) is not a reason to drop or re-apply anything
    result = writer("append").write(
        [
            ev("b", offset=7),
            ev("c", offset=20),
            ev("d", offset=21),
            ev("e", offset=40),
            ev("x", offset=100, partition=2),
            ev("y", offset=101, partition=2),
            ev("z", offset=0, partition=1),
        ]
    )
    assert result.skipped == 3
    assert result.offsets == {(TOPIC, 0): 40, (TOPIC, 2): 101, (TOPIC, 1): 0}
    dt = table(lake_uri, storage_options)
    assert dt.transaction_version(f"cdc:{TOPIC}:0") == 40
    assert dt.transaction_version(f"cdc:{TOPIC}:1") == 0
    assert dt.transaction_version(f"cdc:{TOPIC}:2") == 101
    got = sorted((r["_source_partition"], r["_source_offset"]) for r in rows(lake_uri, storage_options))
    assert got == [(0, 3), (0, 7), (0, 20), (0, 21), (0, 40), (1, 0), (2, 100), (2, 101)]


def test_pipeline_name_scopes_the_app_id(writer, lake_uri, storage_options):
    writer("append", pipeline="blue").write([ev("a", offset=5)])
    assert writer("append", pipeline="blue").committed_offsets([(TOPIC, 0)]) == {(TOPIC, 0): 5}
    assert writer("append", pipeline="green").committed_offsets([(TOPIC, 0)]) == {}
    assert table(lake_uri, storage_options).transaction_version(f"blue:{TOPIC}:0") == 5


def test_committed_offsets_before_the_table_exists(writer):
    assert writer().committed_offsets([(TOPIC, 0)]) == {}
    empty = writer().write([])
    assert (empty.events, empty.version, empty.committed) == (0, None, False)


@pytest.mark.parametrize("mode", ["merge", "append"])
def test_ambiguous_commit_resolved_from_txn_versions(writer, lake_uri, storage_options, mode):
    writer(mode).write([ev("seed", doc={"n": 0}, offset=0)])
    batch = [ev("a", doc={"n": 1}, offset=1), ev("b", doc={"n": 2}, offset=2)]
    a, b = writer(mode), writer(mode)
    prepared = a._prepare(batch)  # a checked the txn versions: nothing committed yet
    landed = b.write(batch)  # ...then the "same" commit lands (another attempt, another process)
    assert landed.committed and not landed.resolved_ambiguous
    result = a._commit(prepared)  # a's own commit now conflicts for real
    assert result.resolved_ambiguous and result.committed
    assert result.version == landed.version == table(lake_uri, storage_options).version()
    assert sorted(r["_id"] for r in rows(lake_uri, storage_options)) == ["a", "b", "seed"]


class _Overtaken(DeltaTableWriter):
    """A writer that a rival overtakes with the same batch between its txn check and its schema commit.

    That window is real: the check reads the table, then creating the table or
    adding a column is a commit of its own, and the data commit comes after it.
    """

    rival: DeltaTableWriter | None = None
    rival_batch: list[ChangeEvent] = []

    def _add_columns(self, dt, layout, new):
        if self.rival is not None:
            rival, self.rival = self.rival, None
            rival.write(self.rival_batch)
        return super()._add_columns(dt, layout, new)


@pytest.mark.parametrize("mode", ["merge", "append"])
@pytest.mark.parametrize("schema_change", ["create the table", "add a column"])
def test_overtaken_during_a_schema_change_writes_nothing_twice(
    writer, lake_uri, storage_options, mode, schema_change
):
    if schema_change == "add a column":
        writer(mode).write([ev("seed", doc={"n": 0}, offset=0)])
    batch = [ev(f"id{i}", doc={"n": i, "extra": f"x{i}"}, offset=i) for i in range(1, 6)]
    w = _Overtaken(lake_uri, mode=mode, storage_options=storage_options)
    w.rival, w.rival_batch = writer(mode), batch
    result = w.write(batch)
    assert w.rival is None, "the rival never ran: the test did not exercise the race"
    assert (result.skipped, result.rows_written) == (5, 0)
    got = rows(lake_uri, storage_options)
    assert len(got) == len({r["_id"] for r in got}) == (6 if schema_change == "add a column" else 5)
    if mode == "append":
        assert sorted(r["_source_offset"] for r in got)[-5:] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("mode", ["merge", "append"])
def test_failed_commit_not_covered_reraises(writer, lake_uri, storage_options, mode):
    writer(mode).write([ev("seed", doc={"n": 0}, offset=0)])
    batch = [ev(f"id{i}", doc={"n": i}, offset=i) for i in range(1, 6)]
    a = writer(mode)
    prepared = a._prepare(batch)
    writer(mode).write(batch[:2])  # covers offsets up to 2 only
    with pytest.raises(CommitFailedError):
        a._commit(prepared)
    retry = a.write(batch)  # what the retry layer does next
    assert (retry.skipped, retry.rows_written) == (2, 3)
    assert len(rows(lake_uri, storage_options)) == 6


# ------------------------------------------------------------------ types


def test_all_types_round_trip(writer, lake_uri, storage_options):
    when = datetime(2024, 2, 29, 12, 30, 45, 123000, tzinfo=UTC)
    doc = {
        "s": "héllo",
        "i": 2**62 + 1,
        "neg": -(2**63),
        "f": 1.5,
        "nan": math.nan,
        "inf": -math.inf,
        "b": True,
        "none": None,
        "dt": when,
        "by": b"\x00\xff",
        "ts": BsonTimestamp(1_700_000_000, 7),
        "d": {"a": [1, {"b": when}], "nan": math.nan, "bin": b"\x01", "ts": BsonTimestamp(1, 2)},
        "l": [1, "two", None, 3.5],
    }
    writer().write([ev("a", doc=doc, offset=0)])
    dt = table(lake_uri, storage_options)
    types = {f.name: f.type for f in pa.schema(dt.schema().to_arrow())}
    assert types["s"] == pa.string()
    assert types["i"] == types["neg"] == pa.int64()
    assert types["f"] == types["nan"] == types["inf"] == pa.float64()
    assert types["b"] == pa.bool_()
    assert types["dt"] == pa.timestamp("us", tz="UTC")
    assert types["by"] == pa.binary()
    assert types["ts"] == pa.struct([("t", pa.int64()), ("i", pa.int64())])
    assert types["d"] == types["l"] == pa.string()
    assert "none" not in types  # a field that was only ever null needs no column
    assert types["_ts"] == pa.timestamp("us", tz="UTC") and types["_seq"] == pa.int64()

    (row,) = rows(lake_uri, storage_options)
    assert row["s"] == "héllo" and row["i"] == 2**62 + 1 and row["neg"] == -(2**63)
    assert row["f"] == 1.5 and math.isnan(row["nan"]) and row["inf"] == -math.inf
    assert row["b"] is True and row["dt"] == when and row["by"] == b"\x00\xff"
    assert row["ts"] == {"t": 1_700_000_000, "i": 7}
    assert orjson.loads(row["d"]) == {
        "a": [1, {"b": {"$date": {"$numberLong": "1709209845123"}}}],
        "nan": {"$numberDouble": "NaN"},
        "bin": {"$binary": {"base64": "AQ==", "subType": "00"}},
        "ts": {"$timestamp": {"t": 1, "i": 2}},
    }
    assert orjson.loads(row["l"]) == [1, "two", None, 3.5]
    meta = schema_meta(lake_uri, storage_options)
    assert meta["d"] == {"cdc.kind": "json", "cdc.role": "value", "cdc.field": "d"}
    assert meta["ts"]["cdc.kind"] == "bsonts"


def _field(row: dict[str, Any], name: str) -> Any:
    """Read a drifting field back: the typed column, else its JSON-text companion."""
    if row.get(name) is not None:
        return row[name]
    text = row.get(f"{name}__json")
    return None if text is None else orjson.loads(text)


def test_type_drift_across_batches_keeps_every_event(writer, lake_uri, storage_options):
    values = [1, "a", {"k": 1}, 2.5, 3, [1, 2], True, -4]
    w = writer("append")
    for i, v in enumerate(values[:4]):
        w.write([ev(f"e{i}", doc={"x": v}, offset=i)])
    meta = schema_meta(lake_uri, storage_options)
    assert meta["x"] == {"cdc.kind": "int64", "cdc.role": "value", "cdc.field": "x"}
    assert meta["x__json"] == {"cdc.kind": "json", "cdc.role": "json_fallback", "cdc.field": "x"}

    again = writer("append")  # a restarted process follows the recorded decisions
    result = again.write([ev(f"e{i}", doc={"x": v}, offset=i) for i, v in enumerate(values)])
    assert result.new_columns == () and result.rows_written == 4
    got = {r["_id"]: r for r in rows(lake_uri, storage_options)}
    assert {k: _field(r, "x") for k, r in got.items()} == {f"e{i}": v for i, v in enumerate(values)}
    assert got["e4"]["x"] == 3 and got["e4"]["x__json"] is None
    assert got["e6"]["x"] is None and got["e6"]["x__json"] == "true"
    assert schema_meta(lake_uri, storage_options) == meta


DRIFT = [
    {"num": 1, "mixed": 1, "n2": 1},
    {"num": 2.5, "mixed": "two", "n2": 2},
    {"num": 3, "mixed": [1]},
    {"late": "x", "num": None},
    {"late": 7},
]


def _drift_table(uri: str, sizes: list[int]) -> tuple[dict[str, tuple[pa.DataType, str]], list[dict]]:
    w = DeltaTableWriter(uri, mode="append")
    events = [ev(str(n), doc=d, offset=n) for n, d in enumerate(DRIFT)]
    start = 0
    for size in sizes:
        w.write(events[start : start + size])
        start += size
    meta = schema_meta(uri, None)
    types = {f.name: (f.type, meta[f.name]["cdc.kind"]) for f in pa.schema(table(uri).schema().to_arrow())}
    got = sorted(rows(uri, None), key=lambda r: r["_source_offset"])
    return types, [{k: v for k, v in r.items() if k not in APPEND_META} for r in got]


def test_type_drift_is_decided_by_the_first_value_whatever_the_batches(tmp_path):
    """A column takes the kind of the field's first value; other kinds go to `<field>__json`."""
    types, got = _drift_table(str(tmp_path / "one"), [5])
    assert types["num"] == (pa.int64(), "int64")  # an int first: 2.5 is not rounded into it
    assert types["mixed"] == (pa.int64(), "int64")
    assert types["n2"] == (pa.int64(), "int64")
    assert types["late"] == (pa.string(), "string")
    assert types["num__json"] == types["mixed__json"] == types["late__json"] == (pa.string(), "json")
    assert [(r["num"], r["num__json"]) for r in got[:3]] == [(1, None), (None, "2.5"), (3, None)]
    assert [(r["mixed"], r["mixed__json"]) for r in got[:3]] == [(1, None), (None, '"two"'), (None, "[1]")]
    assert (got[4]["late"], got[4]["late__json"]) == (None, "7")
    # The same changes a batch at a time, or in other cuts, make the same table.
    for sizes in ([1, 1, 1, 1, 1], [2, 3], [1, 4], [3, 2]):
        assert _drift_table(str(tmp_path / "-".join(map(str, sizes))), sizes) == (types, got)


def test_merge_mode_decides_by_the_first_change_not_the_collapsed_row(writer, lake_uri, storage_options):
    """Two changes of one document in a batch: the first value's kind decides, as it would apart."""
    writer().write([ev("a", doc={"x": 1}, offset=0), ev("a", doc={"x": "one"}, offset=1)])
    meta = schema_meta(lake_uri, storage_options)
    assert meta["x"]["cdc.kind"] == "int64" and meta["x__json"]["cdc.kind"] == "json"
    (row,) = rows(lake_uri, storage_options)
    assert (row["x"], row["x__json"]) == (None, '"one"')


def test_type_drift_in_merge_mode_and_partial_updates(writer, lake_uri, storage_options):
    w = writer()
    w.write([ev("a", doc={"x": 1, "y": 1}, offset=0), ev("b", doc={"x": 1}, offset=1)])
    w.write([ev("a", "update", updated={"x": "one"}, offset=2)])
    r = {row["_id"]: row for row in rows(lake_uri, storage_options)}
    assert (r["a"]["x"], r["a"]["x__json"], r["a"]["y"]) == (None, '"one"', 1)
    # back to an int: the typed column is set and the stale JSON value cleared
    writer().write(
        [ev("a", "update", updated={"x": 2}, offset=3), ev("b", "update", removed=("x",), offset=4)]
    )
    r = {row["_id"]: row for row in rows(lake_uri, storage_options)}
    assert (r["a"]["x"], r["a"]["x__json"], r["a"]["y"]) == (2, None, 1)
    assert (r["b"]["x"], r["b"]["x__json"]) == (None, None)


def test_reserved_and_case_colliding_field_names(writer, lake_uri, storage_options):
    writer().write([ev("a", doc={"_op": "mine", "Name": "A", "name": "a", "x__json": 1}, offset=0)])
    writer().write([ev("b", doc={"x": 1}, offset=1)])
    writer().write([ev("b", "update", updated={"x": "s"}, offset=2)])
    meta = schema_meta(lake_uri, storage_options)
    fields = {m["cdc.field"]: name for name, m in meta.items() if m.get("cdc.role") == "value"}
    fallbacks = {m["cdc.field"]: name for name, m in meta.items() if m.get("cdc.role") == "json_fallback"}
    assert fields["_op"] != "_op" and fields["Name"].lower() != fields["name"].lower()
    assert fallbacks["x"] not in fields.values()
    r = {row["_id"]: row for row in rows(lake_uri, storage_options)}
    assert r["a"]["_op"] == "insert" and r["a"][fields["_op"]] == "mine"
    assert (r["a"][fields["Name"]], r["a"][fields["name"]], r["a"][fields["x__json"]]) == ("A", "a", 1)
    assert r["b"][fallbacks["x"]] == '"s"'


# ------------------------------------------------------------------ append mode and table setup


def test_append_mode_changelog_columns(writer, lake_uri, storage_options):
    w = writer("append")
    w.write(
        [
            ev("a", doc={"x": 1, "y": "k"}, offset=10, partition=3, ord=2),
            ev("a", "update", updated={"x": 2}, removed=("y",), offset=11, partition=3),
            ev("a", "replace", doc={"z": True}, offset=12, partition=3),
            ev("a", "delete", offset=13, partition=3),
        ]
    )
    got = sorted(rows(lake_uri, storage_options), key=lambda r: r["_source_offset"])
    assert [r["_op"] for r in got] == ["insert", "update", "replace", "delete"]
    assert {(r["_source_topic"], r["_source_partition"]) for r in got} == {(TOPIC, 3)}
    assert [r["_removed"] for r in got] == [None, ["y"], None, None]
    assert [(r["x"], r["y"], r["z"]) for r in got] == [
        (1, "k", None),
        (2, None, None),
        (None, None, True),
        (None, None, None),
    ]
    assert got[0]["_ts"] == datetime.fromtimestamp((BASE_MS + 10_000) / 1000, UTC)
    assert got[0]["_seq"] == ((BASE_MS + 10_000) // 1000) << 31 | 2
    types = {f.name: f.type for f in pa.schema(table(lake_uri, storage_options).schema().to_arrow())}
    assert types["_removed"] == pa.list_(pa.string())
    assert types["_source_partition"] == types["_source_offset"] == pa.int64()


def test_checkpoint_interval_set_at_creation(writer, lake_uri, storage_options):
    w = writer("append", checkpoint_interval=2)
    for i in range(4):
        w.write([ev(f"e{i}", doc={"n": i}, offset=i)])
    dt = table(lake_uri, storage_options)
    assert dt.metadata().configuration["delta.checkpointInterval"] == "2"
    if "://" not in lake_uri:
        assert any(
            p.endswith(".checkpoint.parquet") for p in os.listdir(os.path.join(lake_uri, "_delta_log"))
        )


def test_mode_is_recorded_and_enforced(writer, lake_uri, storage_options):
    writer("append").write([ev("a", offset=0)])
    assert table(lake_uri, storage_options).metadata().configuration["cdc.mode"] == "append"
    with pytest.raises(ConfigError, match="append-mode"):
        writer("merge").write([ev("b", offset=1)])


def test_compact_keeps_rows(writer, lake_uri, storage_options):
    w = writer()
    for i in range(3):
        w.write([ev(f"e{i}", doc={"n": i}, offset=i)])
    before = state(lake_uri, storage_options)
    metrics = w.compact()
    assert metrics["numFilesRemoved"] >= 2
    assert state(lake_uri, storage_options) == before
    assert w.write([ev("e9", doc={"n": 9}, offset=9)]).committed


def test_a_merge_rewrites_its_files_in_compressed_row_groups_of_16k_rows(writer, lake_uri, storage_options):
    # One row group per file would make delta-rs read and rewrite the whole table in one piece.
    w = writer()
    w.write([ev(f"k{i:06d}", doc={"n": i}, offset=i) for i in range(40_000)])
    w.write([ev("k000007", "replace", doc={"n": -7}, offset=40_000)])
    dt = table(lake_uri, storage_options)
    assert dt.history(1)[0]["operation"] == "MERGE"
    frags = list(dt.to_pyarrow_dataset().get_fragments())
    groups = [rg.num_rows for frag in frags for rg in frag.row_groups]
    assert sum(groups) == 40_000
    assert {f.metadata.row_group(0).column(0).compression for f in frags} == {"SNAPPY"}
    assert len(groups) >= 3 and max(groups) <= 16_384
    assert state(lake_uri, storage_options)["k000007"]["n"] == -7
