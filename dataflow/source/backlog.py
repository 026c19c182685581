"""How far this process's reading trails Kafka: the events waiting unread in the partitions it reads.

Each Kafka partition reports its lag after every poll, from the high watermark
of its last fetch (librdkafka keeps it; no request to the broker). The
materializer reads the total: while the input holds a backlog, ingest is what
limits the pipeline, so a busy table's mirror round waits for it to be read,
up to a bound (`dataflow.sink.materializer.Pace`), and leaves the CPUs to
ingest.
"""

from __future__ import annotations

import threading


class InputBacklog:
    """Unread events per (topic, partition) of one process; the workers' partitions share it."""

    def __init__(self) -> None:
        self._lag: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    def report(self, topic: str, partition: int, lag: int) -> None:
        with self._lock:
            self._lag[(topic, partition)] = max(0, lag)

    def forget(self, topic: str, partition: int) -> None:
        """A partition closed: what it left unread is no longer this process's to read."""
        with self._lock:
            self._lag.pop((topic, partition), None)

    def unread(self) -> int:
        with self._lock:
            return sum(self._lag.values())
