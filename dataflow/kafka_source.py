"""Bytewax's `KafkaSource`, resuming from Delta's offsets when recovery has none, and stoppable.

With an empty (new, lost or replaced) recovery store, Bytewax would start every
partition at `starting_offset`: the start of the topic (replaying everything)
or its end (losing what was not yet committed). The offsets recorded in the
Delta tables' `txn` actions are the record of truth, so a partition without
recovery state seeks to its committed offset instead; the sink drops what is
at or below it. Offsets are not contiguous, so we seek to the committed offset
itself, never to "offset + 1".
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from bytewax.connectors.kafka import KafkaSource

from dataflow import shutdown

log = logging.getLogger(__name__)


class ResumingKafkaSource(KafkaSource):
    """`KafkaSource` whose partitions without recovery state start from the Delta offsets."""

    def __init__(self, *args, committed: Callable[[], dict[tuple[str, int], int]], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._committed_loader = committed
        self._committed: dict[tuple[str, int], int] | None = None

    def _committed_offsets(self) -> dict[tuple[str, int], int]:
        if self._committed is None:
            self._committed = self._committed_loader()
        return self._committed

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> shutdown.Stoppable:
        idx, topic = for_part.split("-", 1)
        if resume_state is None:
            offset = self._committed_offsets().get((topic, int(idx)))
            if offset is not None:
                log.warning(
                    "no recovery state for %s partition %s: resuming from offset %d committed in Delta",
                    topic,
                    idx,
                    offset,
                    extra={"topic": topic, "partition": int(idx), "offset": offset},
                )
                resume_state = offset
            else:
                log.info(
                    "no recovery state and no Delta commit for %s partition %s: reading from the start",
                    topic,
                    idx,
                )
        return shutdown.Stoppable(super().build_part(step_id, for_part, resume_state))
