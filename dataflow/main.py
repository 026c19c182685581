"""The dataflow: `python -m bytewax.run dataflow.main:flow`.

Kafka (or the bundled sample) → parse ──bad──→ DLQ topic / fallback file
                                  └─→ batch per table → Delta tables
"""

from __future__ import annotations

import logging
import os

import bytewax.operators as op
from bytewax.connectors.kafka import KafkaSource
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source

from dataflow.batching import BatchLimits, batch_by_table
from dataflow.dlq import DLQConfig, DLQSink, DLQWriter
from dataflow.kafka_admin import match_topics
from dataflow.lake_sink import LakeSink
from dataflow.parse_step import parse_events
from dataflow.sample_source import SampleFileSource
from dataflow.settings import Settings, SettingsError

log = logging.getLogger("dataflow")


def source_for(settings: Settings) -> Source:
    """The bundled sample without a broker; otherwise every partition of the chosen topics."""
    if settings.embedded:
        return SampleFileSource(settings.sample_path)
    topics = list(settings.topics)
    if settings.topic_pattern:
        topics = match_topics(settings.brokers, settings.topic_pattern, **settings.kafka_config)
        if not topics:
            raise SettingsError(
                f"no topic on {settings.brokers} matches CDC_TOPIC_PATTERN={settings.topic_pattern!r}"
            )
    return KafkaSource(
        settings.brokers.split(","),
        topics,
        tail=not settings.stop_at_end,
        add_config=settings.kafka_config,
        batch_size=5000,
        raise_on_errors=False,
    )


def dlq_config(settings: Settings) -> DLQConfig:
    return DLQConfig(
        brokers=settings.brokers,
        topic=settings.dlq_topic,
        fallback_path=settings.dlq_fallback,
        rate_per_minute=settings.dlq_rate_per_minute,
    )


def build_flow(settings: Settings) -> Dataflow:
    flow = Dataflow("mongo_delta_cdc")
    messages = op.input("read", flow, source_for(settings))
    parsed = parse_events("parse", messages, max_bytes=settings.max_document_bytes)
    op.output("dead_letters", parsed.dead, DLQSink(dlq_config(settings)))
    limits = BatchLimits(settings.batch_max_rows, settings.batch_max_bytes, settings.batch_max_seconds)
    batches = batch_by_table("batch", parsed.events, limits=limits)
    op.output("delta", batches, LakeSink(settings, lambda: DLQWriter(dlq_config(settings))))
    return flow


def _configure_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("CDC_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


_configure_logging()
flow = build_flow(Settings.from_env())
