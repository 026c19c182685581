"""Per-table batching: a batch closes at max rows, max bytes, or max seconds since its first event.

`op.collect`'s timeout restarts with every item, so a steady stream would never
flush; here the deadline is fixed when the batch's first event arrives. Open
batches are returned by `snapshot()`, so they are part of the recovery state.

The tables of one process also share a bound on the events held in all their
open batches (`OpenRows`): past it, the largest batch closes early. Memory then
does not grow with the number of tables, and tables filling at the same pace
close in turn instead of all at once, so each batch can be larger for the same
memory (three tables: half the bound per batch, against a third).

A closed batch is committed on the sink's own thread while new events arrive
(`dataflow.batch.inflight`): until the sink releases it, the table's snapshot carries
it too, and a restored batcher hands such batches to the sink again first.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import bytewax.operators as op
from bytewax.connectors.kafka import KafkaSourceMessage
from bytewax.dataflow import Stream, operator
from bytewax.operators import KeyedStream, StatefulBatchLogic

from dataflow.batch.inflight import Inflight
from dataflow.decode.envelopes import Decoder, Skipped
from dataflow.model import ChangeEvent, DeadLetter, EventChunk
from dataflow.runtime.metrics import BATCH_AGE, BATCH_BYTES, BATCH_ROWS

log = logging.getLogger(__name__)
_DEFAULT_DECODER = Decoder()


@dataclass(frozen=True)
class BatchLimits:
    max_rows: int = 10_000
    max_bytes: int = 64 * 1024 * 1024
    max_seconds: float = 5.0
    max_open_rows: int | None = None  # all tables of a process together; None: twice max_rows

    @property
    def open_rows_bound(self) -> int:
        return self.max_open_rows if self.max_open_rows is not None else 2 * self.max_rows


class OpenRows:
    """Events held in the open batches of one process's tables, shared by their batchers.

    Each batcher reports its own count after every step; the one holding the
    most closes when the total reaches the bound. A table that has stopped
    receiving events keeps its batch until its deadline, and meanwhile the
    others may fill up to their own `max_rows`. Workers of one process
    (`-w`) are threads, hence the lock; it is taken once per step, not per event.
    """

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self._rows: dict[str, int] = {}
        self._lock = threading.Lock()

    def report(self, table: str, rows: int) -> None:
        with self._lock:
            if rows:
                self._rows[table] = rows
            else:
                self._rows.pop(table, None)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._rows.values())

    def should_close(self, table: str) -> bool:
        """True when the bound is reached and `table` holds the largest open batch."""
        with self._lock:
            rows = self._rows.get(table, 0)
            values = self._rows.values()
            return rows > 0 and sum(values) >= self.bound and rows >= max(values)


@dataclass
class Batch:
    """Events of one table, in arrival order, with when the first of them arrived.

    `rejected`: messages of a restored snapshot that no longer decode (the
    decoder changed since): the sink dead-letters them instead of committing.
    """

    table: str
    events: list[ChangeEvent] = field(default_factory=list)
    nbytes: int = 0
    opened_at: float = 0.0  # wall-clock seconds; survives a restart through the snapshot
    rejected: list[DeadLetter] = field(default_factory=list)


@dataclass
class BatchSnapshot:
    """An open batch as the recovery store keeps it: the messages' own bytes, not decoded events.

    Bytes pickle about five times faster than decoded documents, and the
    snapshot is taken every few seconds; restoring decodes them again.
    """

    table: str
    opened_at: float
    # (topic, partition, offset, key, value, ts_ms, ord, replayed); snapshots before the replay
    # mark hold the first seven
    messages: list[tuple]

    @classmethod
    def of(cls, batch: Batch) -> BatchSnapshot:
        return cls(
            batch.table,
            batch.opened_at,
            [
                (e.topic, e.partition, e.offset, e.raw_key, e.raw_value, e.ts_ms, e.ord, e.replayed)
                for e in batch.events
            ]
            + [(d.topic, d.partition, d.offset, d.key, d.value, 0, 0) for d in batch.rejected],
        )

    def restore(self, decoder: Decoder | None = None) -> Batch:
        """The batch again, decoded as before the crash (with the pipeline's `decoder`).

        No size limit: each message passed the limit in force when it was read,
        and a lower limit now must not turn a snapshot into a crash loop. A
        message that no longer decodes at all becomes a dead letter, not an error.
        """
        decoder = decoder or _DEFAULT_DECODER
        batch = Batch(self.table, opened_at=self.opened_at)
        for topic, partition, offset, key, value, ts_ms, ord_, *rest in self.messages:
            msg = KafkaSourceMessage(key, value, topic=topic, partition=partition, offset=offset)
            ev = decoder.parse(msg, max_bytes=sys.maxsize)
            if type(ev) is ChangeEvent:
                ev.ts_ms, ev.ord = ts_ms, ord_  # as first decoded (they may come from the message timestamp)
                ev.replayed = bool(rest and rest[0])
                if ev.op == "drop" and not ev.collection:  # one table's part of a dropDatabase
                    ev = dataclasses.replace(ev, collection=self.table.partition(".")[2])
                batch.events.append(ev)
                batch.nbytes += ev.size
            elif type(ev) is not Skipped:
                log.error(
                    "snapshot of %s holds %s:%s@%s, which no longer decodes (%s): dead-lettering it",
                    self.table,
                    topic,
                    partition,
                    offset,
                    ev.error,
                    extra={"table": self.table, "topic": topic, "partition": partition, "offset": offset},
                )
                batch.rejected.append(ev)
        return batch


@dataclass
class TableSnapshot:
    """A table's recovery state: batches closed but not yet committed, oldest first, and the open one."""

    closed: list[BatchSnapshot]
    open: BatchSnapshot


class TableBatcher(StatefulBatchLogic[ChangeEvent, Batch, TableSnapshot]):
    """Holds one table's open batch (and, with `inflight`, accounts for its closed ones until committed)."""

    def __init__(
        self,
        limits: BatchLimits,
        resume: TableSnapshot | None = None,
        clock=time.time,
        open_rows: OpenRows | None = None,
        inflight: Inflight | None = None,
        decoder: Decoder | None = None,
    ) -> None:
        self.limits = limits
        self.clock = clock
        self.open_rows = open_rows if open_rows is not None else OpenRows(limits.open_rows_bound)
        self.inflight = inflight
        self.resend: list[Batch] = []  # restored closed batches, handed to the sink before anything else
        if resume is not None:
            self.resend = [s.restore(decoder) for s in resume.closed]
            for batch in self.resend:
                self._hold(batch)
        self.open = resume.open.restore(decoder) if resume is not None else Batch("")
        self.open_rows.report(self.open.table, len(self.open.events))

    def _hold(self, batch: Batch) -> None:
        if self.inflight is not None:
            self.inflight.add(batch)

    def _resent(self) -> list[Batch]:
        out, self.resend = self.resend, []
        return out

    def _close(self) -> list[Batch]:
        if not self.open.events and not self.open.rejected:
            return []
        self.open_rows.report(self.open.table, 0)
        full, self.open = self.open, Batch(self.open.table)
        self._hold(full)  # before it leaves this step: the snapshot at this epoch's end must carry it
        BATCH_ROWS.labels(full.table).observe(len(full.events))
        BATCH_BYTES.labels(full.table).observe(full.nbytes)
        BATCH_AGE.labels(full.table).observe(max(0.0, self.clock() - full.opened_at))
        return [full]

    def on_batch(self, values: list[ChangeEvent | EventChunk]) -> tuple[list[Batch], bool]:
        out: list[Batch] = self._resent()
        for ev in _events(values):
            if not self.open.events:
                self.open.opened_at = self.clock()
                self.open.table = ev.table
            self.open.events.append(ev)
            self.open.nbytes += ev.size
            if len(self.open.events) >= self.limits.max_rows or self.open.nbytes >= self.limits.max_bytes:
                out.extend(self._close())
        self.open_rows.report(self.open.table, len(self.open.events))
        if self.open.events and (
            self.clock() >= self.open.opened_at + self.limits.max_seconds
            or self.open_rows.should_close(self.open.table)
        ):
            out.extend(self._close())
        return out, StatefulBatchLogic.RETAIN

    def on_notify(self) -> tuple[list[Batch], bool]:
        if self.resend:  # woken only to hand them over; the open batch's own deadline comes next
            return self._resent(), StatefulBatchLogic.RETAIN
        return self._close(), StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[list[Batch], bool]:
        return self._resent() + self._close(), StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        if self.resend or (self.open.rejected and not self.open.events):
            return datetime.now(UTC)
        if not self.open.events:
            return None
        return datetime.fromtimestamp(self.open.opened_at, UTC) + timedelta(seconds=self.limits.max_seconds)

    def snapshot(self) -> TableSnapshot:
        closed = self.resend if self.inflight is None else self.inflight.pending(self.open.table)
        return TableSnapshot([BatchSnapshot.of(b) for b in closed], BatchSnapshot.of(self.open))


def _events(values: list[ChangeEvent | EventChunk]) -> list[ChangeEvent]:
    """The events in a step's input, in order, whether single or in chunks."""
    out: list[ChangeEvent] = []
    for v in values:
        if type(v) is EventChunk:
            out.extend(v.events)
        else:
            out.append(v)  # type: ignore[arg-type]
    return out


@operator
def batch_by_table(
    step_id: str,
    up: Stream[ChangeEvent | EventChunk],
    *,
    limits: BatchLimits,
    inflight: Inflight | None = None,
    decoder: Decoder | None = None,
) -> Stream[Batch]:
    """Key events (or chunks of one table's events) by table and emit closed batches.

    The tables batched in this process share one `OpenRows` bound. Give the
    sink the same `inflight` when it commits in the background: the batchers'
    snapshots then carry closed batches until the sink releases them.
    Restored snapshots are decoded again with `decoder` (the parse step's).
    """
    open_rows = OpenRows(limits.open_rows_bound)
    keyed: KeyedStream[ChangeEvent | EventChunk] = op.key_on("key", up, lambda ev: ev.table)
    batches = op.stateful_batch(
        "batch",
        keyed,
        lambda resume: TableBatcher(limits, resume, open_rows=open_rows, inflight=inflight, decoder=decoder),
    )
    return op.map("unkey", batches, lambda kv: kv[1])
