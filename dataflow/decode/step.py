"""The `parse → branch` step: good events go on, bad ones to the dead-letter queue.

Every message comes out exactly once, in an `EventChunk` (the good events of
one table, in order) or as a `DeadLetter`, except the messages that are not
changes (a tombstone after a Debezium delete, transaction metadata, an
`invalidate`), which are counted by kind and skipped. A `dropDatabase`
becomes a `drop` of every table of that database the lake or this process
knows. Only our own bugs raise, and stop the dataflow.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import bytewax.operators as op
from bytewax.connectors.kafka import KafkaError, KafkaSourceMessage
from bytewax.dataflow import Stream, operator

from dataflow.decode.envelopes import Decoder, Skipped
from dataflow.model import ChangeEvent, DeadLetter, EventChunk, SourceMessage
from dataflow.runtime import gc_timer
from dataflow.runtime.metrics import EVENTS_IN, EVENTS_PARSED, SKIPPED

log = logging.getLogger(__name__)

CollectionsOf = Callable[[str], Iterable[str]]


@dataclass(frozen=True)
class ParseOut:
    events: Stream[EventChunk]
    dead: Stream[DeadLetter]


def _no_lake(_db: str) -> Iterable[str]:
    return ()


class _Parser:
    def __init__(self, decoder: Decoder, collections_of: CollectionsOf) -> None:
        self.decoder = decoder
        self.collections_of = collections_of
        self.seen: dict[str, set[str]] = {}  # db -> collections this process has seen

    def expand(self, ev: ChangeEvent) -> list[ChangeEvent]:
        """A dropDatabase as one drop per table of the database."""
        names = set(self.seen.get(ev.db, ())) | set(self.collections_of(ev.db))
        log.warning(
            "dropDatabase of %s: dropping %d tables (%s)",
            ev.db,
            len(names),
            ", ".join(sorted(names)[:20]),
            extra={"table": f"{ev.db}.*", "topic": ev.topic, "offset": ev.offset},
        )
        return [dataclasses.replace(ev, collection=c) for c in sorted(names)]

    def batch(
        self, msgs: list[SourceMessage | KafkaSourceMessage | KafkaError]
    ) -> list[EventChunk | DeadLetter]:
        """Parse a batch at a time: one Python call per batch, and metrics counted once per batch."""
        out: list[EventChunk | DeadLetter] = []
        chunks: dict[str, EventChunk] = {}
        read: Counter[str] = Counter()
        skipped: Counter[tuple[str, str]] = Counter()
        parsed: Counter[tuple[str, str]] = Counter()
        for msg in msgs:
            if isinstance(msg, KafkaError):
                # Consumer-side errors (a broker restarting, say); librdkafka reconnects by itself.
                log.warning("Kafka consumer error: %s", msg.err)
                continue
            read[msg.topic] += 1
            result = self.decoder.parse(msg)
            if type(result) is Skipped:
                skipped[(msg.topic, result.kind)] += 1
                continue
            if type(result) is not ChangeEvent:
                out.append(result)
                continue
            events = [result]
            if result.op == "drop" and not result.collection:
                events = self.expand(result)
            elif result.collection not in self.seen.get(result.db, ()):
                self.seen.setdefault(result.db, set()).add(result.collection)
            for ev in events:
                parsed[(ev.table, ev.op)] += 1
                chunk = chunks.get(ev.table)
                if chunk is None:
                    chunk = chunks[ev.table] = EventChunk(ev.table, [])
                    out.append(chunk)
                chunk.events.append(ev)
        for topic, n in read.items():
            EVENTS_IN.labels(topic).inc(n)
        for (topic, kind), n in skipped.items():
            SKIPPED.labels(topic, kind).inc(n)
        for (table, op_name), n in parsed.items():
            EVENTS_PARSED.labels(table, op_name).inc(n)
        gc_timer.collect_if_due()
        return out


@operator
def parse_events(
    step_id: str,
    up: Stream[SourceMessage | KafkaSourceMessage],
    *,
    decoder: Decoder | None = None,
    collections_of: CollectionsOf = _no_lake,
) -> ParseOut:
    """Decode Kafka messages into change events; branch the failures off as dead letters.

    `collections_of(db)` names the lake's tables of a database, for `dropDatabase`.
    """
    parser = _Parser(decoder or Decoder(), collections_of)
    parsed = op.flat_map_batch("parse", up, parser.batch)
    split = op.branch("split", parsed, lambda x: type(x) is EventChunk)
    return ParseOut(split.trues, split.falses)
