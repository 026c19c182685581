"""`python -m bench`: floor, hand-written baseline and this pipeline, side by side on the same data.

Starts its own Kafka and MinIO (free ports on 127.0.0.1, in a temporary
folder; stopped at the end), produces `--events` realistic Debezium change
events (about 1 KiB documents, 3 collections, 4 partitions each), then runs
each variant over all of them as a separate process and measures events/s,
MB/s of message values, wall and CPU seconds, peak RSS and the files written.
Then, unless `--skip-latency`, the end-to-end latency of the pipeline in tail
mode at 50% of its append-mode rate. Results: `bench/results/<date>.json` and
`.png`, and a Markdown table printed and written to `bench/RESULTS.md`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench import latency, report
from bench.data import DataStats, produce_data
from bench.measure import Run, delta_rows, list_files, run_processes
from bench.stack import ROOT, Stack, base_env, pipeline_commands, started

log = logging.getLogger("bench")
BENCH = Path(__file__).resolve().parent
VARIANTS = {
    "floor": {"loop": "floor"},
    "baseline": {"loop": "baseline"},
    "pipeline-append": {"mode": "append", "processes": 1},
    "pipeline-merge": {"mode": "merge", "processes": 1},
    "pipeline-append-2p": {"mode": "append", "processes": 2},
    "pipeline-merge-2p": {"mode": "merge", "processes": 2},
}
DEFAULT_VARIANTS = "floor,baseline,pipeline-append,pipeline-merge,pipeline-append-2p"
PACKAGES = ("bytewax", "deltalake", "pyarrow", "confluent-kafka", "orjson")


def machine() -> dict[str, Any]:
    model = "?"
    mem_kib = 0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            versions[p] = "?"
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": mem_kib / 1024 / 1024,
        "python": platform.python_version(),
        "kernel": f"{platform.system()} {platform.release()}",
        "packages": versions,
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def tail(path: str, n: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def run_variant(
    stack: Stack, name: str, topics: list[str], data: DataStats, expected_live: int, args: argparse.Namespace
) -> dict[str, Any]:
    spec = VARIANTS[name]
    work = stack.tmp / name
    work.mkdir(parents=True, exist_ok=True)
    loop_out = work / "loop.json"
    if "loop" in spec:
        argv = [sys.executable, "-m", "bench.loops", spec["loop"], "--brokers", stack.brokers]
        argv += ["--topics", ",".join(topics), "--out", str(loop_out), "--timeout", str(args.timeout)]
        argv += ["--lake", stack.lake(name), "--batch-rows", str(args.batch_rows)]
        commands = [(argv, base_env(stack))]
    else:
        commands = pipeline_commands(
            stack,
            name,
            topics,
            mode=spec["mode"],
            processes=spec["processes"],
            batch_rows=args.pipeline_batch_rows,
            batch_max_seconds=args.batch_max_seconds,
        )
    run: Run = run_processes(commands, log_dir=work / "logs", cwd=ROOT, timeout=args.timeout)
    out: dict[str, Any] = {
        "name": name,
        "processes": len(run.procs),
        "ok": run.ok,
        "rc": [p.rc for p in run.procs],
        "wall_s": round(run.wall_s, 3),
        "cpu_s": round(run.cpu_s, 3),
        "user_s": round(sum(p.user_s for p in run.procs), 3),
        "sys_s": round(sum(p.sys_s for p in run.procs), 3),
        "peak_rss_mib": round(run.peak_rss_mib, 1),
        "total_rss_mib": round(run.total_rss_mib, 1),
        "rss_timeline_mib": [p.rss_timeline for p in run.procs],
        "events": data.events,
        "value_bytes": data.value_bytes,
        "events_per_s": round(data.events / run.wall_s, 1),
        "mb_per_s": round(data.value_bytes / 1e6 / run.wall_s, 2),
    }
    if not run.ok:
        out["error"] = "timed out" if any(p.timed_out for p in run.procs) else f"exit {out['rc']}"
        out["log_tail"] = "\n".join(tail(p.log) for p in run.procs)
    if loop_out.exists():
        counted = orjson.loads(loop_out.read_bytes())
        out["loop"] = counted
        if counted["events"] != data.events:
            out["ok"] = False
            out["error"] = f"read {counted['events']} events, {data.events} produced"
    if name != "floor":
        files = list_files(stack.s3(), stack.bucket, name)
        out.update(
            data_files=files.data_files,
            data_bytes=files.data_bytes,
            log_files=files.log_files,
            log_bytes=files.log_bytes,
        )
        counts = [delta_rows(stack.table_uri(name, t), stack.storage_options) for t in topics]
        out["rows"] = sum(c or 0 for c in counts)
        out["expected_rows"] = expected_live if spec.get("mode") == "merge" else data.events
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="change events to produce")
    parser.add_argument("--doc-bytes", type=int, default=1024, help="approximate document size")
    parser.add_argument("--partitions", type=int, default=4, help="partitions per topic")
    parser.add_argument("--batch-rows", type=int, default=10_000, help="the baseline's batch per collection")
    parser.add_argument(
        "--pipeline-batch-rows",
        type=int,
        help="CDC_BATCH_MAX_ROWS for the pipeline (default: its own for each mode)",
    )
    parser.add_argument("--batch-max-seconds", type=float, default=5.0, help="CDC_BATCH_MAX_SECONDS")
    parser.add_argument(
        "--variants", default=DEFAULT_VARIANTS, help=f"comma list from: {', '.join(VARIANTS)}"
    )
    parser.add_argument("--skip-latency", action="store_true", help="no tail-mode latency run")
    parser.add_argument("--latency-seconds", type=float, default=45.0, help="length of the latency run")
    parser.add_argument(
        "--latency-rate", type=float, help="events/s of the latency run (default: 50%% of pipeline-append)"
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per variant")
    parser.add_argument("--results", type=Path, default=BENCH / "results", help="where the JSON and PNG go")
    parser.add_argument("--markdown", type=Path, default=BENCH / "RESULTS.md", help="the kept Markdown table")
    parser.add_argument("--keep-temp", action="store_true", help="keep the services' temporary folder")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := [v for v in variants if v not in VARIANTS]:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bench: %(message)s", datefmt="%H:%M:%S")

    now = datetime.now(UTC)
    stamp = now.strftime("%Y-%m-%dT%H%M%SZ")
    results: dict[str, Any] = {
        "date": now.isoformat(timespec="seconds"),
        "commit": commit(),
        "machine": machine(),
        "config": {
            "events": args.events,
            "doc_bytes": args.doc_bytes,
            "partitions": args.partitions,
            "batch_rows": args.batch_rows,
            "pipeline_batch_rows": args.pipeline_batch_rows,
            "batch_max_seconds": args.batch_max_seconds,
            "variants": variants,
        },
        "variants": [],
    }
    latencies: list[float] = []
    tmp = Path(tempfile.mkdtemp(prefix="cdc-bench-"))
    try:
        log.info("starting Kafka and MinIO under %s", tmp)
        with started(tmp) as stack:
            log.info("producing %s change events", f"{args.events:,}")
            data, results["data"] = produce_data(
                stack.brokers, args.events, doc_bytes=args.doc_bytes, partitions=args.partitions
            )
            produce_s, live = results["data"]["produce_seconds"], results["data"]["live_documents"]
            log.info("produced in %.1f s (%.1f MiB of values)", produce_s, data.value_bytes / 2**20)
            topics = sorted(data.per_topic)
            for name in variants:
                log.info("running %s ...", name)
                v = run_variant(stack, name, topics, data, live, args)
                results["variants"].append(v)
                log.info(
                    "%s: %s events/s, %.1f s wall, %.1f s CPU, %.0f MiB peak RSS%s",
                    name,
                    f"{v['events_per_s']:,.0f}",
                    v["wall_s"],
                    v["cpu_s"],
                    v["peak_rss_mib"],
                    "" if v["ok"] else f" — FAILED: {v.get('error')}\n{v.get('log_tail', '')}",
                )
            append = next(
                (v for v in results["variants"] if v["name"] == "pipeline-append" and v["ok"]), None
            )
            rate = args.latency_rate or (append["events_per_s"] / 2 if append else None)
            if args.skip_latency:
                results["latency_skipped"] = "--skip-latency"
            elif rate is None:
                results["latency_skipped"] = "no pipeline-append rate: give --latency-rate"
            else:
                log.info("latency: tail mode at %s events/s for %.0f s", f"{rate:,.0f}", args.latency_seconds)
                try:
                    results["latency"], latencies = latency.run(
                        stack,
                        rate=rate,
                        seconds=args.latency_seconds,
                        doc_bytes=args.doc_bytes,
                        partitions=args.partitions,
                        batch_rows=args.pipeline_batch_rows,
                        batch_max_seconds=args.batch_max_seconds,
                        timeout=args.timeout,
                    )
                except Exception as e:
                    log.exception("latency run failed")
                    results["latency_skipped"] = f"failed: {type(e).__name__}: {e}"
        log.info("services stopped")
    finally:
        if args.keep_temp:
            log.info("kept %s", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    results["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["targets"] = report.targets(results)
    args.results.mkdir(parents=True, exist_ok=True)
    png = args.results / f"{stamp}.png"
    if report.chart(results, latencies, png):
        results["chart"] = str(png.relative_to(ROOT) if png.is_relative_to(ROOT) else png)
    (args.results / f"{stamp}.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    md = report.markdown(results)
    args.markdown.write_text(md + report.kept_section(args.markdown))
    print(md)
    print(f"results: {args.results / f'{stamp}.json'}, {args.markdown}")
    return 0 if all(v["ok"] for v in results["variants"]) else 1


if __name__ == "__main__":
    sys.exit(main())
