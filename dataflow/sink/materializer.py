"""The thread that keeps a worker's mirrors up to date from their changelogs (merge mode).

The sink commits each batch to the table's changelog and tells this thread
which table grew; the thread runs rounds (`dataflow.lake.mirror`) for the
tables it was told of, one round per table in turn, so one busy table cannot
starve the others. delta-rs releases the GIL while it merges, so the worker
goes on reading meanwhile. At start it also takes the tables of the lake whose
name hashes to its worker: a mirror a crash left behind catches up even if its
collection sees no new change.

While a table's changes keep coming, its next round waits (`Pace`): a MERGE
rewrites about the whole mirror whatever it holds, so a round is worth its
rewrite once its changes are a fair share of the mirror, or once its oldest
change has waited long enough. A table whose commits pause is caught up at
once, and so is every table at the end of the input. While the input holds a
backlog (the process's Kafka partitions have `Pace.defer_backlog` events or
more unread), ingest is what limits the pipeline: a busy table's round then
waits until the backlog is read, at most `Pace.backlog_max_wait_s`, and leaves
the CPUs to ingest.

Storage outages are waited out under the commit retry policy and the breaker.
Anything else stops the dataflow, even one that receives nothing more: the
thread requests a shutdown, the input ends, and the sink raises the error as it
closes (or at its next hand-off, whichever comes first). The changes stay in
the changelog for the next start.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from dataflow.lake.columns import DEFAULT_MAX_COLUMNS
from dataflow.lake.layout import TableLocations
from dataflow.lake.mirror import Mirror, Round
from dataflow.lake.storage import health_probe
from dataflow.lake.writer import DeltaTableWriter
from dataflow.runtime import shutdown
from dataflow.runtime.failures import describe
from dataflow.runtime.metrics import (
    MIRROR_LAG_CHANGES,
    MIRROR_LAG_SECONDS,
    MIRROR_ROUND_CHANGES,
    MIRROR_ROUND_SECONDS,
    MIRROR_ROWS_REWRITTEN,
    MIRROR_TOMBSTONES_PURGED,
)
from dataflow.runtime.retry import RetryPolicy, StorageBreaker
from dataflow.runtime.settings import LakeSettings, RetrySettings
from dataflow.sink.upkeep import Upkeep

log = logging.getLogger(__name__)
Table = tuple[str, str]  # (db, collection)


def new_materializer(
    lake: LakeSettings,
    retry: RetrySettings,
    *,
    name: str,
    startup: Callable[[], list[Table]],
    unread: Callable[[], int] | None = None,
    stop_flow_on_error: bool = True,
) -> Materializer:
    """A materializer as the settings say, its retries and its own breaker (the pipeline's, `cdc`'s)."""
    so = lake.storage_options or None
    return Materializer(
        lake.tables,
        pipeline=lake.pipeline_name,
        storage_options=so,
        retry=retry.for_commits(),
        breaker=StorageBreaker(
            name,
            probe=health_probe(lake.tables.lake_uri, so),
            failure_threshold=retry.breaker_failures,
            recovery_timeout=retry.breaker_reset_seconds,
        ),
        round_rows=lake.mirror_round_rows,
        pace=Pace(
            fraction=lake.mirror_round_fraction,
            max_wait_s=lake.mirror_max_wait_s,
            defer_backlog=lake.mirror_defer_backlog,
            backlog_max_wait_s=lake.mirror_backlog_max_wait_s,
        ),
        max_columns=lake.max_columns,
        tombstone_retention_s=lake.tombstone_retention_hours * 3600,
        upkeep=Upkeep(
            lake.tables.lake_uri,
            policy=lake.maintenance,
            interval_s=lake.maintenance_interval_s,
            storage_options=so,
            pipeline=lake.pipeline_name,
        ),
        startup=startup,
        unread=unread,
        stop_flow_on_error=stop_flow_on_error,
    )


@dataclass(frozen=True, slots=True)
class Pace:
    """When a busy table's next round starts (CDC_MIRROR_ROUND_FRACTION, CDC_MIRROR_MAX_WAIT_SECONDS,
    CDC_MIRROR_DEFER_BACKLOG, CDC_MIRROR_BACKLOG_MAX_WAIT_SECONDS).

    Rounds of a quarter of the mirror rewrite about four rows per change
    whatever the table's size (up to the round's cap); a round that would
    rather wait never waits longer than `max_wait_s`, nor once the table's
    commits have paused for `quiet_s`. While `defer_backlog` events or more
    wait unread in Kafka, a round waits for them to be read, whatever its size
    or a pause, up to `backlog_max_wait_s`: the mirror then costs ingest
    nothing, and the changes it waits for are old already (0: never wait for
    the input).

    A round takes at most `fraction` of the mirror's rows in changes too (at
    least `min_round_rows`; an empty mirror's round, the round's cap), so that
    a backlog, deferred or found at start, is worked off at the same rewrite
    per change and with the working set of a round of that share.
    """

    fraction: float = 0.25  # of the mirror's rows
    max_wait_s: float = 60.0
    quiet_s: float = 1.0
    defer_backlog: int = 100_000  # unread input events
    backlog_max_wait_s: float = 300.0
    min_round_rows: int = 50_000

    @property
    def backlog_wait_s(self) -> float:
        """The longest a round waits while the input holds a backlog: never shorter than usual."""
        return max(self.max_wait_s, self.backlog_max_wait_s)


@dataclass(slots=True)
class _Backlog:
    """What the sink committed to a table's changelog that no round has taken yet (as far as known)."""

    rows: int = 0
    since: float | None = None  # when the oldest of them was committed (monotonic)
    last_commit: float = 0.0
    mirror_rows: int | None = None  # the mirror's rows after its last round (None: not known yet)


