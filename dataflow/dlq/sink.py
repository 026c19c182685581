"""The Bytewax sink for dead letters: one confirmed writer per worker."""

from __future__ import annotations

import logging

from bytewax.outputs import DynamicSink, StatelessSinkPartition

from dataflow.dlq.writer import DLQConfig, DLQWriter
from dataflow.model import DeadLetter

log = logging.getLogger(__name__)


class _DLQPartition(StatelessSinkPartition[DeadLetter]):
    def __init__(self, writer: DLQWriter) -> None:
        self.writer = writer

    def write_batch(self, items: list[DeadLetter]) -> None:
        self.writer.write(items)

    def close(self) -> None:
        self.writer.close()
        if self.writer.counts:
            by_reason = ", ".join(f"{n} {reason}" for reason, n in sorted(self.writer.counts.items()))
            where = self.writer.config.topic if self.writer.producer else self.writer.fallback.path
            log.info("dead letters: %d (%s) to %s", sum(self.writer.counts.values()), by_reason, where)


class DLQSink(DynamicSink[DeadLetter]):
    """Bytewax sink for dead letters; one confirmed producer per worker."""

    def __init__(self, config: DLQConfig) -> None:
        self.config = config

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _DLQPartition:
        return _DLQPartition(DLQWriter(self.config))
