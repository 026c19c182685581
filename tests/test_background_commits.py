"""The sink's background commits: in order, one at a time, errors surfacing, batches released when durable.

These test the hand-over logic with a stand-in writer; the crash and SIGTERM
tests (tests/test_crash_recovery.py) run it against Kafka and MinIO.
"""

from __future__ import annotations

import threading

import pytest

from dataflow.batching import Batch
from dataflow.inflight import Inflight
from dataflow.lake_sink import _LakePartition
from tests.test_batching import ev


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
