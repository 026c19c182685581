"""Merge mode's two tables on local Delta tables: the changelog the sink commits, and the mirror
the materializer brings up to date from it in rounds (`dataflow.lake.mirror`).

The mirror must equal the collection whatever the cut of changes into batches and of
batches into rounds, with rounds interleaved with new commits; a fresh read (mirror plus
the changelog after its mark) must equal it at every moment.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from bson.decimal128 import Decimal128
from deltalake import DeltaTable

from dataflow.decode.updates import Update
from dataflow.lake.columnar import split
from dataflow.lake.columns import Layout
from dataflow.lake.documents import read_documents, table_documents
from dataflow.lake.layout import TableLocations
from dataflow.lake.mirror import Mirror, mark_app
from dataflow.lake.read import current_documents
from dataflow.lake.writer import DeltaTableWriter
from dataflow.model import Binary, BsonTimestamp, ChangeEvent, ObjectId
from dataflow.runtime.failures import Kind, classify
from tests.harness import BASE_MS, TOPIC, ev

DB, COLL = "shop", "orders"
_SOURCES = ("_source_topic", "_source_partition", "_source_offset")


@pytest.fixture
def lake(tmp_path) -> str:
    return str(tmp_path / "lake")


def changelog(lake: str) -> DeltaTableWriter:
    return DeltaTableWriter(TableLocations(lake).uri(DB, COLL, "append"), mode="append")


def mirror(lake: str, max_rows: int = 250_000) -> Mirror:
    t = TableLocations(lake)
    return Mirror(t.uri(DB, COLL, "append"), t.uri(DB, COLL, "merge"), DB, COLL, max_rows=max_rows)


def docs(lake: str) -> dict[str, dict[str, Any]]:
    """The mirror's live documents by _id text."""
    return table_documents(TableLocations(lake).uri(DB, COLL, "merge"))


def fresh(lake: str) -> dict[str, dict[str, Any]]:
    """A fresh read, by _id text."""
    return {d.pop("_id"): d for d in current_documents(lake, DB, COLL).values()}


# ------------------------------------------------------------------ random histories

VALUES = [
    lambda r: r.randrange(-(2**40), 2**40),
    lambda r: r.random() * 1000,
    lambda r: r.choice(["a", "b", "éé", ""]) * r.randrange(1, 4),
    lambda r: r.random() < 0.5,
    lambda r: ObjectId(f"{r.randrange(2**96):024x}"),
    lambda r: datetime(2024, 1, 1, tzinfo=UTC) + timedelta(milliseconds=r.randrange(10**11)),
    lambda r: Decimal128(f"{r.randrange(10**6)}.{r.randrange(100):02d}"),
    lambda r: {"x": r.randrange(9), "y": [1, "two"]},
    lambda r: [r.randrange(9), {"z": None}],
    lambda r: Binary(bytes([r.randrange(256)]), 0x80),
    lambda r: None,
]
FIELDS = ["a", "b", "c", "d"]


def history(rng: random.Random, n: int, documents: int = 15) -> list[ChangeEvent]:
    """Changes to a few documents on 3 partitions (a document always on one, as Kafka keys it)."""
    offsets = [0, 0, 0]
    live: set[str] = set()
    out = []
    for i in range(n):
        _id = f"d{rng.randrange(documents)}"
        p = int(_id[1:]) % 3
        off = offsets[p]
        offsets[p] += 1
        ts = BASE_MS + i * 1000
        kind = rng.random()
        if _id not in live or kind < 0.15:
            doc = {f: rng.choice(VALUES)(rng) for f in rng.sample(FIELDS, rng.randrange(1, 4))}
            e = ev(_id, "insert" if _id not in live else "replace", doc, offset=off, partition=p, ts_ms=ts)
            live.add(_id)
        elif kind < 0.3:
            e = ev(_id, "delete", offset=off, partition=p, ts_ms=ts)
            live.discard(_id)
        elif kind < 0.45:
            e = ev(_id, "update", offset=off, partition=p, ts_ms=ts)
            e.change = Update(set=((("sub", "n"), rng.randrange(9)),), unset=((rng.choice(FIELDS),),))
        else:
            updated = {f: rng.choice(VALUES)(rng) for f in rng.sample(FIELDS, rng.randrange(0, 3))}
            removed = tuple(f for f in rng.sample(FIELDS, rng.randrange(0, 2)) if f not in updated)
            e = ev(_id, "update", offset=off, partition=p, ts_ms=ts, updated=updated, removed=removed)
        out.append(e)
    return out


def model(events: list[ChangeEvent]) -> dict[str, dict[str, Any]]:
    """The collection after the changes, applied one by one as MongoDB did (null == absent)."""
    out: dict[str, dict[str, Any]] = {}
    for e in events:
        if e.op == "delete":
            out.pop(e.id, None)
        elif e.doc is not None:
            out[e.id] = {k: v for k, v in e.doc.items() if k != "_id"}
        elif e.change is not None:
            out[e.id] = e.change.apply(out.get(e.id, {}))
        else:
            d = out.setdefault(e.id, {})
            d.update(e.updated or {})
            for k in e.removed:
                d.pop(k, None)
    return {i: {k: v for k, v in d.items() if v is not None} for i, d in out.items()}


