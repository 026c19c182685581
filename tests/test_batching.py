"""Per-table batching: limits on rows, bytes, and age since the first event."""

from __future__ import annotations

import pickle

import bytewax.operators as op
from bytewax.connectors.kafka import KafkaSourceMessage
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main

from dataflow.batching import Batch, BatchLimits, TableBatcher, batch_by_table
from dataflow.events import parse
from dataflow.generate import Generator
from dataflow.model import ChangeEvent, EventChunk


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
        limits = BatchLimits(max_rows=4, max_seconds=60)
        op.output("out", batch_by_table("b", s, limits=limits), TestingSink(out))
        run_main(flow)
        return sorted((b.table, [e.offset for e in b.events]) for b in out)

    assert batches(chunks) == batches(events)
    assert sum(len(offsets) for _, offsets in batches(chunks)) == 40
