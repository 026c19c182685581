"""`python -m bench.maintenance`: what table maintenance does to a lake the pipeline left (issue 21).

Starts its own Kafka and MinIO (free ports on 127.0.0.1, a temporary folder),
produces `--events` of the benchmark's Debezium events (3 collections, 4
partitions each), and runs the pipeline over them once in append mode with
`CDC_STOP_AT_END=1` and its own maintenance off (`CDC_MAINTENANCE=0`), so the
tables hold what ingest alone leaves: a file per batch per table.

Then, per table: the data files and bytes on MinIO (every object under the
table but `_delta_log/`), the `_delta_log/` objects and bytes, and the time to
read the table with deltalake from this process (`DeltaTable(uri)` alone, and
`DeltaTable(uri).to_pyarrow_table()`, best and median of `--repeats`). Then
`maintain_lake` once over the lake, and the same figures again. The rows must
come out identical: every table sorted by (`_source_partition`,
`_source_offset`) before and after, compared column by column, and each
(partition, offset) there once.

Vacuum runs with a retention of 0 hours: nothing writes to the lake while
maintenance runs, so every file compaction replaced can go at once (beside a
writer, a retention that short could delete a file written but not committed
yet). A checkpoint is written whatever the number of commits
(`--checkpoint-every 1`): a table that ingests for days passes the pipeline's
100 commits between checkpoints long before it has a million events.

Results: `bench/results/maintenance-<date>.json`, and the "Table maintenance"
section of `bench/RESULTS.md` (rewritten by each run; the rest is kept).
Timing figures are reported, never asserted.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.feather as feather
from deltalake import DeltaTable

from bench import report
from bench.__main__ import commit, machine, tail
from bench.data import produce_data
from bench.measure import run_processes
from bench.stack import ROOT, Stack, pipeline_commands, started
from bench.table_size import write_section
from dataflow.lake.maintenance import LOG_DIR, MaintenancePolicy, TableOutcome, maintain_lake
from dataflow.lake.storage import list_files

log = logging.getLogger("bench.maintenance")
BENCH = Path(__file__).resolve().parent
SECTION = report.MAINTENANCE
NAME = "maintenance"  # the lake's folder in the bucket, and the pipeline's work folder
KEYS = ("_source_partition", "_source_offset")
MIB = 1024 * 1024
# Bytes an event takes on local disk, with room: Kafka (zstd), MinIO, the sorted copy of the tables.
DISK_PER_EVENT = 4000


# ---------------------------------------------------------------- measuring one table


@dataclass
class Footprint:
    """What a table takes on the object store: its data and its `_delta_log/`, apart."""

    data_files: int = 0
    data_bytes: int = 0
    log_files: int = 0
    log_bytes: int = 0


def footprint(uri: str, storage_options: dict[str, str]) -> Footprint:
    """Every object under the table, counted as log (under `_delta_log/`) or data (everything else).

    Data counts what the store holds, not what the table references: the files
    vacuum has yet to remove are what storage pays for.
    """
    out = Footprint()
    for path, f in list_files(uri, storage_options).items():
        if path.startswith(LOG_DIR + "/"):
            out.log_files += 1
            out.log_bytes += f.size
        else:
            out.data_files += 1
            out.data_bytes += f.size
    return out


@dataclass
class Reads:
    """Seconds to open the table and to read it whole, over `repeats` tries each."""

    open_best_s: float
    open_median_s: float
    read_best_s: float
    read_median_s: float
    version: int
    rows: int
    referenced_files: int  # files the current version references


def time_reads(uri: str, storage_options: dict[str, str], repeats: int) -> tuple[Reads, pa.Table]:
    """Open (log replay) and open + `to_pyarrow_table()` (every file read), as a reader would.

    Each try opens the table afresh, so nothing is cached between them but what
    MinIO and the OS cache. Returns the last table read as well, for the check.
    """
    opens, reads = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        DeltaTable(uri, storage_options=storage_options)
        opens.append(time.perf_counter() - t0)
    table: pa.Table | None = None
    dt: DeltaTable | None = None
    for _ in range(repeats):
        table = None  # the previous read's memory goes before the next read
        t0 = time.perf_counter()
        dt = DeltaTable(uri, storage_options=storage_options)
        table = dt.to_pyarrow_table()
        reads.append(time.perf_counter() - t0)
    assert table is not None and dt is not None
    reads_out = Reads(
        open_best_s=round(min(opens), 4),
        open_median_s=round(statistics.median(opens), 4),
        read_best_s=round(min(reads), 4),
        read_median_s=round(statistics.median(reads), 4),
        version=dt.version(),
        rows=table.num_rows,
        referenced_files=len(dt.file_uris()),
    )
    return reads_out, table


def sorted_rows(table: pa.Table) -> pa.Table:
    """The table in (partition, offset) order: one order for the same rows, whatever files hold them."""
    return table.sort_by([(k, "ascending") for k in KEYS])


def duplicate_keys(table: pa.Table) -> int:
    """Rows whose (partition, offset) another row has too (the table sorted by `sorted_rows`)."""
    if table.num_rows < 2:
        return 0
    p, o = (table.column(k).combine_chunks() for k in KEYS)
    same = pc.and_(pc.equal(p[1:], p[:-1]), pc.equal(o[1:], o[:-1]))
    return int(pc.sum(same.cast(pa.int64())).as_py() or 0)


def compare(before: pa.Table, after: pa.Table) -> dict[str, Any]:
    """Both sorted by `sorted_rows`: the same rows, column by column; the columns that differ if not."""
    out: dict[str, Any] = {
        "rows_before": before.num_rows,
        "rows_after": after.num_rows,
        "duplicates_after": duplicate_keys(after),
        "columns_differing": [],
    }
    if before.schema.names != after.schema.names:
        out["columns_differing"] = sorted(set(before.schema.names) ^ set(after.schema.names))
    elif before.num_rows == after.num_rows:
        out["columns_differing"] = [
            n for n in before.schema.names if not before.column(n).equals(after.column(n))
        ]
    out["keys_identical"] = before.num_rows == after.num_rows and all(
        before.column(k).equals(after.column(k)) for k in KEYS
    )
    out["identical"] = (
        out["keys_identical"] and not out["columns_differing"] and before.num_rows == after.num_rows
    )
    return out


def measure(
    uri: str, storage_options: dict[str, str], repeats: int, keep: Path | None
) -> tuple[dict[str, Any], pa.Table]:
    """A table's footprint and read times; its rows sorted (and, with `keep`, saved there as Arrow IPC)."""
    files = footprint(uri, storage_options)
    reads, table = time_reads(uri, storage_options, repeats)
    table = sorted_rows(table)
    if keep is not None:  # local disk, not memory: at a million events the tables take GBs as Arrow
        feather.write_feather(table, keep, compression="zstd")
    return {**asdict(files), **asdict(reads), "duplicates": duplicate_keys(table)}, table


