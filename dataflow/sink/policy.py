"""What the sink does with each failure of a commit (the vocabulary of `dataflow.runtime.failures`).

- UNAVAILABLE (storage down, throttling, a lost commit race): wait, under the
  one retry policy and the breaker, for as long as it lasts. The worker stalls,
  so the input stalls, and Kafka keeps the data.
- BAD_DATA (a value no column type holds): halve the batch, in order, until
  the refused events are alone, and dead-letter exactly those.
- BUG or CONFIG (anything else): raise. Bytewax stops the dataflow; the batch
  is still in Kafka and in the recovery snapshot, and nothing is dead-lettered.
"""

from __future__ import annotations

import collections
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from dataflow.batch.tables import Batch
from dataflow.dlq.writer import DLQWriter
from dataflow.lake.writer import DeltaTableWriter, WriteResult
from dataflow.model import ChangeEvent, DeadLetter, Reason
from dataflow.runtime.failures import BadData, Kind, classify, describe
from dataflow.runtime.metrics import (
    CHECKPOINT_FAILURES,
    CHECKPOINT_LAG,
    CHECKPOINTS_COMMITTED,
    COMMIT_DURATION,
    COMMITS,
    END_TO_END_LAG,
    EVENTS_OUT,
)
from dataflow.runtime.retry import RetryPolicy, StorageBreaker
from dataflow.runtime.settings import LakeSettings
from dataflow.sink.upkeep import Upkeep

log = logging.getLogger(__name__)


@dataclass
class TableStats:
    events: int = 0
    written: int = 0
    skipped: int = 0
    dead_lettered: int = 0
    commits: int = 0
    version: int | None = None


