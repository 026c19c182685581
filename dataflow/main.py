"""The dataflow: `python -m bytewax.run dataflow.main:flow`.

    Kafka (or the bundled sample) → decode ──bad──→ dead letters: DLQ topic / fallback file
                                      └─→ batch per table → sink: Delta commits

Start-up (settings, logging, signals, topics, recovery store) happens in
`dataflow.runtime.startup`; this module wires the steps together, handing each
component only its part of the settings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source

from dataflow.batch.inflight import Inflight
from dataflow.batch.tables import batch_by_table
from dataflow.decode.step import parse_events
from dataflow.dlq.sink import DLQSink
from dataflow.dlq.writer import DLQConfig, DLQWriter
from dataflow.lake.offsets import collections_in, committed_offsets, lake_collections
from dataflow.lake.storage import health_probe
from dataflow.runtime import startup
from dataflow.runtime.failures import describe
from dataflow.runtime.retry import RetryPolicy, StorageBreaker
from dataflow.runtime.settings import KafkaSettings, LakeSettings, RetrySettings, Settings
from dataflow.sink.lake import LakeSink
from dataflow.sink.materializer import Materializer, new_materializer, owner
from dataflow.sink.policy import CommitPolicy
from dataflow.source.backlog import InputBacklog
from dataflow.source.kafka import CONSUMER_DEFAULTS, POLL_BATCH, ResumingKafkaSource
from dataflow.source.sample import SampleFileSource
from dataflow.source.topics import end_offsets

log = logging.getLogger("dataflow")


def build_flow(settings: Settings, partitions: dict[str, int]) -> Dataflow:
    flow = Dataflow("mongo_delta_cdc")
    backlog = InputBacklog()  # what the Kafka partitions leave unread: the materializer's pace
    messages = op.input("read", flow, source_for(settings, partitions, backlog))
    decoder = settings.decoder
    parsed = parse_events(
        "parse",
        messages,
        decoder=decoder,
        collections_of=collections_of(settings.lake, settings.retry.for_commits()),
    )
    op.output("dead_letters", parsed.dead, DLQSink(settings.dlq))
    # Closed batches the sink has yet to commit in the background: in the snapshots till then.
    inflight = Inflight() if settings.background_commits else None
    batches = batch_by_table(
        "batch", parsed.events, limits=settings.batch, inflight=inflight, decoder=decoder
    )
    policy = commit_policy(settings.lake, settings.retry, settings.dlq, settings.kafka, partitions)
    materializer = materializer_for(settings.lake, settings.retry, backlog.unread)
    op.output("delta", batches, LakeSink(policy, inflight, materializer))
    return flow


def source_for(settings: Settings, partitions: dict[str, int], backlog: InputBacklog | None = None) -> Source:
    """The bundled sample without a broker; otherwise every partition of the chosen topics."""
    kafka = settings.kafka
    if kafka.brokers is None:
        return SampleFileSource(settings.sample_path)
    lake, policy = settings.lake, settings.retry.at_start()
    return ResumingKafkaSource(
        kafka.brokers.split(","),
        list(partitions),
        tail=not kafka.stop_at_end,
        add_config=CONSUMER_DEFAULTS | kafka.client_config,
        batch_size=POLL_BATCH,
        raise_on_errors=False,
        backlog=backlog,
        committed=lambda: {} if kafka.start_from == "beginning" else read_committed(lake, partitions, policy),
        partitions=partitions,
    )


def collections_of(lake: LakeSettings, policy: RetryPolicy) -> Callable[[str], list[str]]:
    """The lake's tables of a database, for a dropDatabase; storage outages are waited out."""

    def names(db: str) -> list[str]:
        return policy.call(
            lambda: collections_in(lake.tables.lake_uri, db, lake.storage_options or None),
            operation="list_tables",
        )

    return names


def read_committed(
    lake: LakeSettings, partitions: dict[str, int], policy: RetryPolicy
) -> dict[tuple[str, int], int]:
    """The offsets recorded in Delta; storage hiccups at start are retried, then the start fails."""
    try:
        return policy.call(
            lambda: committed_offsets(
                lake.tables.lake_uri,
                lake.pipeline_name,
                partitions,
                lake.storage_options or None,
                merge=lake.tables.merge,
            ),
            operation="read_committed_offsets",
        )
    except Exception as e:
        log.error(
            "stopping: %s reading the offsets committed in the lake (%s)", describe(e), type(e).__name__
        )
        raise


def materializer_for(
    lake: LakeSettings, retry: RetrySettings, unread: Callable[[], int] | None = None
) -> Callable[[int, int], Materializer | None]:
    """A factory of each worker's materializer (merge mode, unless CDC_MATERIALIZER=off).

    `unread`: the events the process's Kafka partitions have yet to read, which pace its rounds.
    """

    def build(index: int, count: int) -> Materializer | None:
        if not lake.tables.merge or lake.materializer == "off":
            return None
        uri, so = lake.tables.lake_uri, lake.storage_options or None

        def mine() -> list[tuple[str, str]]:  # the lake's tables this worker catches up at start
            return [t for t in lake_collections(uri, so) if owner(f"{t[0]}.{t[1]}", count) == index]

        return new_materializer(lake, retry, name=f"materializer-{index}", startup=mine, unread=unread)

    return build


def commit_policy(
    lake: LakeSettings, retry: RetrySettings, dlq: DLQConfig, kafka: KafkaSettings, partitions: dict[str, int]
) -> Callable[[], CommitPolicy]:
    """A factory of each worker's commit policy: its writers, the retry policy and the breaker."""

    def build() -> CommitPolicy:
        ends = None
        if kafka.brokers is not None:
            brokers = kafka.brokers
            ends = lambda: end_offsets(brokers, list(partitions), **kafka.client_config)  # noqa: E731
        return CommitPolicy(
            lake,
            DLQWriter(dlq),
            retry=retry.for_commits(),
            breaker=StorageBreaker(
                "storage",
                probe=health_probe(lake.tables.lake_uri, lake.storage_options or None),
                failure_threshold=retry.breaker_failures,
                recovery_timeout=retry.breaker_reset_seconds,
            ),
            end_offsets=ends,
        )

    return build


flow = build_flow(*startup.start())
