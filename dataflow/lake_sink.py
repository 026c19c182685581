"""The Bytewax sink that commits closed batches to their Delta tables.

Every table's batches arrive on the worker that owns the table's key, so each
worker keeps one `DeltaTableWriter` per table and commits in arrival order.
Storage trouble is waited out (the input stalls and Kafka keeps the data); a
batch that Delta refuses because of its data is split until the events at
fault are found, and only those are dead-lettered.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

from bytewax.outputs import DynamicSink, StatelessSinkPartition

from dataflow.batching import Batch
from dataflow.delta_sink import DeltaTableWriter
from dataflow.dlq import DLQWriter
from dataflow.model import ChangeEvent, DeadLetter, Reason
from dataflow.resilience import Backoff, is_retryable, retry
from dataflow.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class TableStats:
    events: int = 0
    written: int = 0
    skipped: int = 0
    dead_lettered: int = 0
    commits: int = 0
    version: int | None = None


class LakeWriter:
    """Commits batches for any number of tables; owns retries and the split-on-bad-data logic."""

    def __init__(self, settings: Settings, dlq: DLQWriter, backoff: Backoff | None = None) -> None:
        self.settings = settings
        self.dlq = dlq
        self.backoff = backoff or Backoff()
        self.writers: dict[tuple[str, str], DeltaTableWriter] = {}
        self.stats: dict[str, TableStats] = defaultdict(TableStats)

    def writer(self, ev: ChangeEvent, mode: str) -> DeltaTableWriter:
        key = (ev.table, mode)
        if key not in self.writers:
            self.writers[key] = DeltaTableWriter(
                self.settings.table_uri(ev.db, ev.collection, mode),
                mode=mode,  # type: ignore[arg-type]
                pipeline=self.settings.pipeline_name,
                storage_options=self.settings.storage_options or None,
            )
        return self.writers[key]

    def write(self, batch: Batch) -> None:
        if not batch.events:
            return
        stats = self.stats[batch.table]
        stats.events += len(batch.events)
        for mode in self.settings.table_modes:
            self._commit(self.writer(batch.events[0], mode), batch.events, stats, mode)

    def _commit(
        self, writer: DeltaTableWriter, events: list[ChangeEvent], stats: TableStats, mode: str
    ) -> None:
        log.info("commit begin %s: %d events", writer.uri, len(events))
        try:
            # Storage outages are retried for as long as they last: dropping or
            # dead-lettering a batch because S3 is down would lose data.
            result = retry(
                lambda: writer.write(events),
                backoff=self.backoff,
                max_attempts=None,
                what=f"commit to {writer.uri}",
            )
        except Exception as exc:
            if is_retryable(exc):
                raise
            self._split(writer, events, stats, mode, exc)
            return
        log.info(
            "commit end %s: version %s, %d rows, %d skipped",
            writer.uri,
            result.version,
            result.rows_written,
            result.skipped,
        )
        stats.commits += 1
        if mode == self.settings.table_modes[0]:
            stats.written += result.rows_written
            stats.skipped += result.skipped
        stats.version = result.version

    def _split(self, writer, events: list[ChangeEvent], stats: TableStats, mode: str, exc: Exception) -> None:
        """Halve a refused batch, in order, until the refused events are alone; dead-letter those."""
        if len(events) == 1:
            ev = events[0]
            log.error("Delta refused %s offset %s:%s: %s", ev.table, ev.topic, ev.offset, exc)
            stats.dead_lettered += 1
            self.dlq.write([dead_letter_for(ev, Reason.DELTA_WRITE_ERROR, exc, mode)])
            return
        mid = len(events) // 2
        for half in (events[:mid], events[mid:]):
            self._commit(writer, half, stats, mode)


def dead_letter_for(ev: ChangeEvent, reason: Reason, exc: BaseException, mode: str) -> DeadLetter:
    """A dead letter for an event that decoded fine but could not be written."""
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


class _LakePartition(StatelessSinkPartition[Batch]):
    def __init__(self, writer: LakeWriter) -> None:
        self.writer = writer

    def write_batch(self, items: list[Batch]) -> None:
        for batch in items:
            self.writer.write(batch)

    def close(self) -> None:
        for table, s in sorted(self.writer.stats.items()):
            print(
                f"{table}: {s.events} events, {s.written} rows written, {s.skipped} already committed, "
                f"{s.dead_lettered} dead-lettered, {s.commits} commits, Delta version {s.version}",
                flush=True,
            )
        self.writer.dlq.close()


class LakeSink(DynamicSink[Batch]):
    """Bytewax sink: closed batches in, Delta commits out."""

    def __init__(self, settings: Settings, dlq_factory) -> None:
        self.settings = settings
        self.dlq_factory = dlq_factory

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _LakePartition:
        return _LakePartition(LakeWriter(self.settings, self.dlq_factory()))