def cuts(rng: random.Random, events: list[ChangeEvent]) -> list[list[ChangeEvent]]:
    out, i = [], 0
    while i < len(events):
        n = rng.randrange(1, 12)
        out.append(events[i : i + n])
        i += n
    return out


@pytest.mark.parametrize("seed", range(6))
def test_the_mirror_equals_the_collection_whatever_the_batches_and_rounds(lake, seed) -> None:
    rng = random.Random(seed)
    events = history(rng, 300)
    log, m = changelog(lake), mirror(lake, max_rows=rng.choice([1, 5, 20, 1000]))
    done: list[ChangeEvent] = []
    for batch in cuts(rng, events):
        log.write(batch)
        done += batch
        if rng.random() < 0.4:
            m.round()
        if rng.random() < 0.2:
            assert fresh(lake) == model(done)  # whatever the mirror has applied so far
    rounds = m.catch_up()
    assert all(r.changes <= m.max_rows or r.first == r.last for r in rounds)
    assert m.lag().caught_up
    assert docs(lake) == model(events)
    assert fresh(lake) == model(events)


def test_the_materialized_mirror_equals_one_merged_batch_by_batch(lake, tmp_path) -> None:
    """The MERGE path straight from the events (the writer's own) and the changelog path agree,
    value types included."""
    rng = random.Random(7)
    events = history(rng, 400)
    direct = DeltaTableWriter(str(tmp_path / "direct"), mode="merge")
    log, m = changelog(lake), mirror(lake, max_rows=37)
    for batch in cuts(rng, events):
        direct.write(batch)
        log.write(batch)
    m.catch_up()
    assert docs(lake) == table_documents(str(tmp_path / "direct")) == model(events)


# ------------------------------------------------------------------ columnar rounds


def _rows(uri: str) -> list[dict[str, Any]]:
    """Every mirror row, tombstones included, as documents plus what the MERGE stamped on them."""
    dt = DeltaTable(uri)
    meta = ["_key", "_id", "_seq", "_op", "_ts", *_SOURCES, "_deleted"]
    table = dt.to_pyarrow_table(columns=meta).to_pylist()
    documents = read_documents(dt, Layout.from_schema(pa.schema(dt.schema().to_arrow()), {}), by="_key")
    return sorted(({**r, **documents[r["_key"]]} for r in table), key=lambda r: r["_key"])


@pytest.mark.parametrize("seed", range(4))
def test_columnar_rounds_write_what_python_rounds_write(tmp_path, seed) -> None:
    """Two mirrors of one changelog, rounds collapsed column-wise where they can be and all in
    Python: the same rows, stamps and tombstones included, and both equal the model."""
    rng = random.Random(100 + seed)
    events = history(rng, 800, documents=200)
    lake = str(tmp_path / "lake")
    t = TableLocations(lake)
    log = changelog(lake)
    columnar = mirror(lake, max_rows=rng.choice([40, 300, 5000]))
    python = Mirror(
        t.uri(DB, COLL, "append"),
        str(tmp_path / "python"),
        DB,
        COLL,
        max_rows=columnar.max_rows,
        columnar=False,
    )
    for batch in cuts(rng, events):
        log.write(batch)
        if rng.random() < 0.3:
            columnar.round()
            python.round()
    columnar.catch_up()
    python.catch_up()
    assert docs(lake) == table_documents(str(tmp_path / "python")) == model(events)
    assert _rows(t.uri(DB, COLL, "merge")) == _rows(str(tmp_path / "python"))
    # most documents were collapsed column-wise (the rest: updates inside fields, partial
    # updates after other changes)
    feed = columnar.changelog.rows(0, columnar.changelog.table().version())
    direct, rest = split(feed, columnar.changelog.layout(), Layout([]))
    assert direct is not None and direct.changes + rest.num_rows == feed.num_rows
    assert direct.rows.num_rows > 0.3 * len({e.key for e in events})


def test_a_field_the_mirror_holds_as_another_kind_is_collapsed_in_python(lake) -> None:
    """A mirror from an older version decided a field as int64 where the changelog decided
    string: copying the changelog's column would be wrong, so the round goes the Python way."""
    t = TableLocations(lake)
    DeltaTableWriter(t.uri(DB, COLL, "merge"), mode="merge").write([ev("old", doc={"a": 5}, offset=0)])
    log, m = changelog(lake), mirror(lake)
    log.write([ev("x", doc={"a": "text"}, offset=1), ev("y", doc={"a": 7}, offset=2)])
    feed = m.changelog.rows(0, m.changelog.table().version())
    assert split(feed, m.changelog.layout(), m.writer.layout()) == (None, feed)
    m.catch_up()
    assert docs(lake) == {"old": {"a": 5}, "x": {"a": "text"}, "y": {"a": 7}}


