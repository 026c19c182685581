"""Prometheus metrics, registered once per process.

Bytewax serves the default registry on its `/metrics` endpoint when
`BYTEWAX_DATAFLOW_API_ENABLED` is set, so our metrics appear beside its own.
Names are the contract with `monitoring/` (alert rules, dashboard): change
them together. Every name starts with `cdc_`, and no two metrics record the
same value.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_SIZE_BUCKETS = (10, 100, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000)
_BYTES_BUCKETS = tuple(2**i for i in range(10, 30, 2))
_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# Input and parsing
EVENTS_IN = Counter("cdc_events_in_total", "Messages read from Kafka, by topic", ["topic"])
SKIPPED = Counter(
    "cdc_messages_skipped_total",
    "Messages that are not changes to apply (tombstone, transaction, invalidate, ddl), by topic and kind",
    ["topic", "kind"],
)
EVENTS_PARSED = Counter("cdc_events_parsed_total", "Change events decoded, by table and op", ["table", "op"])
EVENTS_OUT = Counter(
    "cdc_events_out_total", "Change events committed to Delta, by table and op", ["table", "op"]
)

# Batching
BATCH_ROWS = Histogram("cdc_batch_rows", "Events in a closed batch", ["table"], buckets=_SIZE_BUCKETS)
BATCH_BYTES = Histogram(
    "cdc_batch_bytes", "Message bytes in a closed batch", ["table"], buckets=_BYTES_BUCKETS
)
BATCH_AGE = Histogram(
    "cdc_batch_age_seconds",
    "Time from a batch's first event to its close",
    ["table"],
    buckets=_SECONDS_BUCKETS,
)

# Delta commits
COMMIT_DURATION = Histogram(
    "cdc_delta_commit_duration_seconds",
    "Delta commit time, retries included",
    ["table", "mode"],
    buckets=_SECONDS_BUCKETS,
)
COMMITS = Counter("cdc_delta_commits_total", "Delta commits, by table and mode", ["table", "mode"])
END_TO_END_LAG = Histogram(
    "cdc_end_to_end_lag_seconds",
    "Event cluster time to its Delta commit",
    ["table"],
    buckets=_SECONDS_BUCKETS,
)

# Mirrors (merge mode): brought up to date from the changelog in rounds
MIRROR_LAG_CHANGES = Gauge(
    "cdc_mirror_lag_changes", "Changes committed to a table's changelog and not yet in its mirror", ["table"]
)
MIRROR_LAG_SECONDS = Gauge(
    "cdc_mirror_lag_seconds", "Age of the oldest change not yet in the mirror (0: caught up)", ["table"]
)
MIRROR_ROUND_SECONDS = Histogram(
    "cdc_mirror_round_duration_seconds",
    "Time of one materializer round (read, collapse, MERGE or append)",
    ["table"],
    buckets=_SECONDS_BUCKETS,
)
MIRROR_ROUND_CHANGES = Histogram(
    "cdc_mirror_round_changes",
    "Changelog rows applied by one round",
    ["table"],
    buckets=_SIZE_BUCKETS + (250_000, 1_000_000),
)
MIRROR_ROWS_REWRITTEN = Counter(
    "cdc_mirror_rows_rewritten_total", "Rows the mirror's rounds wrote (changed and copied)", ["table"]
)
MIRROR_TOMBSTONES_PURGED = Counter(
    "cdc_mirror_tombstones_purged_total", "Tombstones deleted after the retention", ["table"]
)

# Table maintenance (dataflow/lake/maintenance.py, `cdc maintain`), by table and kind
# (changelog or mirror): compaction, vacuum, checkpoints and log clean-up
MAINTENANCE_FILES_COMPACTED = Counter(
    "cdc_maintenance_files_compacted_total",
    "Small files compaction rewrote into larger ones",
    ["table", "kind"],
)
MAINTENANCE_BYTES_VACUUMED = Counter(
    "cdc_maintenance_bytes_vacuumed_total", "Bytes of unreferenced files vacuum deleted", ["table", "kind"]
)
MAINTENANCE_LAST_RUN = Gauge(
    "cdc_maintenance_last_run_timestamp_seconds",
    "When maintenance of the table last finished without error (Unix time)",
    ["table", "kind"],
)
MAINTENANCE_DURATION = Histogram(
    "cdc_maintenance_duration_seconds",
    "Time of one table's maintenance (compaction, checkpoint, log clean-up, vacuum)",
    ["table", "kind"],
    buckets=_SECONDS_BUCKETS + (600, 1800),
)
MAINTENANCE_FAILURES = Counter(
    "cdc_maintenance_failures_total", "Maintenance runs of a table that raised", ["table", "kind"]
)

# Checkpoints: the offsets recorded in Delta txn actions
CHECKPOINTS_COMMITTED = Counter(
    "cdc_checkpoints_committed_total",
    "Commits that advanced a partition's recorded offset",
    ["topic", "partition"],
)
CHECKPOINT_LAG = Gauge(
    "cdc_checkpoint_lag_offsets",
    "Partition end offset minus the offset recorded in Delta",
    ["topic", "partition"],
)
CHECKPOINT_FAILURES = Counter(
    "cdc_checkpoint_failures_total", "Commits that failed (before any retry succeeded)", ["table"]
)

# Retries
RETRY_ATTEMPTS = Counter("cdc_retry_attempts_total", "Retried attempts, by operation", ["operation"])
RETRY_SUCCESS = Counter(
    "cdc_retry_success_total", "Operations that succeeded after at least one retry", ["operation"]
)
RETRY_EXHAUSTED = Counter("cdc_retry_exhausted_total", "Operations that ran out of retries", ["operation"])
RETRY_DURATION = Histogram(
    "cdc_retry_duration_seconds",
    "Time from first failure to success or giving up",
    ["operation"],
    buckets=_SECONDS_BUCKETS,
)

# Circuit breaker around storage
BREAKER_STATE = Gauge("cdc_circuit_breaker_state", "0 closed, 1 open, 2 half-open", ["name"])
BREAKER_FAILURES = Gauge(
    "cdc_circuit_breaker_failures", "Consecutive failures counted by the breaker", ["name"]
)
BREAKER_OPENS = Counter("cdc_circuit_breaker_opens_total", "Times the breaker opened", ["name"])

# Dead letters
DLQ_EVENTS = Counter("cdc_dlq_events_total", "Messages dead-lettered, by reason", ["reason"])
DLQ_FALLBACK_WRITES = Counter(
    "cdc_dlq_fallback_writes_total", "Dead letters written to the local fallback file, by cause", ["cause"]
)


def _precreate() -> None:
    """Create labelled series at zero, so rate() and increase() see their first increment."""
    from dataflow.model import Reason

    for reason in Reason:
        DLQ_EVENTS.labels(str(reason))
    for cause in ("rate_limited", "no_broker", "topic_unavailable", "delivery_failed"):
        DLQ_FALLBACK_WRITES.labels(cause)


_precreate()
