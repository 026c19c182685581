"""End-to-end latency: produce time (stamped in the document) to the row being visible in Delta.

The pipeline runs in tail mode (`CDC_STOP_AT_END=0`, append tables). After a
warm-up (its first commits are visible, so start-up is not measured), events
are produced at a fixed rate with `bench_ts_ms` set just before each produce
call, while a poller refreshes every table every ~200 ms
(`DeltaTable.update_incremental`) and notes when each data file first shows
up. At the end each file's rows are read once: latency = the time its file
was first seen - `bench_ts_ms`. Partial updates and deletes carry no full
document, so no stamp: they are produced but not measured. The pipeline is
stopped with SIGTERM (a graceful drain) at the end.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from deltalake import DeltaTable

from bench.data import PLACEHOLDER, STAMP_FIELD, BenchGenerator, produce_paced
from bench.measure import Running
from bench.stack import Stack, pipeline_commands
from dataflow.source.topics import create_topics

log = logging.getLogger("bench")


@dataclass
class _Table:
    uri: str
    dt: DeltaTable | None = None
    version: int = -1
    first_seen: dict[str, float] = field(default_factory=dict)  # file name -> wall-clock seconds
    rows: int = 0


class Poller(threading.Thread):
    """Refreshes every table every `interval` s and notes when each new data file appears."""

    def __init__(self, uris: list[str], storage_options: dict[str, str], interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.tables = [_Table(u) for u in uris]
        self.options = storage_options
        self.interval = interval
        self.stop_event = threading.Event()
        self.polls = 0
        self.errors = 0

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables)

    def poll_once(self) -> None:
        for t in self.tables:
            try:
                if t.dt is None:
                    if not DeltaTable.is_deltatable(t.uri, storage_options=self.options):
                        continue
                    t.dt = DeltaTable(t.uri, storage_options=self.options)
                else:
                    t.dt.update_incremental()
                seen_at = time.time()
                version = t.dt.version()
                if version == t.version:
                    continue
                t.version = version
                actions = t.dt.get_add_actions(flatten=True)
                paths = actions.column("path").to_pylist()
                counts = actions.column("num_records").to_pylist()
                for p in paths:
                    t.first_seen.setdefault(os.path.basename(p), seen_at)
                t.rows = sum(c or 0 for c in counts)
            except Exception as e:  # a poll that fails is retried at the next tick
                self.errors += 1
                log.debug("poll of %s failed: %s", t.uri, e)
        self.polls += 1

    def run(self) -> None:
        while not self.stop_event.is_set():
            started = time.monotonic()
            self.poll_once()
            self.stop_event.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def stop(self) -> None:
        self.stop_event.set()
        if self.ident is not None:
            self.join(timeout=10)

    def latencies(self, since_ms: int) -> list[float]:
        """Seconds from `bench_ts_ms` to first sight, for rows stamped at or after `since_ms`."""
        out: list[float] = []
        for t in self.tables:
            if t.dt is None:
                continue
            dataset = DeltaTable(t.uri, storage_options=self.options).to_pyarrow_dataset()
            if STAMP_FIELD not in dataset.schema.names:
                continue
            for frag in dataset.get_fragments():
                seen = t.first_seen.get(os.path.basename(frag.path))
                if seen is None:
                    continue
                for ts in frag.to_table(columns=[STAMP_FIELD]).column(STAMP_FIELD).to_pylist():
                    if ts is not None and since_ms <= ts < PLACEHOLDER:
                        out.append(seen - ts / 1000)
        return out


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[i]


def run(
    stack: Stack,
    *,
    rate: float,
    seconds: float,
    doc_bytes: int,
    partitions: int,
    batch_rows: int | None,
    batch_max_seconds: float,
    timeout: float = 600,
) -> tuple[dict[str, Any], list[float]]:
    """One tail-mode run at `rate` events/s for `seconds`; returns the summary and every latency."""
    gen = BenchGenerator(prefix="benchlat", seed=11, doc_bytes=doc_bytes, stamped=True)
    create_topics(stack.brokers, gen.topics, partitions)
    warm = list(gen.messages(300))
    measured = list(gen.messages(max(1, int(rate * seconds))))
    warm_events = sum(m.value is not None for m in warm)
    measured_events = sum(m.value is not None for m in measured)
    name = "latency"
    commands = pipeline_commands(
        stack,
        name,
        gen.topics,
        mode="append",
        stop_at_end=False,
        batch_rows=batch_rows,
        batch_max_seconds=batch_max_seconds,
    )
    running = Running(commands, stack.tmp / name / "logs", stack.tmp)
    poller = Poller([stack.table_uri(name, t) for t in gen.topics], stack.storage_options)
    summary: dict[str, Any] = {"rate": rate, "seconds": seconds, "batch_max_seconds": batch_max_seconds}
    latencies: list[float] = []
    try:
        produce_paced(stack.brokers, warm, max(rate, 1000.0))  # stamped too, though not measured
        deadline = time.monotonic() + 180
        while poller.rows < warm_events and time.monotonic() < deadline and running.alive():
            poller.poll_once()
            time.sleep(0.5)
        if poller.rows < warm_events:
            raise RuntimeError(f"warm-up not visible: {poller.rows}/{warm_events} rows")
        poller.start()
        since_ms = time.time_ns() // 1_000_000
        paced = produce_paced(stack.brokers, measured, rate, deadline_s=seconds * 2 + 30)
        target = warm_events + measured_events
        deadline = time.monotonic() + batch_max_seconds + 120
        while poller.rows < target and time.monotonic() < deadline and running.alive():
            time.sleep(0.2)
        poller.stop()
        summary.update(
            produced=paced.sent,
            stamped=paced.stamped,
            produce_seconds=round(paced.seconds, 2),
            achieved_rate=round(measured_events / paced.seconds, 1) if paced.seconds else None,
            producer_behind_max_s=round(paced.behind_max_s, 3),
            rows_visible=poller.rows - warm_events,
            rows_expected=measured_events,
            polls=poller.polls,
            poll_errors=poller.errors,
        )
    finally:
        poller.stop()
        running.signal(signal.SIGTERM)
        result = running.wait(timeout=timeout)
    latencies = sorted(poller.latencies(since_ms))
    summary["pipeline"] = {
        "rc": [p.rc for p in result.procs],
        "cpu_s": round(result.cpu_s, 2),
        "wall_s": round(result.wall_s, 2),
        "peak_rss_mib": round(result.peak_rss_mib, 1),
        "rss_timeline_mib": result.procs[0].rss_timeline,
    }
    summary["measured"] = len(latencies)
    for q in (50, 90, 99):
        v = percentile(latencies, q)
        summary[f"p{q}_s"] = round(v, 3) if v is not None else None
    summary["max_s"] = round(latencies[-1], 3) if latencies else None
    summary["mean_s"] = round(sum(latencies) / len(latencies), 3) if latencies else None
    summary["percentiles_s"] = [round(percentile(latencies, q) or 0, 3) for q in range(0, 101)]
    return summary, latencies