def test_a_field_of_another_kind_the_round_does_not_hold_stays_out_of_the_way(lake) -> None:
    """The mirror holds `b` as a BSON timestamp, the changelog as text; a later round without
    `b` goes column-wise, and the changelog's empty text column is not forced onto the mirror's."""
    t = TableLocations(lake)
    DeltaTableWriter(t.uri(DB, COLL, "merge"), mode="merge").write(
        [ev("old", doc={"b": BsonTimestamp(5, 1)}, offset=0)]
    )
    log, m = changelog(lake), mirror(lake)
    log.write([ev("x", doc={"b": "text"}, offset=1)])
    m.catch_up()
    log.write([ev("y", doc={"a": 1}, offset=2), ev("x", "update", updated={"a": 2}, offset=3)])
    applied = m.applied()
    feed = m.changelog.rows(applied + 1, m.changelog.table().version())
    direct, rest = split(feed, m.changelog.layout(), m.writer.layout())
    assert direct is not None and direct.changes == 2 and rest.num_rows == 0
    m.catch_up()
    assert docs(lake) == {"old": {"b": BsonTimestamp(5, 1)}, "x": {"b": "text", "a": 2}, "y": {"a": 1}}


# ------------------------------------------------------------------ order and deletes


def _at(e: ChangeEvent, seq: int) -> ChangeEvent:
    e.seq = seq
    return e


def test_a_replayed_older_update_in_one_round_keeps_its_place(lake) -> None:
    """insert (seq 10), update v3 (seq 30), and a replayed older update v2 (seq 20): the
    document ends as v3 left it, stamped 30."""
    log, m = changelog(lake), mirror(lake)
    v2 = _at(ev("a", "update", updated={"v": 2, "w": 2}, offset=2), 20)
    v2.replayed = True
    log.write(
        [
            _at(ev("a", doc={"v": 1}, offset=0), 10),
            _at(ev("a", "update", updated={"v": 3}, offset=1), 30),
            v2,
        ]
    )
    m.catch_up()
    assert docs(lake) == {"a": {"v": 3, "w": 2}}  # v2 happened between: its w stays, its v does not
    (row,) = DeltaTable(TableLocations(lake).uri(DB, COLL, "merge")).to_pyarrow_table().to_pylist()
    assert row["_seq"] == 30


def test_one_partitions_changes_keep_their_offset_order_whatever_their_sequences(lake) -> None:
    log, m = changelog(lake), mirror(lake)
    late = _at(ev("a", "update", updated={"v": 0}, offset=9, partition=1), 15)
    late.replayed = True
    # the source clock ran backwards between offsets 1 and 2; a replay sits between
    log.write(
        [
            _at(ev("a", doc={"v": 1}, offset=0), 10),
            _at(ev("a", "update", updated={"v": 2}, offset=1), 30),
            late,
            _at(ev("a", "update", updated={"v": 3}, offset=2), 20),
        ]
    )
    m.catch_up()
    assert docs(lake) == {"a": {"v": 3}}


@pytest.mark.parametrize("same_round", [True, False])
def test_a_deleted_document_stays_deleted_when_an_older_insert_arrives_late(lake, same_round) -> None:
    log, m = changelog(lake), mirror(lake)
    log.write([_at(ev("a", doc={"v": 1}, offset=0), 10), _at(ev("a", "delete", offset=1), 50)])
    if not same_round:
        m.catch_up()
    replayed = _at(ev("a", doc={"v": 1}, offset=7), 10)  # `cdc dlq replay` of the insert
    replayed.replayed = True
    other = _at(ev("a", doc={"v": 2}, offset=0, partition=3), 40)  # another partition, older
    log.write([replayed, other])
    m.catch_up()
    assert docs(lake) == {} and fresh(lake) == {}
    tomb = current_documents(lake, DB, COLL, deleted=True)
    assert list(tomb.values()) == [{"_id": "a", "_deleted": True}]
    # a newer insert does bring it back
    log.write([_at(ev("a", doc={"v": 3}, offset=8), 60)])
    m.catch_up()
    assert docs(lake) == {"a": {"v": 3}}


def test_tombstones_past_the_retention_are_purged(lake) -> None:
    """The retention runs from when the mirror wrote the tombstone: changes months old (a
    backlog read late) keep theirs while other partitions may still bring older ones."""
    log, m = changelog(lake), mirror(lake)
    months_ago = BASE_MS  # the changes' own time is long past
    log.write([ev(i, doc={"v": 1}, offset=n, ts_ms=months_ago) for n, i in enumerate("abc")])
    log.write([ev("a", "delete", offset=3, ts_ms=months_ago)])
    m.catch_up()
    assert m.writer.purge_tombstones(int(time.time() * 1000) - 3_600_000) == 0
    between = int(time.time() * 1000)
    time.sleep(0.05)
    log.write([ev("b", "delete", offset=4, ts_ms=months_ago)])
    m.catch_up()
    assert set(current_documents(lake, DB, COLL, deleted=True)) == {"s:a", "s:b", "s:c"}
    assert m.writer.purge_tombstones(between) == 1
    assert set(current_documents(lake, DB, COLL, deleted=True)) == {"s:b", "s:c"}
    assert docs(lake) == {"c": {"v": 1}}


