"""The Bytewax sink that commits closed batches to their Delta tables.

Every table's batches arrive on the worker that owns the table's key, so each
worker keeps one `CommitPolicy` (a writer per table) and commits in arrival
order. Given the batchers' `Inflight`, each worker commits on a thread of its
own (`dataflow.sink.committer`) and releases each batch from `Inflight` once
it is committed or dead-lettered; without, each batch is committed before
`write_batch` returns.

In merge mode each worker also runs a `Materializer`, which brings the
mirrors of the tables it commits up to date from their changelogs. At the end
of the input it waits for them to catch up, unless the end is a graceful
shutdown: then it stops after the round under way, and the rest waits in the
changelogs for the next start.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from bytewax.outputs import DynamicSink, StatelessSinkPartition

from dataflow.batch.inflight import Inflight
from dataflow.batch.tables import Batch
from dataflow.runtime import shutdown
from dataflow.sink.committer import CommitThread
from dataflow.sink.materializer import Materializer
from dataflow.sink.policy import CommitPolicy, TableStats

log = logging.getLogger(__name__)


class BatchWriter(Protocol):
    """What the sink needs of a writer: `CommitPolicy` in the pipeline, a stand-in in tests."""

    stats: dict[str, TableStats]

    def write(self, batch: Batch) -> None: ...

    def close(self) -> None: ...


class _LakePartition(StatelessSinkPartition[Batch]):
    def __init__(
        self, writer: BatchWriter, inflight: Inflight | None = None, materializer: Materializer | None = None
    ) -> None:
        self.writer = writer
        self.inflight = inflight
        self.committer = CommitThread(self._commit) if inflight is not None else None
        self.materializer = materializer
        if materializer is not None:
            materializer.start()

    def _commit(self, batch: Batch) -> None:
        self.writer.write(batch)
        if self.inflight is not None:
            self.inflight.release(batch)

    def write_batch(self, items: list[Batch]) -> None:
        if self.materializer is not None:
            self.materializer.check()
        for batch in items:
            if self.committer is None:
                self._commit(batch)
            else:
                self.committer.submit(batch)

    def close(self) -> None:
        if self.committer is not None:
            self.committer.wait()
        if self.materializer is not None:
            if not shutdown.requested():
                log.info("end of input: waiting for the mirrors to catch up with their changelogs")
                self.materializer.drain()
            self.materializer.stop()
        for table, s in sorted(self.writer.stats.items()):
            log.info(
                "%s: %d events, %d rows written, %d already committed, %d dead-lettered, %d commits, "
                "Delta version %s",
                table,
                s.events,
                s.written,
                s.skipped,
                s.dead_lettered,
                s.commits,
                s.version,
                extra={"table": table, "version": s.version, "rows": s.written},
            )
        self.writer.close()


class LakeSink(DynamicSink[Batch]):
    """Bytewax sink: closed batches in, Delta commits out; one `CommitPolicy` per worker.

    With `inflight` (the one given to `batch_by_table`), commits run in the
    background and release each batch from it once durable.
    """

    def __init__(
        self,
        policy: Callable[[], CommitPolicy],
        inflight: Inflight | None = None,
        materializer: Callable[[int, int], Materializer | None] | None = None,
    ) -> None:
        self.policy = policy
        self.inflight = inflight
        self.materializer = materializer

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _LakePartition:
        policy = self.policy()
        m = None if self.materializer is None else self.materializer(worker_index, worker_count)
        if m is not None:
            policy.on_commit = m.notify
        return _LakePartition(policy, self.inflight, m)
