"""Closed batches that are not yet durable in Delta, per table.

The sink can commit on a thread of its own, so that the worker goes on reading
and parsing while delta-rs writes (it releases the GIL; bench/RESULTS.md,
"Background commits only for append"). A batch the batcher has closed is then, until
its commit lands, neither in the open batch of the recovery snapshot nor in
Delta: a crash in between would lose it. So the batcher registers every batch
here as it closes it, its snapshot carries the batches still registered, and
the sink releases each one once it is committed or dead-lettered. A snapshot may still carry a batch that landed
after it was taken; restoring commits that batch again, and Delta's
transaction ids make the second commit skip every event.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dataflow.batch.tables import Batch


class Inflight:
    """The batches of one process handed to the sink and not yet released by it, in order per table."""

    def __init__(self) -> None:
        self._tables: dict[str, list[Batch]] = {}
        self._lock = threading.Lock()  # the batchers and the sinks' commit threads share it

    def add(self, batch: Batch) -> None:
        with self._lock:
            self._tables.setdefault(batch.table, []).append(batch)

    def release(self, batch: Batch) -> None:
        """The batch is durable (or dead-lettered): snapshots no longer need it."""
        with self._lock:
            held = self._tables.get(batch.table, [])
            for i, b in enumerate(held):
                if b is batch:
                    del held[i]
                    break
            if not held:
                self._tables.pop(batch.table, None)

    def pending(self, table: str) -> list[Batch]:
        """The table's batches not yet released, oldest first."""
        with self._lock:
            return list(self._tables.get(table, ()))

    @property
    def rows(self) -> int:
        with self._lock:
            return sum(len(b.events) for held in self._tables.values() for b in held)
