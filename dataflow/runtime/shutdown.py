"""Graceful shutdown: on SIGTERM or SIGINT, stop reading and let the dataflow drain.

The sources' partitions, wrapped in `Stoppable`, end when it is requested, so Bytewax sees the
end of input: open batches are flushed and committed, the DLQ is flushed, and
the process exits 0. A watchdog ends the process if draining takes longer than
the grace period; that is a crash as far as recovery is concerned, which is safe.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from bytewax.inputs import StatefulSourcePartition

log = logging.getLogger(__name__)
_requested = threading.Event()


def request(reason: str = "requested") -> None:
    if not _requested.is_set():
        log.warning("shutdown %s: no more input is read; draining open batches", reason)
    _requested.set()


def requested() -> bool:
    """Whether a graceful shutdown has begun (the end of input is then not the end of the data)."""
    return _requested.is_set()


def install(grace_seconds: float = 60.0) -> None:
    """Handle SIGTERM and SIGINT in this process (call from the main thread)."""

    def handler(signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if _requested.is_set():
            log.error("second %s: exiting now without draining", name)
            os._exit(130)
        request(f"on {name}")
        timer = threading.Timer(grace_seconds, _give_up, args=(grace_seconds,))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


class Stoppable(StatefulSourcePartition):
    """Wraps a source partition so that it ends when shutdown is requested."""

    def __init__(self, inner: StatefulSourcePartition) -> None:
        self.inner = inner

    def next_batch(self):
        if _requested.is_set():
            raise StopIteration
        return self.inner.next_batch()

    def next_awake(self):
        return self.inner.next_awake()

    def snapshot(self):
        return self.inner.snapshot()

    def close(self) -> None:
        self.inner.close()


def _give_up(grace_seconds: float) -> None:
    log.error(
        "draining took longer than %.0fs; exiting (recovery resumes from the last snapshot)", grace_seconds
    )
    os._exit(3)
