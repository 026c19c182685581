"""The `parse → branch` step: good events go on, bad ones to the dead-letter queue.

Nothing raises out of this step whatever it is fed: every message comes out
exactly once, as a `ChangeEvent` or as a `DeadLetter`, except delete
tombstones, which are counted and skipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import bytewax.operators as op
from bytewax.connectors.kafka import KafkaError, KafkaSourceMessage
from bytewax.dataflow import Stream, operator

from dataflow.events import parse
from dataflow.metrics import EVENTS_IN, EVENTS_PARSED, TOMBSTONES
from dataflow.model import ChangeEvent, DeadLetter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParseOut:
    events: Stream[ChangeEvent]
    dead: Stream[DeadLetter]


def _parse_one(msg: KafkaSourceMessage | KafkaError, max_bytes: int) -> ChangeEvent | DeadLetter | None:
    if isinstance(msg, KafkaError):
        # Consumer-side errors (a broker restarting, say); librdkafka reconnects by itself.
        log.warning("Kafka consumer error: %s", msg.err)
        return None
    EVENTS_IN.labels(msg.topic).inc()
    result = parse(msg, max_bytes=max_bytes)
    if result is None:
        TOMBSTONES.labels(msg.topic).inc()
    elif isinstance(result, ChangeEvent):
        EVENTS_PARSED.labels(result.table, result.op).inc()
    return result


@operator
def parse_events(
    step_id: str, up: Stream[KafkaSourceMessage], *, max_bytes: int = 16 * 1024 * 1024
) -> ParseOut:
    """Decode Kafka messages into change events; branch the failures off as dead letters."""
    parsed = op.filter_map("parse", up, lambda m: _parse_one(m, max_bytes))
    split = op.branch("split", parsed, lambda x: isinstance(x, ChangeEvent))
    return ParseOut(split.trues, split.falses)
