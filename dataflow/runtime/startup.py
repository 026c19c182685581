"""Start-up, in one place: every side effect the process needs before the flow is built.

`start()` reads and checks the settings (refusing to start, by variable name,
on a bad one), configures logging, installs the signal handlers, finds the
topics and their partitions, prepares the recovery store, and hands the
cycle collector to its timer. `dataflow.main` then only builds the flow.
"""

from __future__ import annotations

import logging
import os
import sys

from dataflow import speedups
from dataflow.runtime import gc_timer, logs, recovery, secrets, shutdown
from dataflow.runtime.failures import ConfigError, Kind, classify
from dataflow.runtime.retry import RetryPolicy
from dataflow.runtime.settings import KafkaSettings, Settings
from dataflow.source.sample import SampleFileSource
from dataflow.source.topics import match_topics, partitions_of

log = logging.getLogger("dataflow")


def start() -> tuple[Settings, dict[str, int]]:
    """The settings and the partition count of every topic to read; exits with a message on a bad setup."""
    # Recovery snapshots (pickles, documents), dead-letter files and the CA bundle: owner-only.
    os.umask(0o077)
    try:
        settings = Settings.from_env()
        secrets.trust_storage_ca()
    except (ConfigError, secrets.SecretFileError) as e:
        sys.exit(logs.Redactor().redact(f"cdc: {e}"))
    logs.configure(settings.logging.level, settings.logging.format)
    shutdown.install(settings.shutdown_grace_seconds)
    try:
        partitions = topic_partitions(settings)
        prepare_recovery(settings, partitions)
    except ConfigError as e:
        log.error("cdc: %s", e)  # logging is set up by now: the refusal goes where the logs go
        sys.exit(2)
    if speedups.native is None:
        log.warning(
            "dataflow._speedups is not built (no C compiler at install?): "
            "parsing and Arrow conversion run in pure Python, slower"
        )
    gc_timer.install()
    return settings, partitions


def topic_partitions(settings: Settings) -> dict[str, int]:
    """The topics this pipeline reads, with their partition counts."""
    kafka = settings.kafka
    if kafka.brokers is None:
        return dict.fromkeys(SampleFileSource(settings.sample_path).list_parts(), 1)
    return kafka_partitions(kafka, settings.retry.at_start())


def kafka_partitions(kafka: KafkaSettings, policy: RetryPolicy) -> dict[str, int]:
    brokers = kafka.brokers or ""
    pattern = kafka.topic_pattern
    topics = list(kafka.topics)
    try:
        if pattern:
            topics = policy.call(
                lambda: match_topics(brokers, pattern, **kafka.client_config), operation="list_topics"
            )
            if not topics:
                raise ConfigError(f"no topic on {brokers} matches CDC_TOPIC_PATTERN={pattern!r}")
        return policy.call(
            lambda: partitions_of(brokers, topics, **kafka.client_config), operation="list_partitions"
        )
    except ConfigError:
        raise
    except Exception as e:
        if classify(e) is Kind.BUG:
            raise
        raise ConfigError(f"cannot read the topics from CDC_KAFKA_BROKERS={brokers}: {e}") from e


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
        recovery.prepare(directory, partitions=settings.recovery.partitions, fingerprint=fingerprint)
    else:
        recovery.wait_ready(directory, timeout=120)
