"""Bytewax's `KafkaSource`, resuming from Delta's offsets when recovery has none, and stoppable.

With an empty (new, lost or replaced) recovery store, Bytewax would start every
partition at `starting_offset`: the start of the topic (replaying everything)
or its end (losing what was not yet committed). The offsets recorded in the
Delta tables' `txn` actions are the record of truth, so a partition without
recovery state seeks to its committed offset instead; the sink drops what is
at or below it. Offsets are not contiguous, so we seek to the committed offset
itself, never to "offset + 1".

Its partitions hand out `SourceMessage` tuples instead of Bytewax's
`KafkaSourceMessage` dataclass: a frozen dataclass costs about 2 us per
message to build, as much as a seventh of the whole parse.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from bytewax.connectors.kafka import KafkaError, KafkaSource, KafkaSourceMessage, _KafkaSourcePartition
from confluent_kafka import KafkaError as ConfluentKafkaError

from dataflow.model import SourceMessage
from dataflow.runtime import shutdown

log = logging.getLogger(__name__)


class _LeanPartition(_KafkaSourcePartition):
    """Bytewax's Kafka partition, emitting `SourceMessage`s; errors, EOF and offsets as it does."""

    def next_batch(self) -> list[SourceMessage | KafkaError]:
        if self._eof:
            raise StopIteration()
        batch: list[SourceMessage | KafkaError] = []
        last_offset = None
        for msg in self._consumer.consume(self._batch_size, 0.001):
            error = msg.error()
            if error is not None:
                if error.code() == ConfluentKafkaError._PARTITION_EOF:
                    self._eof = True  # StopIteration on the next call, after this batch
                    break
                if self._raise_on_errors:
                    raise RuntimeError(f"error consuming from Kafka topic `{self._topic!r}`: {error}")
                batch.append(
                    KafkaError(
                        error,
                        KafkaSourceMessage(
                            msg.key(),
                            msg.value(),
                            topic=msg.topic(),
                            offset=msg.offset(),
                            partition=msg.partition(),
                            timestamp=msg.timestamp(),
                        ),
                    )
                )
            else:
                batch.append(
                    SourceMessage(
                        msg.key(), msg.value(), msg.topic(), msg.partition(), msg.offset(), msg.timestamp()
                    )
                )
            last_offset = msg.offset()
        if last_offset is not None:
            self._offset = last_offset + 1  # resume from the next message, not this one
        return batch


class ResumingKafkaSource(KafkaSource):
    """`KafkaSource` whose partitions without recovery state start from the Delta offsets."""

    def __init__(
        self,
        *args,
        committed: Callable[[], dict[tuple[str, int], int]],
        partitions: dict[str, int] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._committed_loader = committed
        self._committed: dict[tuple[str, int], int] | None = None
        self._partitions = partitions

    def list_parts(self) -> list[str]:
        """Bytewax's `<index>-<topic>` names, from the partition counts the flow was built with.

        Bytewax would ask the broker again, through an admin client given the
        consumer settings, which librdkafka warns about on every start.
        """
        if self._partitions is None:
            return super().list_parts()
        return [f"{i}-{topic}" for topic, n in self._partitions.items() for i in range(n)]

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
        part = super().build_part(step_id, for_part, resume_state)
        part.__class__ = _LeanPartition  # same state, leaner messages
        return shutdown.Stoppable(part)
