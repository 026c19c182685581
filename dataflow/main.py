"""The dataflow: `python -m bytewax.run dataflow.main:flow`.

    Kafka (or the bundled sample) → decode ──bad──→ dead letters: DLQ topic / fallback file
                                      └─→ batch per table → sink: Delta commits

Start-up (settings, logging, signals, topics, recovery store) happens in
`dataflow.runtime.startup`; this module only wires the steps together.
"""

from __future__ import annotations

from collections.abc import Callable

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source

from dataflow.batch.inflight import Inflight
from dataflow.batch.tables import BatchLimits, batch_by_table
from dataflow.decode.step import parse_events
from dataflow.dlq.sink import DLQSink
from dataflow.dlq.writer import DLQConfig, DLQWriter
from dataflow.lake.layout import TableLocations
from dataflow.lake.offsets import committed_offsets
from dataflow.lake.storage import health_probe
from dataflow.runtime import startup
from dataflow.runtime.retry import RetryPolicy, StorageBreaker
from dataflow.runtime.settings import Settings
from dataflow.sink.lake import LakeSink
from dataflow.sink.policy import CommitPolicy
from dataflow.source.kafka import ResumingKafkaSource
from dataflow.source.sample import SampleFileSource
from dataflow.source.topics import end_offsets


def build_flow(settings: Settings, partitions: dict[str, int]) -> Dataflow:
    flow = Dataflow("mongo_delta_cdc")
    messages = op.input("read", flow, source_for(settings, partitions))
    parsed = parse_events("parse", messages, max_bytes=settings.max_document_bytes)
    op.output("dead_letters", parsed.dead, DLQSink(dlq_config(settings)))
    limits = BatchLimits(
        settings.batch_max_rows,
        settings.batch_max_bytes,
        settings.batch_max_seconds,
        settings.batch_max_open_rows,
    )
    # Closed batches the sink has yet to commit in the background: in the snapshots till then.
    inflight = Inflight() if settings.background_commits else None
    batches = batch_by_table("batch", parsed.events, limits=limits, inflight=inflight)
    op.output("delta", batches, LakeSink(commit_policy(settings, partitions), inflight))
    return flow


def source_for(settings: Settings, partitions: dict[str, int]) -> Source:
    """The bundled sample without a broker; otherwise every partition of the chosen topics."""
    if settings.embedded:
        return SampleFileSource(settings.sample_path)
    return ResumingKafkaSource(
        settings.brokers.split(","),
        list(partitions),
        tail=not settings.stop_at_end,
        # Bytewax opens one consumer per partition, and librdkafka prefetches up to
        # 64 MiB for each by default: bound it, or memory grows with the partition count.
        # The bound applies before decompression; with compressed topics the decompressed
        # message sets behind it are several times larger (memray, 1M bench events, zstd: 288 MB
        # of them at peak with 4 MiB x 12 partitions). 1 MiB queues, 256 KiB fetches and a
        # 20 ms wait (not 1 s) before refilling a full queue took about 300 MB off peak RSS
        # in 1M-event append and merge runs, and nothing measurable off throughput.
        add_config={
            "queued.max.messages.kbytes": "1024",
            "max.partition.fetch.bytes": "262144",
            "fetch.queue.backoff.ms": "20",
            "fetch.max.bytes": "8388608",
        }
        | settings.kafka_config,
        # Messages per partition per poll: smaller keeps fewer decoded events in flight at once
        # (12 partitions x 2,000); larger gained nothing in the benchmark.
        batch_size=2000,
        raise_on_errors=False,
        committed=lambda: {} if settings.start_from == "beginning" else read_committed(settings, partitions),
        partitions=partitions,
    )


def read_committed(settings: Settings, partitions: dict[str, int]) -> dict[tuple[str, int], int]:
    """The offsets recorded in Delta; storage hiccups at start are retried, then the start fails."""
    return startup.startup_retry(settings).call(
        lambda: committed_offsets(
            settings.lake_uri,
            settings.pipeline_name,
            partitions,
            settings.storage_options or None,
            paired=settings.table_mode == "both",
        ),
        operation="read_committed_offsets",
    )


def dlq_config(settings: Settings) -> DLQConfig:
    return DLQConfig(
        brokers=settings.brokers,
        topic=settings.dlq_topic,
        fallback_path=settings.dlq_fallback,
        rate_per_minute=settings.dlq_rate_per_minute,
        producer_config=settings.kafka_config,
    )


def commit_policy(settings: Settings, partitions: dict[str, int]) -> Callable[[], CommitPolicy]:
    """A factory of each worker's commit policy: its writers, the retry policy and the breaker."""

    def build() -> CommitPolicy:
        ends = None
        if not settings.embedded:
            brokers = settings.brokers or ""
            ends = lambda: end_offsets(brokers, list(partitions), **settings.kafka_config)  # noqa: E731
        return CommitPolicy(
            TableLocations(settings.lake_uri, settings.table_mode),
            DLQWriter(dlq_config(settings)),
            pipeline=settings.pipeline_name,
            storage_options=settings.storage_options,
            # Commits wait out an outage (attempts=None): Kafka keeps the data meanwhile.
            retry=RetryPolicy(initial=settings.retry_initial_seconds, cap=settings.retry_max_seconds),
            breaker=StorageBreaker(
                "storage",
                probe=health_probe(settings.lake_uri, settings.storage_options or None),
                failure_threshold=settings.breaker_failures,
                recovery_timeout=settings.breaker_reset_seconds,
            ),
            end_offsets=ends,
        )

    return build


flow = build_flow(*startup.start())
