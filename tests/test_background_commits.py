"""Background commits: in order, one at a time, errors surfacing, batches held until durable, even across a crash.

These test the hand-over logic with a stand-in writer; the crash and SIGTERM
tests (tests/test_crash_recovery.py) run it against Kafka and MinIO.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSource, run_main

from dataflow.batch.inflight import Inflight
from dataflow.batch.tables import Batch, BatchLimits, batch_by_table
from dataflow.sink.lake import _LakePartition
from tests.test_batching import ev, parsed


class GatedWriter:
    """Commits when the test opens the gate; records what it committed, in order."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.gate = threading.Semaphore(0)
        self.started = threading.Semaphore(0)
        self.committed: list[int] = []
        self.fail_on = fail_on
        self.stats: dict = {}
        self.dlq = self

    def write(self, batch: Batch) -> None:
        self.started.release()
        assert self.gate.acquire(timeout=10)
        first = batch.events[0].offset
        if first == self.fail_on:
            raise OSError(f"storage refused batch {first}")
        self.committed.append(first)

    def close(self) -> None:  # the DLQ writer's close
        pass


def batch(first: int) -> Batch:
    return Batch("shop.c0", [ev(i) for i in range(first, first + 3)], opened_at=1.0)


def test_write_batch_returns_while_the_commit_runs_and_the_batch_stays_held_until_it_lands() -> None:
    writer, inflight = GatedWriter(), Inflight()
    part = _LakePartition(writer, inflight)  # type: ignore[arg-type]
    b0, b1 = batch(0), batch(3)
    inflight.add(b0)
    inflight.add(b1)
    part.write_batch([b0])  # returns at once: the worker reads on
    assert writer.started.acquire(timeout=10)
    assert inflight.pending("shop.c0") == [b0, b1] and writer.committed == []

    handed = threading.Thread(target=part.write_batch, args=([b1],))
    handed.start()  # waits for b0's commit before handing b1 over: one at a time
    handed.join(0.2)
    assert handed.is_alive()
    writer.gate.release()
    handed.join(10)
    assert not handed.is_alive() and writer.committed == [0]
    assert inflight.pending("shop.c0") == [b1]

    writer.gate.release()
    part.close()  # waits for the last commit
    assert writer.committed == [0, 3] and inflight.rows == 0


def test_a_failed_commit_stops_the_worker_and_its_batch_stays_held() -> None:
    writer, inflight = GatedWriter(fail_on=0), Inflight()
    part = _LakePartition(writer, inflight)  # type: ignore[arg-type]
    b0 = batch(0)
    inflight.add(b0)
    part.write_batch([b0])
    writer.gate.release()
    with pytest.raises(OSError, match="storage refused batch 0"):
        part.write_batch([batch(3)])  # the next hand-over raises what the commit raised
    assert inflight.pending("shop.c0") == [b0]  # still in the snapshots: a restart commits it
    assert writer.committed == []


def test_without_inflight_each_batch_is_committed_before_write_batch_returns() -> None:
    writer = GatedWriter()
    part = _LakePartition(writer)  # type: ignore[arg-type]
    writer.gate.release()
    part.write_batch([batch(0)])
    assert writer.committed == [0]


class HandedOver(DynamicSink[Batch]):
    """Records every batch it is given; releases them from `inflight` only if `durable` (else: still committing)."""

    def __init__(self, inflight: Inflight, durable: bool) -> None:
        self.inflight, self.durable, self.got = inflight, durable, []

    def build(self, step_id: str, worker_index: int, worker_count: int) -> StatelessSinkPartition[Batch]:
        sink = self

        class Part(StatelessSinkPartition[Batch]):
            def write_batch(self, items: list[Batch]) -> None:
                for b in items:
                    sink.got.append([e.offset for e in b.events])
                    if sink.durable:
                        sink.inflight.release(b)

        return Part()


def run(items: list, recovery: RecoveryConfig, durable: bool) -> list[list[int]]:
    inflight = Inflight()
    sink = HandedOver(inflight, durable)
    flow = Dataflow("handover")
    s = op.input("in", flow, TestingSource(items, batch_size=2))
    limits = BatchLimits(max_rows=4, max_bytes=10**9, max_seconds=60)
    op.output("out", batch_by_table("b", s, limits=limits, inflight=inflight), sink)
    try:
        run_main(flow, epoch_interval=timedelta(0), recovery_config=recovery)
    except Exception as e:  # the simulated crash
        if "AbortExecution" not in f"{type(e).__name__}{e}":
            raise
    return sink.got


def test_batches_handed_to_the_sink_but_not_committed_survive_a_crash(tmp_path) -> None:
    events = parsed(12)
    items = [*events[:10], TestingSource.ABORT(), *events[10:]]
    init_db_dir(tmp_path, 1)
    recovery = RecoveryConfig(str(tmp_path))
    first = run(items, recovery, durable=False)
    assert [0, 1, 2, 3] in first and [4, 5, 6, 7] in first  # handed over, then the process "died"
    second = run(items, recovery, durable=True)
    # Nothing of the first life was committed: the second must deliver every event, once each.
    delivered = [o for b in second for o in b]
    assert sorted(delivered) == list(range(12)), second
