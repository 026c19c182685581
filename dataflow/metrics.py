"""Prometheus metrics, registered once per process.

Bytewax serves the default registry on its `/metrics` endpoint when
`BYTEWAX_DATAFLOW_API_ENABLED` is set, so our metrics appear beside its own.
"""

from __future__ import annotations

from prometheus_client import Counter

EVENTS_IN = Counter("cdc_events_in_total", "Messages read from Kafka, by topic", ["topic"])
TOMBSTONES = Counter("cdc_tombstones_total", "Delete tombstones (null values) skipped, by topic", ["topic"])
DLQ_EVENTS = Counter("dlq_events_total", "Messages dead-lettered, by reason", ["reason"])
DLQ_WRITE_FAILURES = Counter(
    "dlq_write_failures_total", "Dead letters the DLQ topic did not confirm (sent to the fallback file)"
)
DLQ_FALLBACK_WRITES = Counter(
    "dlq_fallback_writes_total", "Dead letters written to the local fallback file, by cause", ["cause"]
)
