"""The Bytewax sink that commits closed batches to their Delta tables.

Every table's batches arrive on the worker that owns the table's key, so each
worker keeps one `DeltaTableWriter` per table and commits in arrival order.
Storage trouble is waited out (the input stalls and Kafka keeps the data); a
batch that Delta refuses because of its data is split until the events at
fault are found, and only those are dead-lettered.

Given the batchers' `Inflight`, each worker commits on a thread of its own,
one batch at a time and in order, while it goes on reading: delta-rs releases
the GIL as it writes. The next batch waits for the previous commit, so at most
one closed batch per worker waits beside the one being committed.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from bytewax.outputs import DynamicSink, StatelessSinkPartition

from dataflow.batch.inflight import Inflight
from dataflow.batch.tables import Batch
from dataflow.dlq.writer import DLQWriter
from dataflow.lake.storage import health_probe
from dataflow.lake.writer import DeltaTableWriter, WriteResult
from dataflow.model import ChangeEvent, DeadLetter, Reason
from dataflow.runtime.metrics import (
    CHECKPOINT_DURATION,
    CHECKPOINT_FAILURES,
    CHECKPOINT_LAG,
    CHECKPOINTS_COMMITTED,
    COMMIT_DURATION,
    COMMITS,
    END_TO_END_LAG,
    EVENTS_OUT,
)
from dataflow.runtime.retry import Backoff, RetriesExhausted, StorageBreaker, retry
from dataflow.runtime.settings import Settings

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
    """Commits batches for any number of tables; owns retries, the breaker and the split-on-bad-data logic."""

    def __init__(
        self,
        settings: Settings,
        dlq: DLQWriter,
        *,
        breaker: StorageBreaker | None = None,
        offsets: Callable[[], dict[tuple[str, int], int]] | None = None,
    ) -> None:
        self.settings = settings
        self.dlq = dlq
        self.backoff = Backoff(initial=settings.retry_initial_seconds, cap=settings.retry_max_seconds)
        self.breaker = breaker or StorageBreaker(
            "storage",
            probe=health_probe(settings.lake_uri, settings.storage_options or None),
            failure_threshold=settings.breaker_failures,
            recovery_timeout=settings.breaker_reset_seconds,
        )
        self.writers: dict[tuple[str, str], DeltaTableWriter] = {}
        self.stats: dict[str, TableStats] = defaultdict(TableStats)
        self.committed: dict[tuple[str, int], int] = {}
        self.end_offsets = offsets
        self.next_lag_check = 0.0

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
            self._commit(
                self.writer(batch.events[0], mode),
                batch.events,
                stats,
                mode,
                primary=mode == self.settings.table_modes[0],
            )
        self._export_lag()

    def _attempt(self, writer: DeltaTableWriter, events: list[ChangeEvent], table: str) -> WriteResult:
        try:
            return self.breaker.call(writer.write, events)
        except Exception:
            CHECKPOINT_FAILURES.labels(table).inc()
            raise

    def _commit(
        self, writer: DeltaTableWriter, events: list[ChangeEvent], stats: TableStats, mode: str, primary: bool
    ) -> None:
        table = events[0].table
        log.info(
            "commit begin %s: %d events", writer.uri, len(events), extra={"table": table, "rows": len(events)}
        )
        started = time.monotonic()
        waited = 0
        while True:
            try:
                # Outages are waited out for as long as they last (the breaker keeps us
                # from hammering storage meanwhile): dropping or dead-lettering a batch
                # because S3 is down would lose data. Other retryable errors get a budget.
                result = retry(
                    lambda: self._attempt(writer, events, table),
                    backoff=self.backoff,
                    max_attempts=self.settings.retry_max_attempts,
                    wait_out_outages=True,
                    operation="delta_commit",
                )
                break
            except RetriesExhausted as e:
                log.error(
                    "giving up on %d events for %s after %d attempts: %s",
                    len(events),
                    writer.uri,
                    e.attempts,
                    e.last,
                )
                self._dead_letter(events, Reason.MAX_RETRIES_EXCEEDED, e.last, mode, stats, e.attempts)
                return
            except Exception as exc:
                # An error that looks permanent is blamed on the data only while storage
                # answers: an outage can surface as odd errors (a truncated read, say).
                if self._storage_answers():
                    self._split(writer, events, stats, mode, exc, primary)
                    return
                delay = self.backoff.delay(waited)
                waited += 1
                log.warning(
                    "%s while storage does not answer: waiting %.1fs, not blaming the data", exc, delay
                )
                time.sleep(delay)
        elapsed = time.monotonic() - started
        log.info(
            "commit end %s: version %s, %d rows, %d skipped",
            writer.uri,
            result.version,
            result.rows_written,
            result.skipped,
            extra={"table": table, "version": result.version, "rows": result.rows_written},
        )
        self._record(result, events, stats, mode, primary, elapsed)

    def _storage_answers(self) -> bool:
        try:
            return self.breaker.probe() is not False
        except Exception:
            return False

    def _record(
        self,
        result: WriteResult,
        events: list[ChangeEvent],
        stats: TableStats,
        mode: str,
        primary: bool,
        elapsed: float,
    ) -> None:
        table = events[0].table
        COMMIT_DURATION.labels(table, mode).observe(elapsed)
        CHECKPOINT_DURATION.labels(table).observe(elapsed)
        if result.committed:
            COMMITS.labels(table, mode).inc()
            stats.commits += 1
        stats.version = result.version
        if not primary:
            return
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

    def _split(
        self,
        writer: DeltaTableWriter,
        events: list[ChangeEvent],
        stats: TableStats,
        mode: str,
        exc: Exception,
        primary: bool,
    ) -> None:
        """Halve a refused batch, in order, until the refused events are alone; dead-letter those.

        In order, because each commit records its highest offset per partition:
        committing a later half first would make the sink skip the earlier one.
        """
        if len(events) == 1:
            ev = events[0]
            reason = (
                Reason.SCHEMA_VALIDATION_FAILED
                if "Schema" in type(exc).__name__
                else Reason.DELTA_WRITE_ERROR
            )
            log.error(
                "Delta refused %s %s:%s@%s: %s",
                ev.table,
                ev.topic,
                ev.partition,
                ev.offset,
                exc,
                extra={"table": ev.table, "topic": ev.topic, "partition": ev.partition, "offset": ev.offset},
            )
            self._dead_letter(events, reason, exc, mode, stats, 0)
            return
        mid = len(events) // 2
        for half in (events[:mid], events[mid:]):
            self._commit(writer, half, stats, mode, primary)

    def _dead_letter(
        self,
        events: list[ChangeEvent],
        reason: Reason,
        exc: BaseException,
        mode: str,
        stats: TableStats,
        attempts: int,
    ) -> None:
        stats.dead_lettered += len(events)
        self.dlq.write([dead_letter_for(ev, reason, exc, mode, attempts) for ev in events])

    def _export_lag(self) -> None:
        """`checkpoint_lag_offsets`: how far the recorded offsets trail the partitions' ends."""
        if self.end_offsets is None or time.monotonic() < self.next_lag_check:
            return
        self.next_lag_check = time.monotonic() + 30
        try:
            ends = self.end_offsets()
        except Exception as e:  # metrics must never stop the pipeline
            log.warning("could not read end offsets for checkpoint_lag_offsets: %s", e)
            return
        for (topic, partition), committed in self.committed.items():
            if (end := ends.get((topic, partition))) is not None:
                CHECKPOINT_LAG.labels(topic, str(partition)).set(max(0, end - 1 - committed))