# ---------------------------------------------------------------- the run


def policy_of(args: argparse.Namespace) -> MaintenancePolicy:
    """The pipeline's defaults, but vacuum at 0 hours (nothing writes meanwhile) and `--checkpoint-every`."""
    return replace(MaintenancePolicy(), vacuum_retention_hours=0, checkpoint_every=args.checkpoint_every)


def run_pipeline(stack: Stack, topics: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """`python -m dataflow` once over every topic, in append mode, its own maintenance off."""
    commands = pipeline_commands(stack, NAME, topics, mode="append", batch_rows=args.batch_rows)
    for _, env in commands:
        env["CDC_MAINTENANCE"] = "0"
    run = run_processes(commands, log_dir=stack.tmp / NAME / "logs", cwd=ROOT, timeout=args.timeout)
    out: dict[str, Any] = {
        "ok": run.ok,
        "rc": [p.rc for p in run.procs],
        "wall_s": round(run.wall_s, 2),
        "cpu_s": round(run.cpu_s, 2),
        "peak_rss_mib": round(run.peak_rss_mib, 1),
    }
    if not run.ok:
        out["error"] = "timed out" if any(p.timed_out for p in run.procs) else f"exit {out['rc']}"
        out["log_tail"] = "\n".join(tail(p.log) for p in run.procs)
    return out


def maintain(stack: Stack, policy: MaintenancePolicy) -> tuple[list[TableOutcome], float]:
    """`maintain_lake` over the whole lake, once; its outcomes and the seconds it took in all."""
    t0 = time.perf_counter()
    outcomes = maintain_lake(stack.lake(NAME), storage_options=stack.storage_options, policy=policy)
    return outcomes, time.perf_counter() - t0


def run(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    """Produce, ingest, measure, maintain, measure again, check: the result record without the machine."""
    log.info("producing %s change events", f"{args.events:,}")
    data, summary = produce_data(
        stack.brokers, args.events, doc_bytes=args.doc_bytes, partitions=args.partitions
    )
    topics = sorted(data.per_topic)
    out: dict[str, Any] = {
        "data": summary,
        "tables": [],
    }
    log.info(
        "produced in %.1f s; running the pipeline (append, maintenance off) ...", summary["produce_seconds"]
    )
    out["pipeline"] = pipeline = run_pipeline(stack, topics, args)
    log.info(
        "pipeline: %.1f s wall, %.1f s CPU, ok %s", pipeline["wall_s"], pipeline["cpu_s"], pipeline["ok"]
    )
    if not pipeline["ok"]:
        log.error("pipeline failed: %s\n%s", pipeline.get("error"), pipeline.get("log_tail", ""))
        return out

    keep_dir = stack.tmp / "before"
    keep_dir.mkdir(exist_ok=True)
    tables: dict[str, dict[str, Any]] = {}
    for topic in topics:
        uri = stack.table_uri(NAME, topic)
        label = topic.split(".", 1)[1]
        before, _ = measure(uri, stack.storage_options, args.repeats, keep_dir / f"{label}.arrow")
        tables[uri] = {"table": label, "uri": uri, "expected_rows": data.per_topic[topic], "before": before}
        log.info(
            "%s before: %d data files (%.1f MiB), %d log files, open %.3f s, read %.3f s",
            label,
            before["data_files"],
            before["data_bytes"] / MIB,
            before["log_files"],
            before["open_best_s"],
            before["read_best_s"],
        )

    policy = policy_of(args)
    out["policy"] = asdict(policy)
    log.info("maintaining the lake ...")
    outcomes, seconds = maintain(stack, policy)
    out["maintenance_s"] = round(seconds, 3)
    out["maintenance_errors"] = [f"{o.label}: {o.error}" for o in outcomes if o.error]
    for o in outcomes:
        t = tables.setdefault(o.uri, {"table": o.label, "uri": o.uri, "unexpected": True})
        t["maintenance"] = o.report.as_dict() if o.report else {"error": o.error}

    for t in tables.values():
        if "before" not in t:
            continue
        after, rows = measure(t["uri"], stack.storage_options, args.repeats, None)
        t["after"] = after
        kept = keep_dir / f"{t['table']}.arrow"
        t["check"] = compare(feather.read_table(kept), rows)
        kept.unlink()
        del rows
        t["check"]["rows_expected"] = t["expected_rows"]
        t["check"]["ok"] = (
            t["check"]["identical"]
            and t["check"]["rows_before"] == t["expected_rows"]
            and t["before"]["duplicates"] == 0
            and t["check"]["duplicates_after"] == 0
            and "error" not in t.get("maintenance", {})
        )
        m = t.get("maintenance", {})
        log.info(
            "%s after: %d data files (%.1f MiB), %d log files, open %.3f s, read %.3f s; "
            "maintenance %.2f s (%s compacted into %s, %s vacuumed); rows %s",
            t["table"],
            after["data_files"],
            after["data_bytes"] / MIB,
            after["log_files"],
            after["open_best_s"],
            after["read_best_s"],
            m.get("seconds", 0.0),
            m.get("files_compacted"),
            m.get("files_added"),
            m.get("files_vacuumed"),
            "identical" if t["check"]["identical"] else f"DIFFER: {t['check']}",
        )
    out["tables"] = list(tables.values())
    return out


def ok(results: dict[str, Any]) -> bool:
    """The pipeline ran, maintenance failed nowhere, and every table kept exactly its rows."""
    tables = results.get("tables") or []
    return (
        results.get("pipeline", {}).get("ok", False)
        and not results.get("maintenance_errors")
        and bool(tables)
        and all(t.get("check", {}).get("ok") for t in tables)
    )


# ---------------------------------------------------------------- the report


def _f(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:,.{digits}f}"


def _pair(t: dict[str, Any], key: str, scale: float = 1.0, digits: int | None = None) -> str:
    b, a = t.get("before", {}).get(key), t.get("after", {}).get(key)
    if digits is None:
        return f"{'–' if b is None else f'{b:,}'} / {'–' if a is None else f'{a:,}'}"
    return f"{_f(None if b is None else b / scale, digits)} / {_f(None if a is None else a / scale, digits)}"


def markdown(results: dict[str, Any]) -> str:
    """The "Table maintenance" section of RESULTS.md."""
    m, c = results["machine"], results["config"]
    d = results.get("data", {})
    p = results.get("pipeline", {})
    pol = results.get("policy") or {}
    lines = [
        SECTION,
        "",
        f"Latest run of `{c['command']}` ({results['date']}, commit `{results.get('commit') or '?'}`; "
        f"JSON: `{results.get('json', '?')}`). Rewritten by each run of it.",
        "",
        f"- Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_gib']:.0f} GiB memory, Python {m['python']}, "
        f"{m['kernel']}; {', '.join(f'{k} {v}' for k, v in m['packages'].items())}. Kafka, MinIO and the "
        f"benchmark share the CPUs; load average (1 min) {m.get('load_avg_at_start', ['?'])[0]} at the start, "
        f"{m.get('load_avg_at_end', ['?'])[0]} at the end.",
    ]
    if d:
        lines.append(
            f"- Data: {d['events']:,} change events ({d['tombstones']:,} delete tombstones besides), "
            f"{d['value_bytes'] / MIB:,.1f} MiB of message values, {len(d['per_topic'])} collections × "
            f"{c['partitions']} partitions; ops: "
            + ", ".join(f"{k} {v:,}" for k, v in sorted(d["ops"].items()))
            + f". Produced in {d['produce_seconds']:.1f} s."
        )
    if p:
        rows = c.get("batch_rows")
        lines.append(
            "- Before: `python -m dataflow` once over all of it, append mode, `CDC_STOP_AT_END=1`, "
            "`CDC_MAINTENANCE=0` (its own maintenance off: the tables hold what ingest alone leaves), "
            + (f"`CDC_BATCH_MAX_ROWS={rows}`" if rows else "batches at the pipeline's default size")
            + f"; {p['wall_s']:,.1f} s wall, {p['cpu_s']:,.1f} s CPU"
            + ("." if p.get("ok") else f", **FAILED**: {p.get('error')}.")
        )
    if pol:
        lines.append(
            f"- Maintenance: `maintain_lake` once over the lake after the pipeline exited, "
            f"{_f(results.get('maintenance_s'), 1)} s in all. Compaction to "
            f"{pol['target_bytes'] / MIB:,.0f} MiB files once a table has {pol['min_small_files']} files "
            f"under {pol['target_bytes'] * pol['small_fraction'] / MIB:,.0f} MiB; a checkpoint every "
            f"{pol['checkpoint_every']} commit(s); log clean-up after {pol['log_retention_hours']} h (so no "
            f"commit file of this run is old enough to go); vacuum with a retention of "
            f"**{pol['vacuum_retention_hours']} hours**, because nothing writes to the lake meanwhile (the "
            f"pipeline's default is 168 h: beside a writer, 0 could delete a file written but not committed yet)."
        )
    lines += [
        f"- Reads: from the benchmark's process against MinIO on 127.0.0.1, best / median of {c['repeats']}. "
        "*open* is `DeltaTable(uri, storage_options)` alone (the log replayed); *read* is that plus "
        "`.to_pyarrow_table()` (every file read). Files and MiB count every object under the table on MinIO "
        "(the data: all but `_delta_log/`, which is counted apart).",
        "- Check: each table sorted by (`_source_partition`, `_source_offset`) before and after, compared "
        "column by column; every (partition, offset) there once.",
        "",
    ]
    tables = [t for t in results.get("tables", []) if "before" in t]
    if not tables:
        lines.append("No tables measured (the pipeline run failed).")
        return "\n".join(lines) + "\n"
    lines += [
        "| table | rows | files before / after | data MiB before / after | log files before / after "
        "| log MiB before / after | open s before / after | read s before / after | read s median before / after "
        "| maintenance s | rows identical |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for t in tables:
        mt = t.get("maintenance", {})
        ck = t.get("check", {})
        same = "yes" if ck.get("ok") else f"**NO**: {ck}"
        lines.append(
            f"| {t['table']} | {t['before']['rows']:,} | {_pair(t, 'data_files')} | "
            f"{_pair(t, 'data_bytes', MIB, 1)} | {_pair(t, 'log_files')} | {_pair(t, 'log_bytes', MIB, 2)} | "
            f"{_pair(t, 'open_best_s', 1, 3)} | {_pair(t, 'read_best_s', 1, 3)} | "
            f"{_pair(t, 'read_median_s', 1, 3)} | {_f(mt.get('seconds'), 2)} | {same} |"
        )
    lines += [
        "",
        "What maintenance did:",
        "",
        "| table | small files | compacted → written | files vacuumed | MiB vacuumed | checkpoint at "
        "| log files removed | version before → after |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for t in tables:
        mt = t.get("maintenance", {})
        if "error" in mt:
            lines.append(f"| {t['table']} | failed: {mt['error']} | | | | | | |")
            continue
        lines.append(
            f"| {t['table']} | {mt.get('small_files', 0):,} | {mt.get('files_compacted', 0):,} → "
            f"{mt.get('files_added', 0):,} | {mt.get('files_vacuumed', 0):,} | "
            f"{_f(mt.get('bytes_vacuumed', 0) / MIB, 1)} | {mt.get('checkpoint_version', '–')} | "
            f"{mt.get('log_files_removed', 0):,} | {t['before']['version']} → {t.get('after', {}).get('version')} |"
        )
    if results.get("maintenance_errors"):
        lines += ["", *[f"- maintenance failed: {e}" for e in results["maintenance_errors"]]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.maintenance", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="change events to produce")
    parser.add_argument("--doc-bytes", type=int, default=1024, help="approximate document size")
    parser.add_argument("--partitions", type=int, default=4, help="partitions per topic")
    parser.add_argument(
        "--batch-rows", type=int, help="CDC_BATCH_MAX_ROWS for the pipeline (default: its own)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="tries per read figure (best and median)")
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=1,
        help="maintenance's checkpoint interval in commits (1: always a checkpoint; the pipeline's is 100)",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed for the pipeline run")
    parser.add_argument("--results", type=Path, default=BENCH / "results", help="where the JSON goes")
    parser.add_argument("--markdown", type=Path, default=BENCH / "RESULTS.md", help="the kept Markdown")
    args = parser.parse_args(argv)
    if args.events < 1 or args.repeats < 1 or args.checkpoint_every < 1:
        parser.error("--events, --repeats and --checkpoint-every are at least 1")
    args.command = "python -m bench.maintenance " + " ".join(
        sys.argv[1:] if argv is None else argv
    )  # as given
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s maintenance: %(message)s", datefmt="%H:%M:%S")
    tmp = Path(tempfile.mkdtemp(prefix="cdc-bench-maint-"))
    need, free = args.events * DISK_PER_EVENT, shutil.disk_usage(tmp).free
    if free < need:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"{free / 2**30:.1f} GiB free, about {need / 2**30:.1f} GiB needed", file=sys.stderr)
        return 2
    now = datetime.now(UTC)
    results: dict[str, Any] = {
        "date": now.isoformat(timespec="seconds"),
        "commit": commit(),
        "machine": machine(),
        "config": {
            "command": args.command.strip(),
            "events": args.events,
            "doc_bytes": args.doc_bytes,
            "partitions": args.partitions,
            "batch_rows": args.batch_rows,
            "repeats": args.repeats,
            "checkpoint_every": args.checkpoint_every,
        },
    }
    started_at = time.monotonic()
    try:
        log.info("starting Kafka and MinIO under %s", tmp)
        with started(tmp) as stack:
            results |= run(stack, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["total_s"] = round(time.monotonic() - started_at, 1)
    results["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["ok"] = ok(results)
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"maintenance-{now.strftime('%Y-%m-%dT%H%M%SZ')}.json"
    results["json"] = str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    md = markdown(results)
    write_section(args.markdown, md, SECTION)
    print(md)
    print(f"results: {path}, {args.markdown}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
