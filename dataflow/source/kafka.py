"""Kafka input: one consumer per (topic, partition), resuming from Delta's offsets, stoppable.

The partition is our own rather than Bytewax's private `_KafkaSourcePartition`
(whose class we used to swap after `KafkaSource.build_part`): a private class
can change in any Bytewax release without notice. It keeps what mattered of
Bytewax's: the same consumer settings, at most `batch_size` messages per poll,
the end of input at the partition's end when not tailing, consumer errors
handed out as `KafkaError`, recovery state being the next offset to read, and
the `bytewax_kafka_consumer_lag` gauge. After each poll it also tells the
process's `InputBacklog` what it has left unread, which the materializer reads.

With an empty (new, lost or replaced) recovery store, a partition would start
at the start of the topic (replaying everything). The offsets recorded in the
Delta tables' `txn` actions are the record of truth, so a partition without
recovery state seeks to its committed offset instead; the sink drops what is
at or below it. Offsets are not contiguous, so we seek to the committed offset
itself, never to "offset + 1".

Partitions hand out `SourceMessage` tuples instead of Bytewax's
`KafkaSourceMessage` dataclass, which is far dearer to build per message
(bench/RESULTS.md, "Source messages as tuples").
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable

from bytewax.connectors.kafka import BYTEWAX_CONSUMER_LAG_GAUGE, KafkaError, KafkaSourceMessage
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from confluent_kafka import KafkaError as ConfluentKafkaError

from dataflow.model import REPLAY_HEADER, SourceMessage
from dataflow.runtime import shutdown
from dataflow.runtime.failures import ConfigError, Kind, classify
from dataflow.source.backlog import InputBacklog

log = logging.getLogger(__name__)

POLL_TIMEOUT = 0.001
"""Seconds one `consume` call waits for messages (Bytewax's): Bytewax polls again at once."""
POLL_BATCH = 2_000
"""Messages per partition per poll: few enough decoded events in flight, enough per call."""
# librdkafka prefetches up to 64 MiB per partition by default, and there is a consumer per
# partition: bound it, or memory grows with the partition count. The bound applies before
# decompression (bench/RESULTS.md, "Kafka consumer queues"). CDC_KAFKA_* override these.
CONSUMER_DEFAULTS = {
    "queued.max.messages.kbytes": "1024",
    "max.partition.fetch.bytes": "262144",
    "fetch.queue.backoff.ms": "20",  # not 1 s: small queues would starve the pipeline
    "fetch.max.bytes": "8388608",
}

Item = SourceMessage | KafkaError


def refuse_to_read(topic: str, partition: int, error: ConfluentKafkaError) -> None:
    """Stop the flow on an error no waiting cures (bad credentials, no such topic, a fatal one).

    librdkafka reconnects by itself after the rest, which are handed out and logged.
    """
    if error.fatal() or classify(KafkaException(error)) is Kind.CONFIG:
        raise ConfigError(f"Kafka refuses to serve {topic} partition {partition}: {error.str()}")


class KafkaPartition(StatefulSourcePartition[Item, int]):
    """One Kafka partition through a consumer of its own; its state is the next offset to read."""

    def __init__(
        self,
        step_id: str,
        config: dict,
        topic: str,
        partition: int,
        offset: int,
        batch_size: int,
        raise_on_errors: bool,
        backlog: InputBacklog | None = None,
    ) -> None:
        self._topic = topic
        self._partition = partition
        self._offset = offset
        self._batch_size = batch_size
        self._raise_on_errors = raise_on_errors
        self._eof = False
        self._backlog = backlog
        self._lag = BYTEWAX_CONSUMER_LAG_GAUGE.labels(step_id=step_id, topic=topic, partition=partition)
        self._consumer = Consumer({**config, "stats_cb": self._stats})
        # Assigned, not subscribed: no consumer group; recovery (or Delta) keeps the offsets.
        self._consumer.assign([TopicPartition(topic, partition, offset)])
        self._tp = TopicPartition(topic, partition)

    def _stats(self, json_stats: str) -> None:
        """librdkafka's statistics (every `statistics.interval.ms`): the lag gauge, as Bytewax sets it."""
        stats = json.loads(json_stats).get("topics", {}).get(self._topic, {}).get("partitions", {})
        part = stats.get(str(self._partition))
        # Before the first message the offset may be OFFSET_BEGINNING, which gives no lag.
        if part is not None and self._offset > 0:
            lag = part["ls_offset"] - self._offset
            self._lag.set(lag)

    def next_batch(self) -> list[Item]:
        if self._eof:
            raise StopIteration
        topic, partition = self._topic, self._partition
        batch: list[Item] = []
        append = batch.append
        next_offset = None
        for msg in self._consumer.consume(self._batch_size, POLL_TIMEOUT):
            error = msg.error()
            if error is None:
                offset = msg.offset()
                headers = msg.headers()
                replayed = headers is not None and any(k == REPLAY_HEADER for k, _ in headers)
                append(
                    SourceMessage(msg.key(), msg.value(), topic, partition, offset, msg.timestamp(), replayed)
                )
                next_offset = offset + 1
                continue
            if error.code() == ConfluentKafkaError._PARTITION_EOF:
                self._eof = True  # StopIteration on the next call, after this batch
                break
            refuse_to_read(topic, partition, error)
            if self._raise_on_errors:
                raise RuntimeError(f"error consuming from Kafka topic `{topic!r}`: {error}")
            # Handed out, but the offset stays: an error's offset need not be a message read
            # (out of range, it is the offset asked for), and moving past it could skip messages.
            append(
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
        if next_offset is not None:
            self._offset = next_offset  # resume from the next message, not this one
        if self._backlog is not None and self._offset >= 0:
            self._report_backlog()
        return batch

    def _report_backlog(self) -> None:
        """What is left unread, from the high watermark of the last fetch (no request to the broker)."""
        _, high = self._consumer.get_watermark_offsets(self._tp, cached=True)
        if high >= 0:  # negative: no fetch response yet
            self._backlog.report(self._topic, self._partition, high - self._offset)

    def snapshot(self) -> int:
        return self._offset

    def close(self) -> None:
        if self._backlog is not None:
            self._backlog.forget(self._topic, self._partition)
        self._consumer.close()


class ResumingKafkaSource(FixedPartitionedSource[Item, int]):
    """Every partition of the given topics; those without recovery state start from the Delta offsets."""

    def __init__(
        self,
        brokers: Iterable[str],
        topics: Iterable[str],
        *,
        committed: Callable[[], dict[tuple[str, int], int]],
        partitions: dict[str, int],
        tail: bool = True,
        add_config: dict[str, str] | None = None,
        batch_size: int = 1000,
        raise_on_errors: bool = True,
        backlog: InputBacklog | None = None,
    ) -> None:
        """`partitions`: the partition count of each topic, as the flow was built with.

        `committed` is called once, when the first partition without recovery
        state is built. `tail=False` ends each partition at its end. `backlog`
        is told each partition's unread events about once a second.
        """
        if isinstance(brokers, str) or isinstance(topics, str):
            raise TypeError("brokers and topics must be iterables of strings, not a string")
        self._brokers = list(brokers)
        self._topics = list(topics)
        self._tail = tail
        self._add_config = dict(add_config or {})
        self._batch_size = batch_size
        self._raise_on_errors = raise_on_errors
        self._backlog = backlog
        self._committed_loader = committed
        self._committed: dict[tuple[str, int], int] | None = None
        self._partitions = partitions

    def list_parts(self) -> list[str]:
        """Bytewax's `<index>-<topic>` names, from the partition counts the flow was built with.

        Asking the broker again, through an admin client given the consumer
        settings, would make librdkafka warn on every start.
        """
        return [f"{i}-{topic}" for topic in self._topics for i in range(self._partitions[topic])]

    def _committed_offsets(self) -> dict[tuple[str, int], int]:
        if self._committed is None:
            self._committed = self._committed_loader()
        return self._committed

    def consumer_config(self) -> dict:
        """Bytewax's consumer settings, then `add_config` over them."""
        return {
            "group.id": "BYTEWAX_IGNORED",  # never joined: partitions are assigned
            "enable.auto.commit": "false",
            "bootstrap.servers": ",".join(self._brokers),
            "enable.partition.eof": "false" if self._tail else "true",
            "statistics.interval.ms": 1000,
        } | self._add_config

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> shutdown.Stoppable:
        idx, topic = for_part.split("-", 1)
        partition = int(idx)
        if topic not in self._topics:
            raise ValueError(f"partition {for_part!r} is of none of the topics read: {self._topics}")
        offset = resume_state
        if offset is None:
            offset = self._committed_offsets().get((topic, partition))
            if offset is not None:
                log.warning(
                    "no recovery state for %s partition %s: resuming from offset %d committed in Delta",
                    topic,
                    partition,
                    offset,
                    extra={"topic": topic, "partition": partition, "offset": offset},
                )
            else:
                log.info(
                    "no recovery state and no Delta commit for %s partition %s: reading from the start",
                    topic,
                    partition,
                )
                offset = OFFSET_BEGINNING
        part = KafkaPartition(
            step_id,
            self.consumer_config(),
            topic,
            partition,
            offset,
            self._batch_size,
            self._raise_on_errors,
            self._backlog,
        )
        return shutdown.Stoppable(part)
