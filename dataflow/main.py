"""The dataflow: `python -m bytewax.run dataflow.main:flow`.

Kafka (or the bundled sample) → parse ──bad──→ DLQ topic / fallback file
                                  └─→ batch per table → Delta tables
"""

from __future__ import annotations

import logging
import os
import sys

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source

from dataflow import speedups
from dataflow.batch.inflight import Inflight
from dataflow.batch.tables import BatchLimits, batch_by_table
from dataflow.decode.step import parse_events
from dataflow.dlq.writer import DLQConfig, DLQSink, DLQWriter
from dataflow.lake.offsets import committed_offsets
from dataflow.runtime import gc_timer, logs, recovery, shutdown
from dataflow.runtime.retry import retry
from dataflow.runtime.settings import Settings, SettingsError
from dataflow.sink.lake import LakeSink
from dataflow.source.kafka import ResumingKafkaSource
from dataflow.source.sample import SampleFileSource
from dataflow.source.topics import end_offsets, match_topics, partitions_of

log = logging.getLogger("dataflow")


def topic_partitions(settings: Settings) -> dict[str, int]:
    """The topics this pipeline reads, with their partition counts."""
    if settings.embedded:
        return dict.fromkeys(SampleFileSource(settings.sample_path).list_parts(), 1)
    topics = list(settings.topics)
    if settings.topic_pattern:
        topics = match_topics(settings.brokers, settings.topic_pattern, **settings.kafka_config)
        if not topics:
            raise SettingsError(
                f"no topic on {settings.brokers} matches CDC_TOPIC_PATTERN={settings.topic_pattern!r}"
            )
    return partitions_of(settings.brokers, topics, **settings.kafka_config)


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
    """The offsets recorded in Delta; storage hiccups at start are retried, not fatal."""
    return retry(
        lambda: committed_offsets(
            settings.lake_uri,
            settings.pipeline_name,
            partitions,
            settings.storage_options or None,
            paired=settings.table_mode == "both",
        ),
        max_attempts=10,
        operation="read_committed_offsets",
    )


def dlq_config(settings: Settings) -> DLQConfig:
    return DLQConfig(
        brokers=settings.brokers,
        topic=settings.dlq_topic,
        fallback_path=settings.dlq_fallback,
        rate_per_minute=settings.dlq_rate_per_minute,
    )


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
    ends = None
    if not settings.embedded:
        ends = lambda: end_offsets(settings.brokers, list(partitions), **settings.kafka_config)  # noqa: E731
    op.output("delta", batches, LakeSink(settings, lambda: DLQWriter(dlq_config(settings)), ends, inflight))
    return flow


def _bytewax_option(short: str, long: str, env: str) -> str | None:
    """An option as `bytewax.run` will see it: from its command line, else its environment variable."""
    argv = sys.argv
    for i, arg in enumerate(argv):
        if arg in (short, long) and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(f"{long}="):
            return arg.split("=", 1)[1]
    return os.environ.get(env) or None


def prepare_recovery(settings: Settings, partitions: dict[str, int]) -> None:
    """Create or check the store `bytewax.run` was given (`python -m dataflow` gives it one).

    Process 0 prepares a shared store; the others wait until it is ready.
    """
    directory = _bytewax_option("-r", "--recovery-directory", "BYTEWAX_RECOVERY_DIRECTORY")
    if directory is None:
        return
    fingerprint = {"pipeline": settings.pipeline_name, "topics": partitions}
    process_id = _bytewax_option("-i", "--process-id", "BYTEWAX_PROCESS_ID")
    if int(process_id or 0) == 0:
        recovery.prepare(directory, partitions=settings.recovery_partitions, fingerprint=fingerprint)
    else:
        recovery.wait_ready(directory, timeout=120)


def main() -> Dataflow:
    """Build the flow from the environment (this runs on import, as `bytewax.run` expects)."""
    logs.configure()
    settings = Settings.from_env()
    shutdown.install(settings.shutdown_grace_seconds)
    partitions = topic_partitions(settings)
    prepare_recovery(settings, partitions)
    flow = build_flow(settings, partitions)
    if speedups.native is None:
        log.warning(
            "dataflow._speedups is not built (no C compiler at install?): parsing and Arrow conversion run in pure Python, slower"
        )
    gc_timer.install()
    return flow


flow = main()