# ------------------------------------------------------------------ rounds


def test_rounds_are_bounded_and_a_snapshot_is_appended(lake) -> None:
    log, m = changelog(lake), mirror(lake, max_rows=25)
    for b in range(10):
        log.write([ev(f"d{b}-{i}", doc={"n": i}, offset=b * 10 + i) for i in range(10)])
    rounds = m.catch_up()
    assert [r.changes for r in rounds] == [20, 20, 20, 20, 20]
    assert all(r.appended for r in rounds)  # only new documents: no MERGE
    assert len(docs(lake)) == 100
    # an insert of a key the mirror holds (a tombstone here) is merged, not appended twice
    log.write([ev("d0-0", "delete", offset=100)])
    log.write([ev("d0-0", doc={"n": -1}, offset=101)])
    rounds = m.catch_up()
    assert not rounds[-1].appended
    rows = DeltaTable(TableLocations(lake).uri(DB, COLL, "merge")).to_pyarrow_table().to_pylist()
    assert len(rows) == 100 and docs(lake)["d0-0"] == {"n": -1}


def test_a_round_applied_twice_applies_once(lake) -> None:
    """A crash after the mirror's commit and before anything else: the mark says it landed."""
    log, m = changelog(lake), mirror(lake)
    log.write([ev("a", doc={"n": 1}, offset=0), ev("b", doc={"n": 1}, offset=1)])
    m.catch_up()
    log.write([ev("a", "update", updated={"n": 2}, offset=2)])
    events = m.changelog.events(2, 2)
    first = m.writer.apply(events, (m.app, 2))
    again = mirror(lake).writer.apply(events, (m.app, 2))  # a restarted process, same round
    assert first.committed and not again.committed and again.skipped == 1
    assert docs(lake) == {"a": {"n": 2}, "b": {"n": 1}}


def test_two_materializers_on_one_table_leave_it_right(lake) -> None:
    rng = random.Random(3)
    events = history(rng, 200)
    log = changelog(lake)
    for batch in cuts(rng, events):
        log.write(batch)
    errors: list[BaseException] = []

    def run() -> None:
        m = mirror(lake, max_rows=30)
        for _ in range(200):  # a lost commit race is an error; the retry is to look again
            try:
                if m.round() is None:
                    return
            except Exception as e:
                if classify(e) is not Kind.UNAVAILABLE:
                    errors.append(e)
                    return

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert docs(lake) == model(events)


def test_a_mirror_that_recorded_offsets_itself_still_takes_the_changelog(lake) -> None:
    """A mirror written before the changelog came first holds Kafka offsets in its txn actions;
    changes at or below them are applied already, and the mark moves past them."""
    t = TableLocations(lake)
    DeltaTableWriter(t.uri(DB, COLL, "merge"), mode="merge").write([ev("a", doc={"n": 1}, offset=0)])
    log, m = changelog(lake), mirror(lake)
    log.write([ev("a", doc={"n": 1}, offset=0)])
    log.write([ev("a", "update", updated={"n": 2}, offset=1)])
    m.catch_up()
    assert m.lag().caught_up and m.applied() == DeltaTable(t.uri(DB, COLL, "append")).version()
    assert DeltaTable(t.uri(DB, COLL, "merge")).transaction_version(mark_app("cdc")) == m.applied()
    assert docs(lake) == {"a": {"n": 2}}


def test_a_null_set_by_a_partial_update_reaches_the_mirror(lake) -> None:
    log, m = changelog(lake), mirror(lake)
    log.write([ev("a", doc={"n": 1, "m": 1}, offset=0)])
    m.catch_up()
    log.write([ev("a", "update", updated={"n": None}, offset=1)])
    m.catch_up()
    assert docs(lake) == {"a": {"m": 1}}
    rows = DeltaTable(TableLocations(lake).uri(DB, COLL, "append")).to_pyarrow_table().to_pylist()
    (row,) = [r for r in rows if r["_op"] == "update"]
    assert row["_set"] == ["n"] and row["_removed"] == [] and row["_source_topic"] == TOPIC


def test_the_materializer_thread_catches_up_and_hands_over_what_stops_it(lake) -> None:
    from dataflow.runtime.failures import ConfigError
    from dataflow.runtime.retry import RetryPolicy
    from dataflow.sink.materializer import Materializer

    t = TableLocations(lake)
    log = changelog(lake)
    log.write([ev(f"d{i}", doc={"n": i}, offset=i) for i in range(5)])
    m = Materializer(
        t,
        pipeline="cdc",
        storage_options=None,
        retry=RetryPolicy(initial=0.01, cap=0.05),
        round_rows=2,
        tombstone_retention_s=3600,
        startup=lambda: [(DB, COLL)],  # a table with a backlog at start, before any batch
        stop_flow_on_error=False,
    )
    m.start()
    m.drain(timeout=60)
    assert len(docs(lake)) == 5 and len(m.rounds) == 1  # one changelog version: one round
    log.write([ev("d0", "delete", offset=5)])
    m.notify(DB, COLL)
    m.drain(timeout=60)
    assert len(docs(lake)) == 4
    # A mirror location holding an append-mode table is a configuration error: it stops.
    DeltaTableWriter(t.uri(DB, "other", "merge"), mode="append").write([ev("x", offset=0)])
    DeltaTableWriter(t.uri(DB, "other", "append"), mode="append").write([ev("x", offset=0)])
    m.notify(DB, "other")
    with pytest.raises(ConfigError, match="append-mode table"):
        m.drain(timeout=60)
    with pytest.raises(ConfigError):
        m.stop()


