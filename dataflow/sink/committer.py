"""The hand-off to the commit thread: one batch at a time, in order, errors surfacing at the next hand-off.

A worker that commits on its own thread goes on reading and parsing while
delta-rs writes (it releases the GIL). The next batch waits for the previous
commit, so at most one closed batch per worker waits beside the one being
committed; the batcher's snapshots hold both until they are released
(`dataflow.batch.inflight`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from dataflow.batch.tables import Batch


class CommitThread:
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
