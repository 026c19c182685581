"""Maintenance of the tables a worker writes, by the thread that writes them, between its commits.

Compaction commits too: beside a writer of the same table, one of the two
commits conflicts, and a MERGE that loses such a race is redone whole. So
each table is maintained by the one thread that writes it: a changelog by the
sink's commit thread right after one of its commits, a mirror by the
materializer between its rounds. At most once per interval per table, the
first time one interval after the table's first commit in this process.

A failure is logged and counted (`cdc_maintenance_failures_total`) and tried
again one interval later: without maintenance a table is still exact, only
slower to read and larger. It never stops the pipeline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from dataflow.lake.maintenance import (
    MaintenancePolicy,
    MaintenanceReport,
    TableKind,
    maintain,
    mirror_needs,
    record,
    record_failure,
)
from dataflow.runtime.failures import describe

log = logging.getLogger(__name__)


class Upkeep:
    """When each table a thread writes is due for maintenance, and running it."""

    def __init__(
        self,
        lake_uri: str,
        *,
        policy: MaintenancePolicy,
        interval_s: float,
        storage_options: dict[str, str] | None = None,
        pipeline: str = "cdc",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lake_uri = lake_uri
        self.policy = policy
        self.interval_s = interval_s
        self.storage_options = storage_options
        self.pipeline = pipeline
        self.clock = clock
        self._last: dict[str, float] = {}

    def after_commit(self, uri: str, kind: TableKind, table: str) -> MaintenanceReport | None:
        """Maintain the table at `uri` if it is due; what was done (None: not due, or failed)."""
        if not self.policy.enabled:
            return None
        now = self.clock()
        last = self._last.setdefault(uri, now)
        if now - last < self.interval_s:
            return None
        self._last[uri] = now
        log.info("maintenance begin %s", uri, extra={"table": table})
        try:
            # A merge-mode changelog keeps what its mirror has not applied yet.
            keep_from = (
                mirror_needs(uri, self.lake_uri, self.storage_options, self.pipeline)
                if kind == "changelog"
                else None
            )
            report = maintain(
                uri, storage_options=self.storage_options, policy=self.policy, keep_from=keep_from
            )
        except Exception as e:
            log.warning(
                "maintenance of %s failed, tried again in %.0f s: %s (%s: %s)",
                uri,
                self.interval_s,
                describe(e),
                type(e).__name__,
                e,
                extra={"table": table},
            )
            record_failure(table, kind)
            return None
        finally:
            self._last[uri] = self.clock()  # the interval runs from the end of a run
        record(report, table, kind)
        return report