def paced(lake: str, pace, **kwargs: Any):
    """A materializer of the lake's tables with fast retries and polling, paced by `pace`."""
    from dataflow.runtime.retry import RetryPolicy
    from dataflow.sink.materializer import Materializer

    return Materializer(
        TableLocations(lake),
        pipeline="cdc",
        storage_options=None,
        retry=RetryPolicy(initial=0.01, cap=0.05),
        round_rows=10_000,
        pace=pace,
        tombstone_retention_s=3600,
        idle_seconds=0.05,
        **kwargs,
    )


def test_a_busy_tables_rounds_wait_for_a_share_of_the_mirror_or_a_pause(lake) -> None:
    """While commits keep coming, a round waits until its changes are a tenth of the mirror's
    rows; once they pause, the mirror catches up at once."""
    from dataflow.sink.materializer import Pace

    log = changelog(lake)
    m = paced(lake, Pace(fraction=0.1, max_wait_s=600, quiet_s=3.0))
    m.start()
    try:
        log.write([ev(f"d{i}", doc={"n": i}, offset=i) for i in range(200)])
        m.notify(DB, COLL, 200)
        deadline = time.monotonic() + 30  # the first round at once: the mirror's size is not known
        while m.mirror(DB, COLL).lag().changes and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(docs(lake)) == 200
        applied = m.mirror(DB, COLL).applied()
        offset = 200
        for _ in range(6):  # 3 changes a commit, commits faster than the pause: 18 < 10% of 200
            log.write([ev(f"d{offset + i - 200}", doc={"n": -1}, offset=offset + i) for i in range(3)])
            offset += 3
            m.notify(DB, COLL, 3)
            time.sleep(0.2)
        lag = m.mirror(DB, COLL).lag()
        assert lag.applied == applied and lag.changes == 18  # no round: too small, no pause yet
        log.write([ev(f"d{i}", doc={"n": -2}, offset=offset + i) for i in range(5)])
        m.notify(DB, COLL, 5)  # 23 >= 20: a round, though commits are still coming
        deadline = time.monotonic() + 30
        while m.mirror(DB, COLL).lag().changes and time.monotonic() < deadline:
            time.sleep(0.1)
        assert m.mirror(DB, COLL).lag().caught_up
        log.write([ev("d0", "delete", offset=offset + 5)])
        m.notify(DB, COLL, 1)  # one change, then a pause: applied after quiet_s
        started = time.monotonic()
        while "d0" in docs(lake) and time.monotonic() < started + 30:
            time.sleep(0.1)
        assert "d0" not in docs(lake) and time.monotonic() - started >= 2.0
    finally:
        m.stop()


def test_while_the_input_holds_a_backlog_a_busy_tables_round_waits_for_it(lake) -> None:
    """Unread input at or past `defer_backlog`: a round waits the backlog's max wait, whatever its
    share of the mirror, a pause in the commits or the usual max wait; once the input is caught up,
    a pause starts it at once."""
    from dataflow.sink.materializer import Pace
    from dataflow.source.backlog import InputBacklog

    log = changelog(lake)
    backlog = InputBacklog()
    m = paced(
        lake,
        Pace(fraction=0.1, max_wait_s=1.0, quiet_s=0.3, defer_backlog=1_000, backlog_max_wait_s=4.0),
        unread=backlog.unread,
    )

    def applied_within(seconds: float) -> float:
        """Seconds until the mirror caught up (asserted to happen)."""
        started = time.monotonic()
        while m.mirror(DB, COLL).lag().changes and time.monotonic() < started + seconds:
            time.sleep(0.05)
        assert m.mirror(DB, COLL).lag().caught_up
        return time.monotonic() - started

    m.start()
    try:
        log.write([ev(f"d{i}", doc={"n": i}, offset=i) for i in range(200)])
        m.notify(DB, COLL, 200)
        applied_within(30)  # the first round at once: the mirror's size is not known
        assert len(docs(lake)) == 200
        backlog.report(TOPIC, 0, 600)
        backlog.report(TOPIC, 1, 400)  # 1,000 unread over two partitions: a backlog
        log.write([ev(f"d{i}", doc={"n": -1}, offset=200 + i) for i in range(50)])
        committed = time.monotonic()
        m.notify(DB, COLL, 50)  # a quarter of the mirror, then a pause: due twice over, but for the input
        applied_within(30)
        assert time.monotonic() - committed >= 4.0  # it waited the backlog's max wait, not 1 s
        assert {docs(lake)[f"d{i}"]["n"] for i in range(50)} == {-1}
        log.write([ev(f"d{i}", doc={"n": -2}, offset=250 + i) for i in range(50)])
        m.notify(DB, COLL, 50)
        backlog.forget(TOPIC, 1)  # 600 unread: the input is caught up, the pause starts the round
        assert applied_within(3.5) < 3.5
        assert {docs(lake)[f"d{i}"]["n"] for i in range(50)} == {-2}
    finally:
        m.stop()


