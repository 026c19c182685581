"""The `parse → branch` step: good events go on, bad ones to the dead-letter queue.

Every message comes out exactly once, in an `EventChunk` (the good events of
one table, in order) or as a `DeadLetter`, except delete tombstones, which are
counted and skipped. Only our own bugs raise, and stop the dataflow.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import bytewax.operators as op
from bytewax.connectors.kafka import KafkaError, KafkaSourceMessage
from bytewax.dataflow import Stream, operator

from dataflow.decode.envelopes import parse
from dataflow.model import ChangeEvent, DeadLetter, EventChunk, SourceMessage
from dataflow.runtime import gc_timer
from dataflow.runtime.metrics import EVENTS_IN, EVENTS_PARSED, TOMBSTONES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParseOut:
    events: Stream[EventChunk]
    dead: Stream[DeadLetter]


def _parse_batch(
    msgs: list[SourceMessage | KafkaSourceMessage | KafkaError], max_bytes: int
) -> list[EventChunk | DeadLetter]:
    """Parse a batch at a time: one Python call per batch, and metrics counted once per batch."""
    out: list[EventChunk | DeadLetter] = []
    chunks: dict[str, EventChunk] = {}
    read: Counter[str] = Counter()
    tombstones: Counter[str] = Counter()
    parsed: Counter[tuple[str, str]] = Counter()
    for msg in msgs:
        if isinstance(msg, KafkaError):
            # Consumer-side errors (a broker restarting, say); librdkafka reconnects by itself.
            log.warning("Kafka consumer error: %s", msg.err)
            continue
        read[msg.topic] += 1
        result = parse(msg, max_bytes=max_bytes)
        if result is None:
            tombstones[msg.topic] += 1
            continue
        if type(result) is ChangeEvent:
            parsed[(result.table, result.op)] += 1
            chunk = chunks.get(result.table)
            if chunk is None:
                chunk = chunks[result.table] = EventChunk(result.table, [])
                out.append(chunk)
            chunk.events.append(result)
        else:
            out.append(result)
    for topic, n in read.items():
        EVENTS_IN.labels(topic).inc(n)
    for topic, n in tombstones.items():
        TOMBSTONES.labels(topic).inc(n)
    for (table, op_name), n in parsed.items():
        EVENTS_PARSED.labels(table, op_name).inc(n)
    gc_timer.collect_if_due()
    return out


@operator
def parse_events(
    step_id: str, up: Stream[SourceMessage | KafkaSourceMessage], *, max_bytes: int = 16 * 1024 * 1024
) -> ParseOut:
    """Decode Kafka messages into change events; branch the failures off as dead letters."""
    parsed = op.flat_map_batch("parse", up, lambda msgs: _parse_batch(msgs, max_bytes))
    split = op.branch("split", parsed, lambda x: type(x) is EventChunk)
    return ParseOut(split.trues, split.falses)
