"""Per-table batching: a batch closes at max rows, max bytes, or max seconds since its first event.

`op.collect`'s timeout restarts with every item, so a steady stream would never
flush; here the deadline is fixed when the batch's first event arrives. Open
batches are returned by `snapshot()`, so they are part of the recovery state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import bytewax.operators as op
from bytewax.dataflow import Stream, operator
from bytewax.operators import KeyedStream, StatefulBatchLogic

from dataflow.metrics import BATCH_AGE, BATCH_BYTES, BATCH_ROWS
from dataflow.model import ChangeEvent


@dataclass(frozen=True)
class BatchLimits:
    max_rows: int = 10_000
    max_bytes: int = 64 * 1024 * 1024
    max_seconds: float = 5.0


@dataclass
class Batch:
    """Events of one table, in arrival order, with when the first of them arrived."""

    table: str
    events: list[ChangeEvent] = field(default_factory=list)
    nbytes: int = 0
    opened_at: float = 0.0  # wall-clock seconds; survives a restart through the snapshot


class TableBatcher(StatefulBatchLogic[ChangeEvent, Batch, Batch]):
    """Holds one table's open batch."""

    def __init__(self, limits: BatchLimits, resume: Batch | None = None, clock=time.time) -> None:
        self.limits = limits
        self.clock = clock
        self.open = resume if resume is not None else Batch("")

    def _close(self) -> list[Batch]:
        if not self.open.events:
            return []
        full, self.open = self.open, Batch(self.open.table)
        BATCH_ROWS.labels(full.table).observe(len(full.events))
        BATCH_BYTES.labels(full.table).observe(full.nbytes)
        BATCH_AGE.labels(full.table).observe(max(0.0, self.clock() - full.opened_at))
        return [full]

    def on_batch(self, values: list[ChangeEvent]) -> tuple[list[Batch], bool]:
        out: list[Batch] = []
        for ev in values:
            if not self.open.events:
                self.open.opened_at = self.clock()
                self.open.table = ev.table
            self.open.events.append(ev)
            self.open.nbytes += ev.size
            if len(self.open.events) >= self.limits.max_rows or self.open.nbytes >= self.limits.max_bytes:
                out.extend(self._close())
        if self.open.events and self.clock() >= self.open.opened_at + self.limits.max_seconds:
            out.extend(self._close())
        return out, StatefulBatchLogic.RETAIN

    def on_notify(self) -> tuple[list[Batch], bool]:
        return self._close(), StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[list[Batch], bool]:
        return self._close(), StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        if not self.open.events:
            return None
        return datetime.fromtimestamp(self.open.opened_at, UTC) + timedelta(seconds=self.limits.max_seconds)

    def snapshot(self) -> Batch:
        return self.open


@operator
def batch_by_table(step_id: str, up: Stream[ChangeEvent], *, limits: BatchLimits) -> Stream[Batch]:
    """Key events by table and emit closed batches."""
    keyed: KeyedStream[ChangeEvent] = op.key_on("key", up, lambda ev: ev.table)
    batches = op.stateful_batch("batch", keyed, lambda resume: TableBatcher(limits, resume))
    return op.map("unkey", batches, lambda kv: kv[1])