def owner(table: str, workers: int) -> int:
    """The worker that catches a table's mirror up at start (a stable hash; Bytewax's is not exposed)."""
    return zlib.crc32(table.encode("utf-8", "surrogatepass")) % max(1, workers)


class Materializer:
    """Rounds for the mirrors of the tables this worker commits, on a daemon thread of its own."""

    def __init__(
        self,
        tables: TableLocations,
        *,
        pipeline: str,
        storage_options: dict[str, str] | None,
        retry: RetryPolicy,
        breaker: StorageBreaker | None = None,
        round_rows: int,
        pace: Pace | None = None,
        max_columns: int = DEFAULT_MAX_COLUMNS,
        tombstone_retention_s: float,
        upkeep: Upkeep | None = None,
        startup: Callable[[], list[Table]] = list,
        idle_seconds: float = 1.0,
        unread: Callable[[], int] | None = None,
        stop_flow_on_error: bool = True,
    ) -> None:
        self.tables = tables
        self.pipeline = pipeline
        self.storage_options = storage_options
        self.retry = retry
        self.breaker = breaker
        self.round_rows = round_rows
        self.pace = pace if pace is not None else Pace(fraction=0.0)  # without one: a round at once
        self.max_columns = max_columns
        self.tombstone_retention_s = tombstone_retention_s
        self.upkeep = upkeep  # compaction and vacuum of the mirrors, between their rounds
        self.idle_seconds = idle_seconds
        self.unread = unread  # the input's unread events (`InputBacklog.unread`); None: not known
        self._deferring = False
        self.stop_flow_on_error = stop_flow_on_error  # inside the pipeline: end its input too
        self._startup = startup
        self._mirrors: dict[Table, Mirror] = {}
        self._dirty: dict[Table, None] = {}  # ordered set: tables that may have changes to apply
        self._backlog: dict[Table, _Backlog] = {}  # the sink's commits since each table's last round
        self._draining = False  # every table's rounds at once: the end of the input
        self._purged: dict[Table, float] = {}
        self._changelogs: dict[Table, DeltaTableWriter] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._error: BaseException | None = None
        self._busy = False
        self._thread: threading.Thread | None = None
        self.rounds: list[Round] = []  # the last few, for logs and tests

    # ---------------------------------------------------------------- the sink's side

    def start(self) -> None:
        self._busy = True  # till the thread has listed the lake's tables at start: drain() waits for it
        self._thread = threading.Thread(target=self._run, name="materializer", daemon=True)
        self._thread.start()

    def notify(self, db: str, collection: str, rows: int | None = None) -> None:
        """A batch of `rows` changes of this table landed in its changelog (None: look again)."""
        with self._cond:
            if rows is not None:
                now = time.monotonic()
                b = self._backlog.setdefault((db, collection), _Backlog())
                b.rows += rows
                b.last_commit = now
                if b.since is None:
                    b.since = now
            self._dirty[(db, collection)] = None
            self._cond.notify()

    def _due(self, table: Table, now: float) -> bool:
        """Whether the table's next round starts now, or waits for more changes (`Pace`)."""
        b = self._backlog.get(table)
        if self._draining or b is None or b.mirror_rows is None or b.since is None:
            return True  # not told of commits (cdc materialize), or nothing known of the mirror yet
        p, waited = self.pace, now - b.since
        if self._input_behind():
            return waited >= p.backlog_wait_s
        return (
            waited >= p.max_wait_s
            or now - b.last_commit >= p.quiet_s
            or b.rows >= min(p.fraction * b.mirror_rows, self.round_rows)
        )

    def _round_rows(self, table: Table) -> int:
        """The changes the table's next round takes at most (`Pace`)."""
        b = self._backlog.get(table)
        if b is None or not b.mirror_rows or self.pace.fraction <= 0:
            return self.round_rows  # not known yet, or empty: most likely a snapshot, appended
        share = max(int(self.pace.fraction * b.mirror_rows), self.pace.min_round_rows)
        return min(share, self.round_rows)

    def _input_behind(self) -> bool:
        """Whether the input holds a backlog (`Pace.defer_backlog`); logs when that changes."""
        unread = 0 if self.unread is None or self.pace.defer_backlog <= 0 else self.unread()
        behind = unread >= self.pace.defer_backlog > 0
        if behind != self._deferring:
            self._deferring = behind
            if behind:
                log.info(
                    "input backlog of %d events: mirror rounds wait up to %gs while it is read",
                    unread,
                    self.pace.backlog_wait_s,
                )
            else:
                log.info("input caught up (%d events unread): mirror rounds pace as usual", unread)
        return behind

    def check(self) -> None:
        """Raise what stopped the thread, if anything did."""
        if self._error is not None:
            raise self._error

    def drain(self, timeout: float | None = None) -> None:
        """Until every table it knows is caught up (the sink has committed everything by then)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._draining = True
            for t in self._mirrors:
                self._dirty[t] = None
            self._cond.notify()
            while (self._dirty or self._busy) and self._error is None:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError("the mirrors did not catch up in time")
                self._cond.wait(0.2)
        self.check()

    def stop(self) -> None:
        """After the round under way (a graceful shutdown: the rest waits in the changelog)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self.check()

    # ---------------------------------------------------------------- the thread

    def mirror(self, db: str, collection: str) -> Mirror:
        key = (db, collection)
        if key not in self._mirrors:
            self._mirrors[key] = Mirror(
                self.tables.uri(db, collection, "append"),
                self.tables.uri(db, collection, "merge"),
                db,
                collection,
                pipeline=self.pipeline,
                storage_options=self.storage_options,
                max_rows=self.round_rows,
                max_columns=self.max_columns,
                target_changelog=self._changelog,
                read=lambda fn, operation: self.retry.call(fn, operation=operation, breaker=self.breaker),
            )
        return self._mirrors[key]

    def _changelog(self, db: str, collection: str) -> DeltaTableWriter:
        """A rename's target changelog: the moved documents go there, and its mirror follows."""
        key = (db, collection)
        self.notify(db, collection)  # its mirror follows, here (the rename's copy is in no batch)
        if key not in self._changelogs:
            self._changelogs[key] = DeltaTableWriter(
                self.tables.uri(db, collection, "append"),
                mode="append",
                pipeline=self.pipeline,
                storage_options=self.storage_options,
                max_columns=self.max_columns,
            )
        return self._changelogs[key]

    def _run(self) -> None:
        try:
            for t in self.retry.call(self._startup, operation="list_tables", breaker=self.breaker):
                self._dirty[t] = None
            while True:
                with self._cond:
                    while True:
                        if self._stop:
                            self._busy = False
                            return
                        now = time.monotonic()
                        table = next((t for t in self._dirty if self._due(t, now)), None)
                        if table is not None:
                            break
                        self._busy = False  # nothing due: waiting for changes, a pause or the time
                        self._cond.notify_all()
                        self._cond.wait(min(self.idle_seconds, self.pace.quiet_s))
                    del self._dirty[table]
                    self._busy = True
                more = self._one(table)
                with self._cond:
                    if more:
                        self._dirty[table] = None  # to the back: the other tables take their turn
        except BaseException as e:  # handed to the worker, which stops the dataflow with it
            log.error(
                "stopping: the materializer failed: %s (%s); the changes stay in the changelog",
                describe(e),
                type(e).__name__,
            )
            with self._cond:
                self._error = e
                self._busy = False
                self._cond.notify_all()
            if self.stop_flow_on_error:
                shutdown.request("after a materializer failure")

    def _one(self, table: Table) -> bool:
        """One round for `table`; whether there may be more to apply."""
        m = self.mirror(*table)
        name = m.table
        limit = self._round_rows(table)
        r = self.retry.call(lambda: m.round(limit), operation="materialize", breaker=self.breaker)
        with self._cond:  # what the round left is the table's backlog now
            b = self._backlog.setdefault(table, _Backlog())
            b.rows = 0 if r is None else r.lag.changes
            b.since = time.monotonic() - r.lag.seconds if r is not None and r.lag.changes else None
            b.mirror_rows = b.mirror_rows if r is None else r.mirror_rows
        if self.upkeep is not None:
            self.upkeep.after_commit(m.writer.uri, "mirror", name)
        if r is None:
            MIRROR_LAG_CHANGES.labels(name).set(0)
            MIRROR_LAG_SECONDS.labels(name).set(0)
            self._purge(table, m)
            return False
        self.rounds = [*self.rounds[-99:], r]
        MIRROR_ROUND_SECONDS.labels(name).observe(r.seconds)
        MIRROR_ROUND_CHANGES.labels(name).observe(r.changes)
        MIRROR_ROWS_REWRITTEN.labels(name).inc(r.rows_rewritten)
        MIRROR_LAG_CHANGES.labels(name).set(r.lag.changes)
        MIRROR_LAG_SECONDS.labels(name).set(r.lag.seconds)
        log.info(
            "mirror %s: changelog versions %d..%d, %d changes, %d rows %s in %.2fs; %d changes behind",
            name,
            r.first,
            r.last,
            r.changes,
            r.rows_rewritten,
            "appended" if r.appended else "rewritten",
            r.seconds,
            r.lag.changes,
            extra={"table": name, "rows": r.changes},
        )
        return True

    def _purge(self, table: Table, m: Mirror) -> None:
        """Tombstones older than the retention, at most once an hour per table, when caught up."""
        now = time.time()
        if now - self._purged.get(table, 0.0) < min(3600.0, self.tombstone_retention_s):
            return
        self._purged[table] = now
        cutoff_ms = int((now - self.tombstone_retention_s) * 1000)
        n = self.retry.call(lambda: m.writer.purge_tombstones(cutoff_ms), operation="purge_tombstones")
        if n:
            MIRROR_TOMBSTONES_PURGED.labels(m.table).inc(n)
            log.info("mirror %s: %d tombstones older than the retention purged", m.table, n)
