"""`python -m bench.table_size`: merge mode against the size of the table (issue 20).

For each size N of the sweep: one collection (`ts<N>.bench.docs`, 4 partitions)
seeded with N small documents (about 200 B of Extended JSON), then `--updates`
changes spread uniformly over the live documents (60% full-document updates,
30% top-level partial updates, 10% deletes, each delete followed by Debezium's
tombstone), all produced before the pipeline starts. Then the pipeline runs
over the topic twice, in append mode and in merge mode, each into its own lake
under its own pipeline name, with `CDC_STOP_AT_END=1`.

Measured per mode, from the bench process (polled once a second, so to the
second): when the changelog has recorded the last offset of every partition
(the txn versions `<pipeline>:<topic>:<partition>`), for the seed and for all
events; in merge mode when the mirror has caught up (`Mirror.lag().changes`
reaches 0) and the mirror lag (`Mirror.lag()`'s figures) sampled once a second while the
updates go into the changelog; the peak RSS of the pipeline process; and, from
the pipeline's own log lines of each materializer round, the materializer
seconds per change. Rates count from the start of the process (start-up of a
few seconds included). Then the mirror is compared with a model of the
collection built from the generated changes, every live document field by
field, and its tombstones counted.

`--modes append,merge,merge-split` adds a third run: merge mode with the
materializer in a process of its own (`cdc materialize --follow` beside the
pipeline started with `CDC_MATERIALIZER=off`; stopped once caught up).

Tombstones are kept for the run (`CDC_TOMBSTONE_RETENTION_HOURS` far out): the
generated changes are dated months back, and a purge of all of them would
otherwise land in the catch-up time.

Results: `bench/results/table-size-<date>.json`, and the "Table size" section
of `bench/RESULTS.md` (rewritten by each run; the rest of the file is kept).
Timing figures are reported, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from bench import report
from bench.__main__ import commit, machine
from bench.measure import Running, delta_rows, list_files
from bench.stack import ROOT, Stack, pipeline_commands
from bench.stack import started as stack_started
from dataflow.lake.columns import Layout
from dataflow.lake.documents import column_values, live
from dataflow.lake.mirror import Mirror
from dataflow.source.topics import create_topics
from services import generate
from services.generate import WORDS, Generator, Message, ObjectId, ext

log = logging.getLogger("bench.table_size")
BENCH = Path(__file__).resolve().parent
SECTION = report.TABLE_SIZE
DB, COLLECTION = "bench", "docs"
PARTITIONS = 4
MASK = (1 << 64) - 1
FIELDS = ("sku", "name", "qty", "price", "active", "city", "ver", "status")
# The update mix: the rest (60%) are full-document updates.
DELETE_SHARE, PARTIAL_SHARE = 0.10, 0.30
# Bytes a change event takes on disk, with room: Kafka (zstd) + two changelogs + mirror rewrites.
DISK_PER_EVENT = 1500
# merge-split: `cdc materialize --follow` beside a pipeline run with CDC_MATERIALIZER=off
SPLIT_MATERIALIZER = (
    sys.executable, "-m", "dataflow.cli", "materialize", "--follow", "--interval", "1", "--metrics-port", "0",
)  # fmt: skip
ROUND = re.compile(
    r"mirror (?P<table>\S+): changelog versions (?P<first>\d+)\.\.(?P<last>\d+), (?P<changes>\d+) changes, "
    r"(?P<rows>\d+) rows (?P<how>appended|rewritten) in (?P<seconds>[\d.]+)s; (?P<behind>\d+) changes behind"
)


# ---------------------------------------------------------------- data and model


def _mix(x: int) -> int:
    """splitmix64's finalizer: a well-spread 64-bit value for any integer."""
    x = (x + 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def oid(i: int) -> str:
    """Document i's ObjectId: a time part rising with i, a random-looking middle, i as the counter."""
    return f"{0x65A00000 + (i >> 8):08x}{_mix(i) & 0xFFFFFFFFFF:010x}{i & 0xFFFFFF:06x}"


def base(i: int, ver: int) -> dict[str, Any]:
    """Document i as its `ver`-th full version left it (a pure function: the model stores only `ver`)."""
    h = _mix(i * 1_000_003 + ver)
    return {
        "sku": f"SKU-{h % 100_000_000:08d}",
        "name": f"{WORDS[(h >> 27) % 14]} {WORDS[(h >> 31) % 14]}",
        "qty": (h >> 35) % 500 + 1,
        "price": ((h >> 44) % 1_000_000) / 100,
        "active": bool(h >> 63),
        "city": WORDS[(h >> 40) % 14].title(),
        "ver": ver,
    }


def partial(i: int, ver: int, n: int) -> dict[str, Any]:
    """The fields the n-th partial update since full version `ver` sets."""
    h = _mix(_mix(i * 1_000_003 + ver) ^ (n * 0x2545F4914F6CDD1D & MASK))
    return {"qty": h % 500 + 1, "status": WORDS[(h >> 20) % 14]}


class Collection:
    """The generated collection and its model: per document its full version and partial count.

    `ver[i]` is -1 once document i is deleted; `live` holds the live indexes
    (with `pos` for an O(1) swap-remove), so an update picks uniformly among them.
    Memory: four int32 arrays, 16 B a document.
    """

    def __init__(self, docs: int, prefix: str, seed: int = 7) -> None:
        if docs >= 1 << 24:
            raise ValueError("at most 16,777,215 documents (the ObjectId counter)")
        self.docs, self.prefix = docs, prefix
        self.ver = array("i", [-2]) * docs  # -2: not inserted yet
        self.parts = array("i", [0]) * docs
        self.live = array("i")
        self.pos = array("i", [-1]) * docs
        self.ops: dict[str, int] = {}
        self.gen = Generator(prefix=prefix, db=DB, collections=1)  # its envelopes and clock
        self.rng = random.Random(seed)

    @property
    def topic(self) -> str:
        return f"{self.prefix}.{DB}.{COLLECTION}"

    def doc(self, i: int) -> dict[str, Any]:
        """Document i as the model holds it (without `_id`)."""
        d = base(i, self.ver[i])
        if self.parts[i]:
            d |= partial(i, self.ver[i], self.parts[i])
        return d

    def _msg(self, i: int, op: str, after: dict | None, desc: dict | None, kind: str) -> Message:
        self.ops[kind] = self.ops.get(kind, 0) + 1
        key = Generator._key(oid(i))
        return Message(self.topic, key, self.gen._envelope(COLLECTION, op, after, desc))

    def seed_messages(self) -> Iterator[Message]:
        for i in range(self.docs):
            self.ver[i], self.pos[i] = 0, len(self.live)
            self.live.append(i)
            yield self._msg(i, "c", {"_id": ObjectId(oid(i)), **base(i, 0)}, None, "insert")

    def update_messages(self, n: int) -> Iterator[Message]:
        r = self.rng
        for _ in range(n):
            if not self.live:
                return
            i = self.live[r.randrange(len(self.live))]
            roll = r.random()
            if roll < DELETE_SHARE:
                at, last = self.pos[i], self.live.pop()
                if last != i:
                    self.live[at], self.pos[last] = last, at
                self.ver[i], self.pos[i], self.parts[i] = -1, -1, 0
                yield self._msg(i, "d", None, None, "delete")
                yield Message(self.topic, Generator._key(oid(i)), None)  # Debezium's tombstone
            elif roll < DELETE_SHARE + PARTIAL_SHARE:
                self.parts[i] += 1
                updated = partial(i, self.ver[i], self.parts[i])
                desc = {
                    "removedFields": None,
                    "updatedFields": orjson.dumps(ext(updated)).decode(),
                    "truncatedArrays": None,
                }
                yield self._msg(i, "u", None, desc, "partial")
            else:
                self.ver[i] += 1
                self.parts[i] = 0
                doc = base(i, self.ver[i])
                desc = {
                    "removedFields": None,
                    "updatedFields": orjson.dumps(ext({"ver": doc["ver"], "price": doc["price"]})).decode(),
                    "truncatedArrays": None,
                }
                yield self._msg(i, "u", {"_id": ObjectId(oid(i)), **doc}, desc, "update")

    @property
    def deleted(self) -> int:
        return self.docs - len(self.live)


@dataclass
class Produced:
    events: int = 0
    tombstones: int = 0
    value_bytes: int = 0
    seconds: float = 0.0
    last: dict[int, int] = field(default_factory=dict)  # partition -> offset of its last change event


def produce(brokers: str, messages: Iterator[Message], into: Produced) -> None:
    """`services.generate.produce`, counting what it sends and noting each partition's last change event."""
    last = into.last

    def delivered(msg: Any) -> None:
        if msg.value() is not None and msg.offset() > last.get(msg.partition(), -1):
            last[msg.partition()] = msg.offset()

    def counted() -> Iterator[Message]:
        for m in messages:
            if m.value is None:
                into.tombstones += 1
            else:
                into.events += 1
                into.value_bytes += len(m.value)
            yield m

    started = time.monotonic()
    generate.produce(brokers, counted(), on_delivered=delivered)
    into.seconds += time.monotonic() - started


# ---------------------------------------------------------------- one run of the pipeline


def _app(pipeline: str, topic: str, p: int) -> str:
    return f"{pipeline}:{topic}:{p}"


class Offsets:
    """The changelog's recorded offsets per partition, refreshed incrementally."""

    def __init__(self, uri: str, storage_options: dict[str, str], pipeline: str, topic: str) -> None:
        self.uri, self.options, self.pipeline, self.topic = uri, storage_options, pipeline, topic
        self.dt: DeltaTable | None = None

    def recorded(self) -> dict[int, int]:
        if self.dt is None:
            try:
                self.dt = DeltaTable(self.uri, storage_options=self.options)
            except TableNotFoundError:
                return {}
        else:
            self.dt.update_incremental()
        out = {}
        for p in range(PARTITIONS):
            v = self.dt.transaction_version(_app(self.pipeline, self.topic, p))
            if v is not None:
                out[p] = v
        return out


def machine_busy() -> float:
    """CPU seconds every CPU has spent busy since boot (not idle, not waiting for I/O)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_quiet(limit_s: float, busy_below: float = 0.2, window_s: float = 5.0) -> dict[str, float] | None:
    """Wait (at most `limit_s`) until the CPUs were less than `busy_below` busy over `window_s`.

    The machine may be shared; a run beside someone else's work measures both.
    Returns how long it waited and how busy the CPUs were last, None when `limit_s` is 0.
    """
    if limit_s <= 0:
        return None
    started = time.monotonic()
    cpus = os.cpu_count() or 1
    while True:
        before = machine_busy()
        time.sleep(window_s)
        share = (machine_busy() - before) / (window_s * cpus)
        waited = time.monotonic() - started
        if share < busy_below or waited >= limit_s:
            if share >= busy_below:
                log.warning(
                    "the CPUs are still %.0f%% busy after %.0f s: running anyway", share * 100, waited
                )
            return {"waited_s": round(waited, 1), "busy_share": round(share, 2)}


def _reached(recorded: dict[int, int], target: dict[int, int]) -> bool:
    return all(recorded.get(p, -1) >= off for p, off in target.items())


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def rounds_of(log_path: str) -> list[dict[str, Any]]:
    """The materializer's rounds, from its JSON log lines."""
    out = []
    with contextlib.suppress(OSError), open(log_path, "rb") as f:
        for line in f:
            if b"changes behind" not in line:
                continue
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            m = ROUND.search(rec.get("msg", ""))
            if m is None:
                continue
            out.append(
                {
                    "at": datetime.fromisoformat(rec["ts"]).timestamp(),
                    "first": int(m["first"]),
                    "last": int(m["last"]),
                    "changes": int(m["changes"]),
                    "rows": int(m["rows"]),
                    "appended": m["how"] == "appended",
                    "seconds": float(m["seconds"]),
                    "behind": int(m["behind"]),
                }
            )
    return out


def run_mode(
    stack: Stack,
    col: Collection,
    mode: str,
    seed_last: dict[int, int],
    all_last: dict[int, int],
    timeout: float,
    wait_s: float = 0.0,
) -> dict[str, Any]:
    name = f"ts{col.docs}-{mode}"
    topic = col.topic
    merge = mode != "append"
    commands = pipeline_commands(stack, name, [topic], mode="merge" if merge else "append")
    for _, env in commands:
        env |= {
            "CDC_LOG_LEVEL": "INFO",  # the materializer's round lines
            "CDC_LOG_FORMAT": "json",
            "CDC_PIPELINE_NAME": name,
            "CDC_TOMBSTONE_RETENTION_HOURS": "1000000",
        }
    if mode == "merge-split":  # the materializer in a process of its own, started beside the pipeline
        env = commands[0][1] | {"CDC_MATERIALIZER": "off"}
        commands = [(commands[0][0], env), ([*SPLIT_MATERIALIZER], env)]
    lake = stack.lake(name)
    changelog_uri = f"{lake}/_changelog/{DB}/{COLLECTION}" if merge else f"{lake}/{DB}/{COLLECTION}"
    mirror_uri = f"{lake}/{DB}/{COLLECTION}"
    offsets = Offsets(changelog_uri, stack.storage_options, name, topic)
    probe = (  # its changelog counts each version once (`Changelog.pending`): a call reads what is new
        Mirror(
            changelog_uri,
            mirror_uri,
            DB,
            COLLECTION,
            pipeline=name,
            storage_options=stack.storage_options,
        )
        if merge
        else None
    )
    quiet = wait_quiet(wait_s)
    busy0 = machine_busy()
    load0 = os.getloadavg()[0]
    running = Running(commands, stack.tmp / name / "logs", ROOT)
    t0, wall0 = running.started, time.time()
    deadline = t0 + timeout
    marks: dict[str, float] = {}
    samples: list[dict[str, Any]] = []
    poll_errors = 0

    def poll() -> None:
        nonlocal poll_errors
        now = time.monotonic() - t0
        try:
            rec = offsets.recorded()
            if "changelog_seed_s" not in marks and _reached(rec, seed_last):
                marks["changelog_seed_s"] = now
            if "changelog_s" not in marks and _reached(rec, all_last):
                marks["changelog_s"] = now
            if probe is not None and "changelog_seed_s" in marks:
                started = time.monotonic()
                lag = probe.lag()
                sample = {
                    "t": round(now, 2),
                    "changes": lag.changes,
                    "seconds": round(lag.seconds, 2),
                    "versions": lag.versions,
                    "applied": lag.applied,
                    "call_s": round(time.monotonic() - started, 3),
                }
                samples.append(sample)
                if "changelog_s" in marks and lag.changes == 0 and "caught_up_s" not in marks:
                    marks["caught_up_s"] = now
                    if mode == "merge-split":  # `cdc materialize --follow` runs until stopped
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(running.popens[1].pid, signal.SIGTERM)
        except Exception as e:  # a poll racing a commit: the next one sees it
            poll_errors += 1
            log.debug("poll failed: %s", e)

    next_poll = t0 + 1.0
    try:
        while running.alive() and time.monotonic() < deadline:
            if time.monotonic() >= next_poll:
                poll()
                next_poll = max(next_poll + 1.0, time.monotonic() + 0.2)
            time.sleep(0.05)
    except BaseException:  # ^C or an error here: leave no pipeline behind
        running.signal(signal.SIGKILL)
        running.wait(timeout)
        raise
    run = running.wait(timeout)
    busy = machine_busy() - busy0
    poll()  # after the exit: a mark the last second missed counts at the exit
    for k in ("changelog_seed_s", "changelog_s", "caught_up_s"):
        if k in marks:
            marks[k] = min(marks[k], run.wall_s)
    proc = run.procs[0]
    ok = run.ok
    if mode == "merge-split":  # the materializer ends by the SIGTERM sent once caught up
        ok = proc.rc == 0 and not proc.timed_out and run.procs[1].rc in (0, -signal.SIGTERM)
    out: dict[str, Any] = {
        "mode": mode,
        "ok": ok,
        "rc": proc.rc,
        "wall_s": round(run.wall_s, 2),
        "cpu_s": round(run.cpu_s, 2),
        "peak_rss_mib": round(run.peak_rss_mib, 1),
        "peak_rss_mib_each": [round(p.peak_rss_mib, 1) for p in run.procs],
        "cpu_s_each": [round(p.cpu_s, 1) for p in run.procs],
        "rss_timeline_mib": proc.rss_timeline,
        "marks_s": {k: round(v, 2) for k, v in marks.items()},
        "poll_errors": poll_errors,
        # What else ran: every CPU's busy seconds during the run (Kafka, MinIO, this bench and
        # anything else on the machine included) beside the pipeline's own CPU seconds.
        "machine_busy_cpu_s": round(busy, 1),
        "load_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "waited_for_quiet": quiet,
        "log": proc.log,
        "started_at": wall0,
    }
    if not ok:
        out["error"] = "timed out" if proc.timed_out else f"exit {proc.rc}"
        out["log_tail"] = "\n".join(Path(proc.log).read_text(errors="replace").splitlines()[-20:])
    out["changelog_rows"] = delta_rows(changelog_uri, stack.storage_options)
    files = list_files(stack.s3(), stack.bucket, name)
    out["lake_data_mib"] = round(files.data_bytes / 2**20, 1)
    out["lake_data_files"] = files.data_files
    if probe is not None:
        out["lag_samples"] = samples
        rounds = rounds_of(run.procs[-1].log)
        for r in rounds:
            r["at"] = round(r["at"] - wall0, 2)
        out["rounds"] = rounds
        out["mirror_uri"] = mirror_uri
    return out


# ---------------------------------------------------------------- checks


def check_mirror(uri: str, storage_options: dict[str, str], col: Collection, chunk: int = 500_000) -> dict:
    """Every live row of the mirror against the model, field by field; its tombstones counted."""
    dt = DeltaTable(uri, storage_options=storage_options)
    schema = pa.schema(dt.schema().to_arrow())
    layout = Layout.from_schema(schema, {})
    cols = []  # (field, main column, fallback column or None)
    for f in FIELDS:
        c = layout.value.get(f)
        if c is not None:
            cols.append((f, c, layout.fallback.get(f)))
    names = ["_id", "_deleted", *[c.name for _, c, _ in cols], *[fb.name for _, _, fb in cols if fb]]
    table = dt.to_pyarrow_dataset().to_table(columns=names)
    rows = table.num_rows
    tombstones = rows - table.filter(live(schema)).num_rows if "_deleted" in names else 0
    table = table.filter(live(schema))
    out: dict[str, Any] = {
        "rows": rows,
        "live": table.num_rows,
        "expected_live": len(col.live),
        "tombstones": tombstones,
        "expected_tombstones": col.deleted,
        "missing_fields": [f for f in FIELDS if f not in layout.value],
        "fallback_columns": [fb.name for _, _, fb in cols if fb],
        "mismatched": 0,
        "duplicates": 0,
        "examples": [],
    }
    seen = bytearray(col.docs)
    for start in range(0, table.num_rows, chunk):
        part = table.slice(start, chunk)
        ids = part.column("_id").to_pylist()
        values = []
        for _, c, fb in cols:
            main = column_values(part.column(c.name), c)
            if fb is not None:
                other = column_values(part.column(fb.name), fb)
                main = [m if m is not None else o for m, o in zip(main, other, strict=True)]
            values.append(main)
        for j, _id in enumerate(ids):
            i = int(_id[18:], 16) if _id and len(_id) == 24 else -1
            if not 0 <= i < col.docs or oid(i) != _id:
                out["mismatched"] += 1
                continue
            if seen[i]:
                out["duplicates"] += 1
            seen[i] = 1
            want = col.doc(i) if col.ver[i] >= 0 else None
            got = {f: v[j] for (f, _, _), v in zip(cols, values, strict=True) if v[j] is not None}
            if want != got:
                out["mismatched"] += 1
                if len(out["examples"]) < 3:
                    out["examples"].append({"_id": _id, "stored": got, "model": want})
    # live documents the mirror lacks
    out["missing"] = sum(1 for i in col.live if not seen[i])
    out["ok"] = (
        out["mismatched"] == 0
        and out["duplicates"] == 0
        and out["missing"] == 0
        and out["live"] == out["expected_live"]
        and out["tombstones"] == out["expected_tombstones"]
    )
    return out


# ---------------------------------------------------------------- figures


def figures(size: dict[str, Any]) -> None:
    """Derived figures of one size, added in place."""
    n, u = size["events"], size["update_events"]
    seed = size["seed_events"]
    runs = {r["mode"]: r for r in size["runs"]}
    for r in runs.values():
        m = r["marks_s"]
        cl, cl_seed = m.get("changelog_s"), m.get("changelog_seed_s")
        done = m.get("caught_up_s") if r["mode"] != "append" else cl
        r["changelog_events_per_s"] = round(n / cl, 1) if cl else None
        r["seed_events_per_s"] = round(seed / cl_seed, 1) if cl_seed else None
        r["update_events_per_s"] = round(u / (cl - cl_seed), 1) if cl and cl_seed and cl > cl_seed else None
        r["caught_up_events_per_s"] = round(n / done, 1) if done else None
        if r["mode"] == "append":
            continue
        window = [
            s for s in r["lag_samples"] if cl_seed is not None and cl is not None and cl_seed <= s["t"] <= cl
        ]
        r["lag_window_samples"] = len(window)
        for q in (50, 99):
            r[f"lag_p{q}_s"] = percentile([s["seconds"] for s in window], q)
            r[f"lag_p{q}_changes"] = percentile([s["changes"] for s in window], q)
        at_cl = [s for s in r["lag_samples"] if cl is not None and s["t"] >= cl]
        r["lag_at_changelog_done"] = at_cl[0] if at_cl else None
        r["lag_call_s"] = {
            "p50": percentile([s["call_s"] for s in r["lag_samples"]], 50),
            "max": max((s["call_s"] for s in r["lag_samples"]), default=None),
        }
        rounds = r["rounds"]
        merges = [x for x in rounds if not x["appended"]]
        appends = [x for x in rounds if x["appended"]]
        r["rounds_summary"] = {
            "appended": len(appends),
            "appended_changes": sum(x["changes"] for x in appends),
            "appended_s": round(sum(x["seconds"] for x in appends), 2),
            "merged": len(merges),
            "merged_changes": sum(x["changes"] for x in merges),
            "merged_s": round(sum(x["seconds"] for x in merges), 2),
            "rows_rewritten": sum(x["rows"] for x in merges),
            "median_merge_changes": statistics.median([x["changes"] for x in merges]) if merges else None,
            "median_merge_s": statistics.median([x["seconds"] for x in merges]) if merges else None,
        }
        s = r["rounds_summary"]
        s["us_per_merged_change"] = (
            round(s["merged_s"] / s["merged_changes"] * 1e6, 1) if s["merged_changes"] else None
        )
        s["rewritten_per_change"] = (
            round(s["rows_rewritten"] / s["merged_changes"], 2) if s["merged_changes"] else None
        )
        total_changes = s["appended_changes"] + s["merged_changes"]
        s["us_per_change"] = (
            round((s["appended_s"] + s["merged_s"]) / total_changes * 1e6, 1) if total_changes else None
        )
    a = runs.get("append")
    for mode, m in runs.items():
        if a and mode != "append":
            ratios = {
                "changelog": _ratio(m.get("changelog_events_per_s"), a.get("changelog_events_per_s")),
                "caught_up": _ratio(m.get("caught_up_events_per_s"), a.get("caught_up_events_per_s")),
            }
            m["ratios"] = ratios
            if mode == "merge":
                size["ratios"] = ratios


def _ratio(x: float | None, y: float | None) -> float | None:
    return round(x / y, 3) if x and y else None


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    sizes = results["sizes"]

    def add(label: str, value: str | None, met: bool | None) -> None:
        out.append({"target": label, "value": value, "met": met})

    for s in sizes:
        r = s.get("ratios") or {}
        c, k = r.get("changelog"), r.get("caught_up")
        add(f"{s['docs']:,} docs: changelog ingest ≥ 0.9x append", _x(c), None if c is None else c >= 0.9)
        add(f"{s['docs']:,} docs: caught up ≥ 0.5x append", _x(k), None if k is None else k >= 0.5)
    rss = [r["peak_rss_mib"] for s in sizes for r in s["runs"] if r.get("ok")]
    peak = max(rss) if rss else None
    add(
        "pipeline peak RSS < 1.5 GiB",
        None if peak is None else f"{peak:,.0f} MiB",
        None if peak is None else peak < 1536,
    )
    costs = [
        (s["docs"], r["rounds_summary"]["us_per_merged_change"])
        for s in sizes
        for r in s["runs"]
        if r["mode"] == "merge" and r.get("rounds_summary", {}).get("us_per_merged_change")
    ]
    if len(costs) >= 2:
        lo, hi = min(c for _, c in costs), max(c for _, c in costs)
        add(
            "materializer cost per change flat within 2x across the sweep",
            f"{hi / lo:.2f}x ({', '.join(f'{d:,}: {c:,.0f} us' for d, c in costs)})",
            hi / lo <= 2,
        )
    else:
        add("materializer cost per change flat within 2x across the sweep", None, None)
    return out


def _x(v: float | None) -> str | None:
    return None if v is None else f"{v:.2f}x"


def _f(v: Any, digits: int = 0) -> str:
    return report._fmt(v, digits)


def markdown(results: dict[str, Any]) -> str:
    m, c = results["machine"], results["config"]
    lines = [
        SECTION,
        "",
        f"Latest run of `python -m bench.table_size` ({results['date']}, commit `{results.get('commit') or '?'}`),"
        " rewritten by each run (`bench/results/table-size-*.json` keeps every run).",
        "",
        f"- Machine: {m['nproc']} CPUs, {m['mem_gib']:.0f} GiB; Kafka, MinIO, the bench and the pipeline share "
        f"them; load average {m.get('load_avg_at_start', ['?'])[0]} at the start, "
        f"{m.get('load_avg_at_end', ['?'])[0]} at the end.",
        f"- Data per size: one collection of N documents (~{c['doc_bytes']} B of Extended JSON each) inserted, "
        f"then {c['updates']:,} changes spread uniformly over the live documents (60% full-document updates, "
        "30% top-level partial updates, 10% deletes with their tombstones), 4 partitions, all in Kafka before "
        "the pipeline starts. Append mode and merge mode read the same topic into separate lakes.",
        "- Pipeline: `python -m dataflow`, one process, recovery on, `CDC_STOP_AT_END=1`, batch sizes, "
        "`CDC_MIRROR_ROUND_ROWS`, `CDC_MIRROR_ROUND_FRACTION`, `CDC_MIRROR_MAX_WAIT_SECONDS`, "
        "`CDC_MIRROR_DEFER_BACKLOG` and `CDC_MIRROR_BACKLOG_MAX_WAIT_SECONDS` at their defaults. Rates count from the process start (a few seconds of "
        "start-up included); times are polled once a second.",
        "- changelog = until the changelog has recorded every partition's last offset; updates = the update "
        "events over the time from the seed being recorded to that; caught up = until `Mirror.lag().changes` "
        "is 0 after that (append mode: the changelog is the table). Lag = `Mirror.lag()`'s figures sampled once a "
        "second (each call reads only the changelog versions committed since the last) while the updates go into the "
        "changelog (a backlog run: the pipeline reads as fast as it can, and while the input holds a "
        "backlog the rounds wait for it to be read, up to `CDC_MIRROR_BACKLOG_MAX_WAIT_SECONDS`, so the "
        "lag grows with the backlog; not a steady-state latency).",
        "- CPU s = the pipeline's; machine busy CPU s = all CPUs' busy seconds during the run (Kafka, MinIO, "
        "the bench's polling and anything else running included): well above CPU s means the pipeline shared "
        "the machine.",
        "- Materializer cost = seconds of the MERGE rounds (from the pipeline's round log lines) / changes they "
        "applied; seed rounds that only append are apart.",
        "",
        "| docs | mode | changelog ev/s | seed ev/s | update ev/s | caught up ev/s | wall s | CPU s "
        "| machine busy CPU s | peak RSS MiB | lake MiB | mirror check |",
        "|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for s in results["sizes"]:
        for r in s["runs"]:
            chk = s.get("check", {}).get(r["mode"], {})
            ok = "–" if not chk else ("ok" if chk.get("ok") else f"**FAILED** {chk.get('summary', '')}")
            if not r.get("ok"):
                ok = f"**run failed: {r.get('error')}**"
            lines.append(
                f"| {s['docs']:,} | {r['mode']} | {_f(r.get('changelog_events_per_s'))} | "
                f"{_f(r.get('seed_events_per_s'))} | {_f(r.get('update_events_per_s'))} | "
                f"{_f(r.get('caught_up_events_per_s'))} | {_f(r['wall_s'], 1)} | {_f(r['cpu_s'], 1)} | "
                f"{_f(r.get('machine_busy_cpu_s'), 1)} | "
                f"{_f(r['peak_rss_mib'])} | {_f(r.get('lake_data_mib'))} | {ok} |"
            )
    lines += [
        "",
        "Merge mode's mirror (merge-split: the same with the materializer in a process of its own, "
        "`cdc materialize --follow`, and `CDC_MATERIALIZER=off` in the pipeline; its CPU s is both processes' together, its peak RSS the "
        "larger one's):",
        "",
        "| docs | mode | vs append: changelog | vs append: caught up | lag p50 / p99 s | lag p50 / p99 changes "
        "| lag when the changelog was done | catch-up after s | merge rounds | median round changes "
        "| median round s | rows rewritten / change | us / change (merges) | us / change (all rounds) |",
        "|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for s in results["sizes"]:
        for r in s["runs"]:
            if r["mode"] != "append":
                lines.append(_mirror_row(s, r))
    lines += ["", "| target | measured | |", "|---|--:|---|"]
    for t in results["targets"]:
        met = "not measured" if t["met"] is None else ("met" if t["met"] else "**not met**")
        lines.append(f"| {t['target']} | {t['value'] or '–'} | {met} |")
    if results.get("notes"):
        lines += ["", *[f"- {n}" for n in results["notes"]]]
    return "\n".join(lines) + "\n"


def _mirror_row(s: dict[str, Any], r: dict[str, Any]) -> str:
    rs = r.get("rounds_summary", {})
    ratios = r.get("ratios") or s.get("ratios") or {}
    at = r.get("lag_at_changelog_done")
    mk = r["marks_s"]
    at_text = "–" if at is None else f"{at['changes']:,} changes, {at['seconds']:.0f} s"
    after = mk["caught_up_s"] - mk["changelog_s"] if "caught_up_s" in mk and "changelog_s" in mk else None
    return (
        f"| {s['docs']:,} | {r['mode']} | {_x(ratios.get('changelog')) or '–'} | "
        f"{_x(ratios.get('caught_up')) or '–'} | "
        f"{_f(r.get('lag_p50_s'), 1)} / {_f(r.get('lag_p99_s'), 1)} | "
        f"{_f(r.get('lag_p50_changes'))} / {_f(r.get('lag_p99_changes'))} | "
        f"{at_text} | {_f(after, 1)} | "
        f"{_f(rs.get('merged'))} | {_f(rs.get('median_merge_changes'))} | {_f(rs.get('median_merge_s'), 1)} | "
        f"{_f(rs.get('rewritten_per_change'), 1)} | {_f(rs.get('us_per_merged_change'), 1)} | "
        f"{_f(rs.get('us_per_change'), 1)} |"
    )


def write_section(path: Path, section: str, title: str = SECTION) -> None:
    """Replace the `title` part of RESULTS.md (up to the next `## ` heading), or insert it before
    "## Measured decisions" (or at the end); everything else stays as it is."""
    text = path.read_text() if path.exists() else ""
    at = text.find("\n" + title + "\n")
    if at >= 0:
        end = text.find("\n## ", at + 1)
        text = text[: at + 1] + section + (text[end:] if end >= 0 else "")
        path.write_text(text)
        return
    kept = text.find("\n" + report.KEPT)
    if kept >= 0:
        path.write_text(text[: kept + 1] + section + text[kept:])
    else:
        path.write_text(text.rstrip() + "\n\n" + section)


# ---------------------------------------------------------------- main


def remove_lake(stack: Stack, name: str) -> None:
    from minio.deleteobjects import DeleteObject

    s3 = stack.s3()
    objects = (
        DeleteObject(o.object_name) for o in s3.list_objects(stack.bucket, prefix=f"{name}/", recursive=True)
    )
    for err in s3.remove_objects(stack.bucket, objects):
        log.warning("could not remove %s: %s", err.name, err.message)


def run_size(stack: Stack, docs: int, args: argparse.Namespace) -> dict[str, Any]:
    col = Collection(docs, prefix=f"ts{docs}", seed=args.seed)
    create_topics(stack.brokers, [col.topic, "bench.dlq"], PARTITIONS)
    seeded, updates = Produced(), Produced()
    log.info("%s docs: producing the seed", f"{docs:,}")
    produce(stack.brokers, col.seed_messages(), seeded)
    log.info("%s docs: producing %s updates and deletes", f"{docs:,}", f"{args.updates:,}")
    updates.last = dict(seeded.last)
    produce(stack.brokers, col.update_messages(args.updates), updates)
    size: dict[str, Any] = {
        "docs": docs,
        "seed_events": seeded.events,
        "update_events": updates.events,
        "events": seeded.events + updates.events,
        "tombstones": updates.tombstones,
        "value_bytes": seeded.value_bytes + updates.value_bytes,
        "produce_s": round(seeded.seconds + updates.seconds, 1),
        "ops": dict(col.ops),
        "live_documents": len(col.live),
        "runs": [],
        "check": {},
    }
    log.info(
        "%s docs: %s events (%.0f B a value) produced in %.0f s",
        f"{docs:,}",
        f"{size['events']:,}",
        size["value_bytes"] / size["events"],
        size["produce_s"],
    )
    for mode in args.modes:
        log.info("%s docs: running %s mode ...", f"{docs:,}", mode)
        r = run_mode(stack, col, mode, seeded.last, updates.last, args.timeout, args.wait_quiet)
        size["runs"].append(r)
        rows_ok = r["changelog_rows"] == size["events"]
        check: dict[str, Any] = {"changelog_rows": r["changelog_rows"], "expected_rows": size["events"]}
        if mode != "append" and r["ok"]:
            started = time.monotonic()
            check |= check_mirror(r["mirror_uri"], stack.storage_options, col)
            check["check_s"] = round(time.monotonic() - started, 1)
        check["ok"] = rows_ok and check.get("ok", True) and r["ok"]
        if not check["ok"]:
            check["summary"] = ", ".join(
                f"{k} {check.get(k)}"
                for k in ("changelog_rows", "live", "missing", "mismatched", "duplicates", "tombstones")
                if k in check
            )
        size["check"][mode] = check
        log.info(
            "%s docs, %s: %.0f s wall, marks %s, %.0f MiB peak RSS, check %s%s",
            f"{docs:,}",
            mode,
            r["wall_s"],
            r["marks_s"],
            r["peak_rss_mib"],
            "ok" if check["ok"] else f"FAILED: {check}",
            "" if r["ok"] else f" — run FAILED: {r.get('error')}\n{r.get('log_tail', '')}",
        )
        if not args.keep_lakes:
            remove_lake(stack, f"ts{docs}-{mode}")
    figures(size)
    return size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.table_size", description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=5_000_000, help="documents of the largest table")
    parser.add_argument("--updates", type=int, default=1_000_000, help="updates and deletes after the seed")
    parser.add_argument(
        "--sweep", default="", help="comma list of table sizes (documents); --docs is always one of them"
    )
    parser.add_argument("--modes", default="append,merge", help="comma list: append, merge, merge-split")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per pipeline run")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="before each pipeline run, wait up to this many seconds for the machine's CPUs to be mostly idle",
    )
    parser.add_argument(
        "--carry-from",
        type=Path,
        help="an earlier result JSON: its sizes that this run does not measure are reported beside, marked",
    )
    parser.add_argument("--keep-lakes", action="store_true", help="keep each run's lake (disk!)")
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    parser.add_argument("--markdown", type=Path, default=BENCH / "RESULTS.md")
    args = parser.parse_args(argv)
    sizes = sorted({args.docs, *(int(x.replace("_", "")) for x in args.sweep.split(",") if x.strip())})
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if bad := [m for m in args.modes if m not in ("append", "merge", "merge-split")]:
        parser.error(f"unknown modes {bad}")
    if any(s < 10 or s >= 1 << 24 for s in sizes):
        parser.error("sizes from 10 to 16,777,215 documents")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s table_size: %(message)s", datefmt="%H:%M:%S")

    tmp = Path(tempfile.mkdtemp(prefix="cdc-bench-size-"))
    need = sum(s + args.updates for s in sizes) * DISK_PER_EVENT
    free = shutil.disk_usage(tmp).free
    log.info("disk: %.1f GiB free under %s, about %.1f GiB needed", free / 2**30, tmp, need / 2**30)
    if free < need:
        shutil.rmtree(tmp, ignore_errors=True)
        parser.error(
            f"{free / 2**30:.1f} GiB free, about {need / 2**30:.1f} GiB needed: give a smaller sweep"
        )

    now = datetime.now(UTC)
    results: dict[str, Any] = {
        "date": now.isoformat(timespec="seconds"),
        "commit": commit(),
        "machine": machine(),
        "config": {
            "sizes": sizes,
            "updates": args.updates,
            "modes": args.modes,
            "partitions": PARTITIONS,
            "doc_bytes": len(orjson.dumps(ext({"_id": ObjectId(oid(0)), **base(0, 0)}))),
            "delete_share": DELETE_SHARE,
            "partial_share": PARTIAL_SHARE,
            "seed": args.seed,
        },
        "sizes": [],
        "notes": [],
    }
    started = time.monotonic()
    try:
        log.info("starting Kafka and MinIO under %s", tmp)
        with stack_started(tmp) as stack:
            for docs in sizes:
                results["sizes"].append(run_size(stack, docs, args))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["total_s"] = round(time.monotonic() - started, 1)
    if args.carry_from is not None:
        earlier = orjson.loads(args.carry_from.read_bytes())
        for s in earlier["sizes"]:
            if s["docs"] not in sizes:
                origin = s.setdefault(  # a size the earlier run carried keeps its own origin
                    "carried_from",
                    {"date": earlier["date"], "commit": earlier.get("commit"), "file": args.carry_from.name},
                )
                results["sizes"].append(s)
                results["notes"].append(
                    f"{s['docs']:,} docs: from the run of {origin['date']} (commit `{origin['commit']}`, "
                    f"`{origin['file']}`), not measured again in this one."
                )
        results["sizes"].sort(key=lambda s: s["docs"])
    results["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["targets"] = targets(results)
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"table-size-{now.strftime('%Y-%m-%dT%H%M%SZ')}.json"
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    md = markdown(results)
    write_section(args.markdown, md)
    print(md)
    print(f"results: {path}, {args.markdown}")
    ok = all(r["ok"] for s in results["sizes"] for r in s["runs"]) and all(
        c["ok"] for s in results["sizes"] for c in s["check"].values()
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