def test_a_backlog_is_worked_off_in_rounds_of_a_share_of_the_mirror(lake) -> None:
    """A round takes at most `fraction` of the mirror's rows in changes (whole changelog versions,
    at least `min_round_rows`), so a backlog costs the same rewrite per change as paced rounds."""
    from dataflow.sink.materializer import Pace

    log = changelog(lake)
    m = paced(lake, Pace(fraction=0.25, max_wait_s=600, quiet_s=0.2, min_round_rows=50))
    for v in range(8):  # 400 new documents, 50 a version: an empty mirror's round takes them all
        log.write([ev(f"d{v * 50 + i}", doc={"n": 0}, offset=v * 50 + i) for i in range(50)])
    m.notify(DB, COLL, 400)
    m.start()
    try:
        m.drain(timeout=60)
        assert [(r.changes, r.appended) for r in m.rounds] == [(400, True)]
        for v in range(10):  # 500 updates: rounds of 100 (a quarter of 400), two versions each
            log.write(
                [ev(f"d{(v * 50 + i) % 400}", doc={"n": v}, offset=400 + v * 50 + i) for i in range(50)]
            )
        m.notify(DB, COLL, 500)
        m.drain(timeout=60)
        assert [r.changes for r in m.rounds[1:]] == [100] * 5
        assert all(r.rows_rewritten <= 400 and not r.appended for r in m.rounds[1:])
        assert m.mirror(DB, COLL).lag().caught_up
        got = docs(lake)
        # versions 8 and 9 wrap round to documents 0-99; the others keep their own version's value
        assert {k: d["n"] for k, d in got.items()} == {
            f"d{i}": (i // 50 + 8 if i < 100 else i // 50) for i in range(400)
        }
    finally:
        m.stop()


def test_pending_versions_counted_once_equal_a_fresh_count(lake) -> None:
    """`Changelog.pending` reads only the versions committed since its last call; what it returns
    for any mark, forwards or back, equals what a changelog read afresh returns."""
    from dataflow.lake.changelog import Changelog

    log = changelog(lake)
    uri = TableLocations(lake).uri(DB, COLL, "append")
    kept = Changelog(uri, DB, COLL)
    offset = 0
    for after in (-1, 1, 1, 3, 0, 6, 9, 2):
        for n in (3, 1):  # two commits between calls, of 3 rows and 1
            log.write([ev(f"d{offset + i}", doc={"n": offset}, offset=offset + i) for i in range(n)])
            offset += n
        every, latest = Changelog(uri, DB, COLL).pending(-1)
        assert sum(v.rows for v in every) == offset
        assert kept.pending(after) == ([v for v in every if v.version > after], latest)


def test_a_rounds_feed_is_in_commit_order_whatever_the_order_read() -> None:
    """A feed's batches come in any order of versions; a round applies them by version, each
    version's rows in the order written. A batch that mixes versions is sorted row by row."""
    from dataflow.lake.changelog import _in_commit_order

    def batch(version: int, rows: list[str]) -> pa.RecordBatch:
        return pa.record_batch({"_key": rows, "_commit_version": pa.array([version] * len(rows), pa.int64())})

    read = pa.Table.from_batches(
        [batch(3, ["e", "f"]), batch(1, ["a", "b"]), batch(2, ["d"]), batch(1, ["c"])]
    )
    ordered = _in_commit_order(read)
    assert ordered.column("_key").to_pylist() == ["a", "b", "c", "d", "e", "f"]
    assert ordered.column("_commit_version").to_pylist() == [1, 1, 1, 2, 3, 3]
    mixed = pa.table({"_key": ["z", "y", "x"], "_commit_version": pa.array([2, 1, 2], pa.int64())})
    assert _in_commit_order(mixed).column("_key").to_pylist() == ["y", "z", "x"]


def test_a_round_reads_only_the_mirror_files_its_documents_can_be_in(lake) -> None:
    """The MERGE's source is streamed, so delta-rs does not bound the target by the source's
    keys: the round does, and files whose `_key` range lies outside the round's are not read.
    Ids with quotes and backslashes go into that SQL text."""
    log, m = changelog(lake), mirror(lake, max_rows=10)
    groups = ["a", "b'\\", "c", "d"]
    offset = 0
    for g in groups:  # one append round each: one mirror file per group
        log.write([ev(f"{g}{i}", doc={"n": 0}, offset=offset + i) for i in range(10)])
        offset += 10
    assert [r.appended for r in m.catch_up()] == [True] * 4
    log.write([ev(f"{groups[1]}{i}", "update", updated={"n": 1}, offset=offset + i) for i in range(3)])
    (r,) = m.catch_up()
    assert not r.appended and r.changes == 3
    merge = DeltaTable(TableLocations(lake).uri(DB, COLL, "merge")).history(1)[0]["operationMetrics"]
    assert (merge["num_target_files_scanned"], merge["num_target_files_skipped_during_scan"]) == (1, 3)
    want = {f"{g}{i}": {"n": 1 if g == groups[1] and i < 3 else 0} for g in groups for i in range(10)}
    assert docs(lake) == want


def test_cdc_materialize_run_apart_paces_a_busy_table_too(lake) -> None:
    """`cdc materialize --follow` learns what each changelog gained from its row count, as the
    sink tells the embedded materializer: small commits in quick succession wait, a pause applies."""
    import subprocess
    import sys

    from tests.harness import ROOT, pipeline_env

    log = changelog(lake)
    log.write([ev(f"d{i}", doc={"n": i}, offset=i) for i in range(400)])
    env = pipeline_env(
        CDC_LAKE_URI=lake,
        CDC_LOG_LEVEL="INFO",
        CDC_LOG_FORMAT="text",
        CDC_MIRROR_ROUND_FRACTION="0.25",
        CDC_MAINTENANCE="0",
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dataflow.cli",
            "materialize",
            "--follow",
            "--interval",
            "0.2",
            "--metrics-port",
            "0",
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        m = mirror(lake)
        deadline = time.monotonic() + 60
        while not m.lag().caught_up and time.monotonic() < deadline:  # the catch-up at start
            time.sleep(0.1)
        assert m.lag().caught_up and len(docs(lake)) == 400
        time.sleep(1.0)  # the follower has looked at the changelog once (every 0.2 s): no first sight
        applied, offset = m.applied(), 400
        for _ in range(15):  # 2 changes every 0.2 s for 3 s: 30 < a quarter of 400, never quiet
            log.write([ev(f"d{offset - 400 + i}", doc={"n": -1}, offset=offset + i) for i in range(2)])
            offset += 2
            time.sleep(0.2)
        lag = m.lag()
        assert lag.applied == applied and lag.changes == 30
        deadline = time.monotonic() + 30  # commits stopped: caught up after the pause
        while not m.lag().caught_up and time.monotonic() < deadline:
            time.sleep(0.1)
        assert m.lag().caught_up and docs(lake)["d0"] == {"n": -1}
    finally:
        proc.terminate()
        proc.wait(30)


# ------------------------------------------------------------------ the README's SQL


def _readme_sql() -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Reading the tables") :]
    return section[section.index("```sql") + 6 : section.index("```", section.index("```sql") + 6)]


def test_the_readmes_sql_reads_what_a_fresh_read_reads(lake) -> None:
    """DuckDB runs the README's query (its `delta_scan` pointed at each table's files, as the
    delta extension would read them) against a mirror that trails its changelog."""
    import duckdb

    rng = random.Random(11)
    log, m = changelog(lake), mirror(lake, max_rows=15)
    offset = 0
    for _ in range(30):
        batch = []
        for _ in range(rng.randrange(1, 8)):
            _id = f"d{rng.randrange(12)}"
            op = rng.choice(["insert", "replace", "replace", "delete"])
            doc = None if op == "delete" else {"n": rng.randrange(100)}
            batch.append(ev(_id, op, doc, offset=offset, ts_ms=BASE_MS + offset * 1000))
            offset += 1
        log.write(batch)
        if rng.random() < 0.3:
            m.round()
    assert not m.lag().caught_up  # something is left for the overlay to do
    t = TableLocations(lake)
    sql = _readme_sql()
    for uri in (t.uri(DB, COLL, "append"), t.uri(DB, COLL, "merge")):
        files = ", ".join(f"'{f}'" for f in DeltaTable(uri).file_uris())
        public = uri.replace(lake, "s3://lake")
        sql = sql.replace(f"delta_scan('{public}')", f"read_parquet([{files}], union_by_name = true)")
    assert "delta_scan" not in sql
    got = {r[0]: r[1] for r in duckdb.sql(f"SELECT _id, n FROM ({sql.rstrip().rstrip(';')})").fetchall()}
    want = {d["_id"]: d.get("n") for d in current_documents(lake, DB, COLL).values()}
    assert got == want and len(got) > 3


# ------------------------------------------------------------------ during a run


@pytest.mark.integration
def test_a_fresh_read_during_a_run_equals_what_the_changelog_has_committed(kafka, s3, tmp_path) -> None:
    """`cdc read` while changes stream in and the mirror trails: it equals the changes the
    changelog held at some version between just before and just after the read, folded by
    an independent model."""
    import orjson

    from dataflow.decode.extjson import dumps
    from dataflow.lake.changelog import Changelog
    from services.generate import Generator, produce
    from tests.harness import PipelineProcess, cli, lake_env

    gen = Generator(
        collections=1, prefix=f"fresh{tmp_path.name[-6:]}", seed=13, doc_bytes=200, partial_ratio=0.4
    )
    messages = list(gen.messages(24_000))
    kafka.create_topics(gen.topics, partitions=2)
    bucket = s3.bucket("fresh")
    env = lake_env(
        kafka.bootstrap, s3.env, gen.topics, bucket, tmp_path, CDC_STOP_AT_END="0", CDC_BATCH_MAX_ROWS="500"
    )
    coll, so = gen.names[0], s3.storage_options
    changelog_uri = f"s3://{bucket}/lake/_changelog/{gen.db}/{coll}"

    def version() -> int:
        try:
            return DeltaTable(changelog_uri, storage_options=so).version()
        except Exception:
            return -1

    def model_at(v: int) -> dict[str, Any]:
        events = Changelog(changelog_uri, gen.db, coll, so).events(0, v)
        events.sort(key=lambda e: (e.partition, e.offset))  # a document's changes are on one partition
        return {i: orjson.loads(dumps({"_id": i, **d})) for i, d in model(events).items()}

    p = PipelineProcess(env, tmp_path / "pipeline.log")
    producer = threading.Thread(
        target=lambda: [
            produce(kafka.bootstrap, iter(messages[i : i + 1000])) or time.sleep(0.5)
            for i in range(0, len(messages), 1000)
        ]
    )
    producer.start()
    reads, behind = [], 0
    deadline = time.monotonic() + 240
    try:
        while len(reads) < 6 and time.monotonic() < deadline:
            before = version()
            if before < 1:
                time.sleep(0.5)
                continue
            out = cli(env, "read", f"{gen.db}.{coll}").stdout
            after = version()
            got = {d["_id"]: d for d in map(orjson.loads, out.splitlines())}
            assert any(got == model_at(v) for v in range(before, after + 1)), (before, after)
            lag = orjson.loads(cli(env, "status", "--json").stdout)
            behind += any(t["mirror"]["changes_behind"] > 0 for t in lag if "mirror" in t)
            reads.append(len(got))
            time.sleep(2)
    finally:
        producer.join()
        p.kill(signal.SIGTERM)
        assert p.wait(120) == 0, p.tail()
    assert len(reads) == 6 and reads[-1] > reads[0], reads
    print(f"\n{len(reads)} fresh reads of {reads} documents, {behind} while the mirror trailed its changelog")


@pytest.mark.integration
def test_a_pipeline_reading_a_backlog_leaves_the_mirror_until_it_is_read(kafka, s3, tmp_path) -> None:
    """Everything in Kafka before the start: the Kafka partitions tell the materializer what they
    left unread, so past the first round no mirror commit lands before the changelog holds all
    but the last few thousand changes; then the mirror catches up and equals the model."""
    from dataflow.lake.changelog import Changelog
    from services.generate import Generator, produce
    from tests.harness import Model, PipelineProcess, assert_exactly_once, lake_env

    gen = Generator(collections=1, prefix=f"defer{tmp_path.name[-6:]}", seed=5, doc_bytes=200)
    messages = list(gen.messages(120_000))
    kafka.create_topics(gen.topics, partitions=2)
    produce(kafka.bootstrap, iter(messages))
    model = Model()
    model.apply(messages)
    bucket, so = s3.bucket("defer"), s3.storage_options
    threshold = 5_000
    env = lake_env(
        kafka.bootstrap,
        s3.env,
        gen.topics,
        bucket,
        tmp_path,
        CDC_BATCH_MAX_ROWS="1000",
        CDC_MIRROR_DEFER_BACKLOG=str(threshold),
    )
    p = PipelineProcess(env, tmp_path / "pipeline.log")
    assert p.wait(300) == 0, p.tail()
    assert "input backlog of" in "".join(p.lines)
    assert_exactly_once(model, gen, bucket, so)

    coll = gen.names[0]
    versions, _ = Changelog(f"s3://{bucket}/lake/_changelog/{gen.db}/{coll}", gen.db, coll, so).pending(-1)
    total, running, by_time = sum(v.rows for v in versions), 0, []  # (commit time ms, rows by then)
    for v in sorted(versions, key=lambda v: v.timestamp_ms):
        running += v.rows
        by_time.append((v.timestamp_ms, running))

    def committed_by(ts: int) -> int:
        return max((n for t, n in by_time if t <= ts), default=0)

    mirror = DeltaTable(f"s3://{bucket}/lake/{gen.db}/{coll}", storage_options=so)
    rounds = sorted(h["timestamp"] for h in mirror.history() if h["operation"] in ("WRITE", "MERGE"))
    # A round starts once the partitions report fewer than `threshold` unread; what the pipeline
    # has read but not committed yet is at most a few batches.
    early = [ts for ts in rounds if committed_by(ts) < total - threshold - 10_000]
    assert len(rounds) >= 3 and len(early) <= 2, (len(rounds), [committed_by(ts) for ts in rounds], total)
