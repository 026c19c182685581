"""Per-table batching: limits on rows, bytes, and age since the first event."""

from __future__ import annotations

import pickle
from datetime import timedelta

import bytewax.operators as op
import orjson
from bytewax.connectors.kafka import KafkaSourceMessage
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, run_main

from dataflow.batch.inflight import Inflight
from dataflow.batch.tables import (
    Batch,
    BatchLimits,
    BatchSnapshot,
    OpenRows,
    TableBatcher,
    TableSnapshot,
    batch_by_table,
)
from dataflow.decode.envelopes import parse
from dataflow.model import ChangeEvent, EventChunk, Reason
from services.generate import Generator


def ev(i: int, table: str = "c0", size: int = 100) -> ChangeEvent:
    return ChangeEvent(
        "shop", table, str(i), "insert", {"_id": str(i)}, 0, 0, f"cdc.shop.{table}", 0, i, size
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_closes_at_max_rows() -> None:
    logic = TableBatcher(BatchLimits(max_rows=3, max_bytes=10**9, max_seconds=60), clock=Clock())
    out, _ = logic.on_batch([ev(i) for i in range(7)])
    assert [[e.offset for e in b.events] for b in out] == [[0, 1, 2], [3, 4, 5]]
    assert [e.offset for e in logic.open.events] == [6]


def test_closes_at_max_bytes() -> None:
    logic = TableBatcher(BatchLimits(max_rows=1000, max_bytes=250, max_seconds=60), clock=Clock())
    out, _ = logic.on_batch([ev(i, size=100) for i in range(5)])
    assert [len(b.events) for b in out] == [3]
    assert out[0].nbytes == 300


def test_deadline_counts_from_the_first_event_not_the_last() -> None:
    clock = Clock()
    logic = TableBatcher(BatchLimits(max_rows=1000, max_bytes=10**9, max_seconds=5), clock=clock)
    emitted: list[Batch] = []
    for i in range(12):  # one event a second, a steady stream
        out, _ = logic.on_batch([ev(i)])
        emitted.extend(out)
        clock.now += 1.0
    # op.collect's timeout would restart on every item and never fire here.
    assert [len(b.events) for b in emitted] == [6, 6]
    assert logic.notify_at() is None or logic.open.events == []


def test_notify_at_is_first_event_plus_max_seconds() -> None:
    clock = Clock()
    logic = TableBatcher(BatchLimits(max_rows=1000, max_bytes=10**9, max_seconds=5), clock=clock)
    assert logic.notify_at() is None
    logic.on_batch([ev(0)])
    first = logic.notify_at()
    clock.now += 3
    logic.on_batch([ev(1)])
    assert logic.notify_at() == first
    assert first.timestamp() == 1_005.0
    out, _ = logic.on_notify()
    assert [e.offset for e in out[0].events] == [0, 1]


def test_open_batch_survives_a_snapshot_round_trip() -> None:
    gen = Generator(collections=1, seed=5, doc_bytes=300)
    msgs = [m for m in gen.messages(40) if m.value is not None]
    events = [
        parse(KafkaSourceMessage(m.key, m.value, topic=m.topic, partition=1, offset=i))
        for i, m in enumerate(msgs)
    ]
    clock = Clock()
    logic = TableBatcher(BatchLimits(max_rows=100, max_bytes=10**9, max_seconds=5), clock=clock)
    logic.on_batch(events)
    state = pickle.loads(pickle.dumps(logic.snapshot()))
    resumed = TableBatcher(BatchLimits(max_rows=100, max_bytes=10**9, max_seconds=5), state, clock=clock)
    assert resumed.notify_at() == logic.notify_at()
    out, _ = resumed.on_eof()
    got = out[0].events
    assert [(e.offset, e.id, e.op, e.doc, e.updated, e.seq) for e in got] == [
        (e.offset, e.id, e.op, e.doc, e.updated, e.seq) for e in events
    ]
    assert out[0].nbytes == sum(e.size for e in events)


def test_dataflow_batches_per_table_and_flushes_at_eof() -> None:
    events = [ev(i, table=f"c{i % 3}") for i in range(25)]
    out: list[Batch] = []
    flow = Dataflow("batching")
    s = op.input("in", flow, TestingSource(events))
    op.output("out", batch_by_table("b", s, limits=BatchLimits(max_rows=4, max_seconds=60)), TestingSink(out))
    run_main(flow)
    assert sorted(e.offset for b in out for e in b.events) == list(range(25))
    for b in out:
        assert {e.table for e in b.events} == {f"shop.{b.table.split('.')[-1]}"}
        assert len(b.events) <= 4
        offsets = [e.offset for e in b.events]
        assert offsets == sorted(offsets)


def test_chunks_are_batched_like_the_events_they_hold() -> None:
    events = [ev(i, table=f"c{i % 3}") for i in range(40)]
    chunks: list[EventChunk] = []
    for start in range(0, 40, 8):  # source batches of 8 messages, grouped by table as the parse step does
        by_table: dict[str, EventChunk] = {}
        for e in events[start : start + 8]:
            by_table.setdefault(e.table, EventChunk(e.table, [])).events.append(e)
        chunks.extend(by_table.values())

    def batches(items: list) -> list[tuple[str, list[int]]]:
        out: list[Batch] = []
        flow = Dataflow("chunks")
        s = op.input("in", flow, TestingSource(items))
        # Per-table limits only: the shared bound is checked once per step, so it sees chunks coarser.
        limits = BatchLimits(max_rows=4, max_seconds=60, max_open_rows=10**6)
        op.output("out", batch_by_table("b", s, limits=limits), TestingSink(out))
        run_main(flow)
        return sorted((b.table, [e.offset for e in b.events]) for b in out)

    assert batches(chunks) == batches(events)
    assert sum(len(offsets) for _, offsets in batches(chunks)) == 40


def test_tables_filling_together_close_in_turn_within_the_shared_bound() -> None:
    limits = BatchLimits(max_rows=1000, max_bytes=10**9, max_seconds=60, max_open_rows=30)
    shared = OpenRows(limits.open_rows_bound)
    tables = ["c0", "c1", "c2"]
    logic = {t: TableBatcher(limits, clock=Clock(), open_rows=shared) for t in tables}
    closed: list[tuple[str, int, int]] = []  # table, rows of the closed batch, rows left open
    peak = 0
    for step in range(200):  # each table gets one event per round, as round-robin partitions give them
        t = tables[step % 3]
        out, _ = logic[t].on_batch([ev(step, table=t)])
        held = sum(len(x.open.events) for x in logic.values())
        closed += [(t, len(b.events), held) for b in out]
        peak = max(peak, held)
    assert peak <= 30 + 2  # the largest closes on its next event: at most a step late per other table
    assert sum(n for _, n, _ in closed) + sum(len(x.open.events) for x in logic.values()) == 200
    # The first round closes at a third of the bound; after it the tables take turns,
    # each closing at about half the bound, holding the other half open.
    settled = closed[3:]
    assert len(settled) >= 6
    assert all(14 <= n <= 17 for _, n, _ in settled), settled
    assert all(13 <= left <= 17 for _, _, left in settled), settled
    assert [t for t, _, _ in settled[:3]] in (["c2", "c0", "c1"], ["c0", "c1", "c2"], ["c1", "c2", "c0"])


def test_many_tables_share_one_bound_instead_of_one_each() -> None:
    events = [ev(i, table=f"c{i % 12}") for i in range(600)]
    out: list[Batch] = []
    flow = Dataflow("bounded")
    s = op.input("in", flow, TestingSource(events, batch_size=12))
    limits = BatchLimits(max_rows=100, max_seconds=60, max_open_rows=60)
    op.output("out", batch_by_table("b", s, limits=limits), TestingSink(out))
    run_main(flow)
    assert sorted(e.offset for b in out for e in b.events) == list(range(600))
    # With a bound per table only, 12 tables x 50 events would have closed nothing before the end.
    assert len(out) > 12
    assert max(len(b.events) for b in out) < 100


def test_a_resumed_batch_counts_against_the_shared_bound() -> None:
    limits = BatchLimits(max_rows=1000, max_bytes=10**9, max_seconds=60, max_open_rows=10)
    gen = Generator(collections=1, seed=3, doc_bytes=200)
    msgs = [m for m in gen.messages(12) if m.value is not None][:8]
    events = [
        parse(KafkaSourceMessage(m.key, m.value, topic=m.topic, partition=0, offset=i))
        for i, m in enumerate(msgs)
    ]
    first = TableBatcher(limits, clock=Clock())
    first.on_batch(events)
    state = pickle.loads(pickle.dumps(first.snapshot()))
    shared = OpenRows(limits.open_rows_bound)
    TableBatcher(limits, state, clock=Clock(), open_rows=shared)
    assert shared.total == 8
    other = TableBatcher(limits, clock=Clock(), open_rows=shared)
    out, _ = other.on_batch([ev(i, table="other") for i in range(3)])
    assert out == []  # total 11 is past the bound, but the resumed batch is the larger
    assert shared.should_close(events[0].table)


def parsed(n: int, seed: int = 9) -> list[ChangeEvent]:
    gen = Generator(collections=1, seed=seed, doc_bytes=200)
    msgs = [m for m in gen.messages(n * 2) if m.value is not None][:n]
    return [
        parse(KafkaSourceMessage(m.key, m.value, topic=m.topic, partition=0, offset=i))
        for i, m in enumerate(msgs)
    ]


def test_a_closed_batch_stays_in_the_snapshot_until_the_sink_releases_it() -> None:
    inflight = Inflight()
    limits = BatchLimits(max_rows=4, max_bytes=10**9, max_seconds=60)
    events = parsed(10)
    logic = TableBatcher(limits, clock=Clock(), inflight=inflight)
    out, _ = logic.on_batch(events)
    assert [[e.offset for e in b.events] for b in out] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    snap = logic.snapshot()
    assert [[m[2] for m in b.messages] for b in snap.closed] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [m[2] for m in snap.open.messages] == [8, 9]
    inflight.release(out[0])  # committed: the next snapshot no longer carries it
    assert [[m[2] for m in b.messages] for b in logic.snapshot().closed] == [[4, 5, 6, 7]]
    inflight.release(out[1])
    assert logic.snapshot().closed == [] and inflight.rows == 0


def test_a_restored_batcher_hands_over_its_closed_batches_first() -> None:
    limits = BatchLimits(max_rows=4, max_bytes=10**9, max_seconds=60)
    events = parsed(10)
    crashed = TableBatcher(limits, clock=Clock(), inflight=Inflight())
    crashed.on_batch(events[:6])  # [0..3] closed and never committed, [4, 5] open
    state = pickle.loads(pickle.dumps(crashed.snapshot()))

    inflight = Inflight()
    resumed = TableBatcher(limits, state, clock=Clock(), inflight=inflight)
    assert inflight.rows == 4  # held again until the sink commits it anew
    assert resumed.notify_at() is not None  # woken at once, even with no new input
    out, _ = resumed.on_notify()
    assert [[e.offset for e in b.events] for b in out] == [[0, 1, 2, 3]]
    assert [e.offset for e in resumed.open.events] == [4, 5]  # its own deadline is not yet due
    out, _ = resumed.on_batch(events[6:])
    assert [[e.offset for e in b.events] for b in out] == [[4, 5, 6, 7]]
    assert [[m[2] for m in b.messages] for b in resumed.snapshot().closed] == [[0, 1, 2, 3], [4, 5, 6, 7]]

    # New input before the wake-up: the restored batch still goes first.
    again = TableBatcher(limits, state, clock=Clock(), inflight=Inflight())
    out, _ = again.on_batch(events[6:8])
    assert [[e.offset for e in b.events] for b in out] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def big_message(mib: int, offset: int) -> KafkaSourceMessage:
    """A Debezium insert whose value is `mib` MiB, past the default 16 MiB document limit."""
    gen = Generator(collections=1, seed=4, doc_bytes=200)
    m = next(m for m in gen.messages(50) if m.change is not None and m.change.op == "insert")
    env = orjson.loads(m.value)
    after = orjson.loads(env["payload"]["after"])
    after["blob"] = "x" * (mib * 1024 * 1024)
    env["payload"]["after"] = orjson.dumps(after).decode()
    return KafkaSourceMessage(m.key, orjson.dumps(env), topic=m.topic, partition=0, offset=offset)


def test_a_snapshot_holding_a_document_past_the_default_limit_restores() -> None:
    """CDC_MAX_DOCUMENT_BYTES above 16 MiB, then a crash: the next start must not loop on the snapshot."""
    big = parse(big_message(17, offset=0), max_bytes=64 * 1024 * 1024)
    assert type(big) is ChangeEvent
    limits = BatchLimits(max_rows=100, max_bytes=10**9, max_seconds=60)
    crashed = TableBatcher(limits, clock=Clock())
    crashed.on_batch([big, *parsed(2)])
    state = pickle.loads(pickle.dumps(crashed.snapshot()))
    resumed = TableBatcher(limits, state, clock=Clock())
    assert [e.offset for e in resumed.open.events] == [0, 0, 1]
    assert resumed.open.events[0].doc["blob"] == big.doc["blob"]
    assert resumed.open.rejected == []


def test_a_snapshot_message_that_no_longer_decodes_becomes_a_dead_letter_not_a_crash() -> None:
    limits = BatchLimits(max_rows=100, max_bytes=10**9, max_seconds=60)
    events = parsed(3)
    state = BatchSnapshot.of(Batch(events[0].table, list(events), opened_at=1_000.0))
    # As if the decoder had changed since the crash: one message it once took, it now refuses.
    topic, partition, offset, key, value, ts_ms, ord_, replayed = state.messages[1]
    state.messages[1] = (topic, partition, offset, key, b"{not json", ts_ms, ord_, replayed)
    resumed = TableBatcher(limits, TableSnapshot([], state), clock=Clock())
    assert [e.offset for e in resumed.open.events] == [0, 2]
    assert [(d.offset, d.reason) for d in resumed.open.rejected] == [(1, Reason.CORRUPTED_DATA)]
    assert resumed.notify_at() is not None
    # The rejected message stays in the snapshot until the batch is handed over, then travels with it.
    again = TableBatcher(limits, pickle.loads(pickle.dumps(resumed.snapshot())), clock=Clock())
    assert [d.offset for d in again.open.rejected] == [1]
    out, _ = again.on_eof()
    assert [(len(b.events), [d.offset for d in b.rejected]) for b in out] == [(2, [1])]


def test_a_restored_batch_past_the_default_limit_is_delivered_after_a_real_crash(tmp_path) -> None:
    """Through Bytewax's own recovery store: snapshot at the abort, restore at the next run."""
    big = parse(big_message(17, offset=100), max_bytes=64 * 1024 * 1024)
    items = [big, TestingSource.ABORT(), *parsed(2)]
    init_db_dir(tmp_path, 1)
    recovery = RecoveryConfig(str(tmp_path))

    def run() -> list[list[int]]:
        got: list[Batch] = []
        flow = Dataflow("big")
        s = op.input("in", flow, TestingSource(items, batch_size=1))
        limits = BatchLimits(max_rows=100, max_bytes=10**9, max_seconds=3600)
        op.output("out", batch_by_table("b", s, limits=limits), TestingSink(got))
        try:
            run_main(flow, epoch_interval=timedelta(0), recovery_config=recovery)
        except Exception as e:  # the simulated crash
            if "AbortExecution" not in f"{type(e).__name__}{e}":
                raise
        return [[e.offset for e in b.events] for b in got]

    assert run() == []  # the big event sat in the open batch when the process died
    assert run() == [[100, 0, 1]]  # restored from the snapshot, in spite of its size


def test_a_snapshot_keeps_the_replay_mark_and_reads_older_snapshots() -> None:
    """A replayed dead letter stays one after a restore; a snapshot from before the mark restores too."""
    events = parsed(2)
    batch = Batch(events[0].table, list(events))
    batch.events[1].replayed = True
    snap = BatchSnapshot.of(batch)
    assert [e.replayed for e in snap.restore().events] == [False, True]
    snap.messages = [m[:7] for m in snap.messages]  # as written before the mark existed
    assert [e.replayed for e in snap.restore().events] == [False, False]