class CommitPolicy:
    """Commits batches for any number of tables, applying the failure vocabulary to every commit."""

    def __init__(
        self,
        lake: LakeSettings,
        dlq: DLQWriter,
        *,
        retry: RetryPolicy,
        breaker: StorageBreaker,
        end_offsets: Callable[[], dict[tuple[str, int], int]] | None = None,
        on_commit: Callable[[str, str, int], None] | None = None,
    ) -> None:
        self.tables = lake.tables
        self.dlq = dlq
        self.pipeline = lake.pipeline_name
        self.max_columns = lake.max_columns
        self.storage_options = lake.storage_options or None
        self.retry = retry
        self.breaker = breaker
        self.writers: dict[tuple[str, str], DeltaTableWriter] = {}
        self.stats: dict[str, TableStats] = defaultdict(TableStats)
        self.committed: dict[tuple[str, int], int] = {}
        self.end_offsets = end_offsets
        self.next_lag_check = 0.0
        self.on_commit = on_commit  # (db, collection, rows): a changelog grew (the materializer's cue)
        # compaction, vacuum, checkpoints and log clean-up of the changelogs, between their commits
        self.upkeep = Upkeep(
            lake.tables.lake_uri,
            policy=lake.maintenance,
            interval_s=lake.maintenance_interval_s,
            storage_options=self.storage_options,
            pipeline=self.pipeline,
        )

    def writer(self, ev: ChangeEvent) -> DeltaTableWriter:
        """The table's changelog: every batch is committed there, in either table mode."""
        key = (ev.table, "append")
        if key not in self.writers:
            self.writers[key] = DeltaTableWriter(
                self.tables.uri(ev.db, ev.collection, "append"),
                mode="append",
                pipeline=self.pipeline,
                storage_options=self.storage_options,
                max_columns=self.max_columns,
            )
        return self.writers[key]

    def write(self, batch: Batch) -> None:
        if batch.rejected:  # restored from a snapshot, and no longer decodable
            self.dlq.write(batch.rejected)
        if not batch.events:
            return
        stats = self.stats[batch.table]
        stats.events += len(batch.events)
        first = batch.events[0]
        writer = self.writer(first)
        self._commit(writer, batch.events, stats)
        if self.on_commit is not None:
            self.on_commit(first.db, first.collection, len(batch.events))
        self.upkeep.after_commit(writer.uri, "changelog", batch.table)
        self._export_lag()

    def close(self) -> None:
        self.dlq.close()

    def _attempt(self, writer: DeltaTableWriter, events: list[ChangeEvent]) -> WriteResult:
        try:
            return writer.write(events)
        except Exception:
            CHECKPOINT_FAILURES.labels(events[0].table).inc()
            raise

    def _commit(self, writer: DeltaTableWriter, events: list[ChangeEvent], stats: TableStats) -> None:
        table = events[0].table
        log.info(
            "commit begin %s: %d events", writer.uri, len(events), extra={"table": table, "rows": len(events)}
        )
        started = time.monotonic()
        try:
            result = self.retry.call(
                lambda: self._attempt(writer, events), operation="delta_commit", breaker=self.breaker
            )
        except Exception as exc:
            if classify(exc) is not Kind.BAD_DATA:
                log.error(
                    "stopping: %s committing %d events to %s (%s); nothing is dead-lettered, "
                    "the events stay in Kafka and are read again at the next start",
                    describe(exc),
                    len(events),
                    writer.uri,
                    type(exc).__name__,
                    extra={"table": table},
                )
                raise
            self._bisect(writer, events, stats, exc)
            return
        elapsed = time.monotonic() - started
        log.info(
            "commit end %s: version %s, %d rows, %d skipped",
            writer.uri,
            result.version,
            result.rows_written,
            result.skipped,
            extra={"table": table, "version": result.version, "rows": result.rows_written},
        )
        self._record(result, events, stats, elapsed)

    def _record(
        self,
        result: WriteResult,
        events: list[ChangeEvent],
        stats: TableStats,
        elapsed: float,
    ) -> None:
        table = events[0].table
        COMMIT_DURATION.labels(table, "append").observe(elapsed)  # every commit is to a changelog
        if result.committed:
            COMMITS.labels(table, "append").inc()
            stats.commits += 1
        stats.version = result.version
        stats.written += result.rows_written
        stats.skipped += result.skipped
        for (topic, partition), offset in result.offsets.items():
            if offset > self.committed.get((topic, partition), -1):
                self.committed[(topic, partition)] = offset
                CHECKPOINTS_COMMITTED.labels(topic, str(partition)).inc()
        ops = collections.Counter(e.op for e in events)
        for op_name, n in ops.items():
            EVENTS_OUT.labels(table, op_name).inc(n)
        oldest = min(e.ts_ms for e in events)
        END_TO_END_LAG.labels(table).observe(max(0.0, time.time() - oldest / 1000))

    def _bisect(
        self,
        writer: DeltaTableWriter,
        events: list[ChangeEvent],
        stats: TableStats,
        exc: Exception,
    ) -> None:
        """Halve a refused batch, in order, until the refused events are alone; dead-letter those.

        In order, because each commit records its highest offset per partition:
        committing a later half first would make the sink skip the earlier one.
        A batch of n events with k bad ones costs about 2k log2(n) commits.
        """
        if len(events) > 1:
            mid = len(events) // 2
            for half in (events[:mid], events[mid:]):
                self._commit(writer, half, stats)
            return
        ev = events[0]
        reason = exc.reason if isinstance(exc, BadData) else Reason.DELTA_WRITE_ERROR
        log.error(
            "Delta refused %s %s:%s@%s: %s",
            ev.table,
            ev.topic,
            ev.partition,
            ev.offset,
            exc,
            extra={"table": ev.table, "topic": ev.topic, "partition": ev.partition, "offset": ev.offset},
        )
        stats.dead_lettered += 1
        self.dlq.write([dead_letter_for(ev, reason, exc, writer.mode)])

    def _export_lag(self) -> None:
        """`cdc_checkpoint_lag_offsets`: how far the recorded offsets trail the partitions' ends."""
        if self.end_offsets is None or time.monotonic() < self.next_lag_check:
            return
        self.next_lag_check = time.monotonic() + 30
        try:
            ends = self.end_offsets()
        except Exception as e:  # a metric must never stop the pipeline
            log.warning("could not read end offsets for the checkpoint lag metric: %s", e)
            return
        for (topic, partition), committed in self.committed.items():
            if (end := ends.get((topic, partition))) is not None:
                CHECKPOINT_LAG.labels(topic, str(partition)).set(max(0, end - 1 - committed))


def dead_letter_for(ev: ChangeEvent, reason: Reason, exc: BaseException, mode: str) -> DeadLetter:
    """A dead letter for an event that decoded fine but that the table refused."""
    return DeadLetter(
        reason=reason,
        error=f"{type(exc).__name__}: {exc}"[:2000],
        key=ev.raw_key,
        value=ev.raw_value,
        topic=ev.topic,
        partition=ev.partition,
        offset=ev.offset,
        metadata={"table": ev.table, "mode": mode, "id": ev.id, "op": ev.op},
    )