def dead_letter_for(
    ev: ChangeEvent, reason: Reason, exc: BaseException, mode: str, attempts: int = 0
) -> DeadLetter:
    """A dead letter for an event that decoded fine but could not be written."""
    return DeadLetter(
        reason=reason,
        error=f"{type(exc).__name__}: {exc}"[:2000],
        key=ev.raw_key,
        value=ev.raw_value,
        topic=ev.topic,
        partition=ev.partition,
        offset=ev.offset,
        retry_count=attempts,
        metadata={"table": ev.table, "mode": mode, "id": ev.id, "op": ev.op},
    )


class _Committer:
    """One daemon thread that runs `commit` on one batch at a time; its errors surface in `wait`.

    A daemon, so that a worker that crashed does not keep the process alive
    while a commit waits out a storage outage: recovery redoes that batch.
    """

    def __init__(self, commit: Callable[[Batch], None]) -> None:
        self._commit = commit
        self._batch: Batch | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()  # a batch was handed over
        self._idle = threading.Event()  # the last one is done
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="delta-commit", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._ready.wait()
            self._ready.clear()
            batch, self._batch = self._batch, None
            try:
                if batch is not None:
                    self._commit(batch)
            except BaseException as e:  # handed to the worker, which stops the dataflow with it
                self._error = e
            finally:
                self._idle.set()

    def wait(self) -> None:
        """Until the batch handed over last is committed; raises what its commit raised."""
        self._idle.wait()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, batch: Batch) -> None:
        self.wait()
        self._idle.clear()
        self._batch = batch
        self._ready.set()


class _LakePartition(StatelessSinkPartition[Batch]):
    def __init__(self, writer: LakeWriter, inflight: Inflight | None = None) -> None:
        self.writer = writer
        self.inflight = inflight
        self.committer = _Committer(self._commit) if inflight is not None else None

    def _commit(self, batch: Batch) -> None:
        self.writer.write(batch)
        if self.inflight is not None:
            self.inflight.release(batch)

    def write_batch(self, items: list[Batch]) -> None:
        for batch in items:
            if self.committer is None:
                self._commit(batch)
            else:
                self.committer.submit(batch)

    def close(self) -> None:
        if self.committer is not None:
            self.committer.wait()
        for table, s in sorted(self.writer.stats.items()):
            print(
                f"{table}: {s.events} events, {s.written} rows written, {s.skipped} already committed, "
                f"{s.dead_lettered} dead-lettered, {s.commits} commits, Delta version {s.version}",
                flush=True,
            )
        self.writer.dlq.close()


class LakeSink(DynamicSink[Batch]):
    """Bytewax sink: closed batches in, Delta commits out.

    With `inflight` (the one given to `batch_by_table`), commits run in the
    background and release each batch from it once durable; without, each
    batch is committed before `write_batch` returns.
    """

    def __init__(
        self,
        settings: Settings,
        dlq_factory: Callable[[], DLQWriter],
        end_offsets: Callable[[], dict[tuple[str, int], int]] | None = None,
        inflight: Inflight | None = None,
    ) -> None:
        self.settings = settings
        self.dlq_factory = dlq_factory
        self.end_offsets = end_offsets
        self.inflight = inflight

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _LakePartition:
        writer = LakeWriter(self.settings, self.dlq_factory(), offsets=self.end_offsets)
        return _LakePartition(writer, self.inflight)
