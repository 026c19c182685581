"""`python -m bench.merge_source`: a MERGE's memory against how its source reaches delta-rs.

The materializer's rounds MERGE up to `CDC_MIRROR_ROUND_ROWS` changes into the
mirror at once. This measures one such MERGE with delta-rs alone, on a local
table of mirror-like rows (the `_key`, row metadata and a few value columns),
in three ways:

- `in-memory`: `streamed_exec=False`, delta-rs plans over the source in memory
  and prunes target files by the source's key range itself;
- `streamed`: `streamed_exec=True`, the join condition alone;
- `streamed+range`: `streamed_exec=True` with the source's least and greatest
  `_key` in the condition, as `DeltaTableWriter` does.

Two sources: `uniform` updates spread over the whole table (every file is
rewritten) and `narrow` updates of one key range (one file is). Each MERGE runs
in a fresh process on a fresh copy of the table, so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
from deltalake import DeltaTable, write_deltalake

from bench.table_size import write_section
from dataflow.lake.writer import WRITER_PROPERTIES, _key_range  # the writer's own bound

BENCH = Path(__file__).resolve().parent
SECTION = "## MERGE source"
VARIANTS = ("in-memory", "streamed", "streamed+range")


def rows(ids: list[int], seq: int, rng: random.Random) -> pa.Table:
    """Mirror-like rows: `_key` and `_id` text, row metadata, five value columns."""
    n = len(ids)
    key = pa.array([f"{i:024x}" for i in ids])
    return pa.table(
        {
            "_key": key,
            "_id": key,
            "_seq": pa.array([seq] * n, pa.int64()),
            "_op": pa.array(["update"] * n),
            "_ts": pa.array([seq] * n, pa.int64()).cast(pa.timestamp("us", "UTC")),
            "_source_topic": pa.array(["bench.topic"] * n),
            "_source_partition": pa.array([i % 4 for i in ids], pa.int32()),
            "_source_offset": pa.array(ids, pa.int64()),
            "_deleted": pa.array([False] * n),
            "name": pa.array([f"name {i} {seq}" for i in ids]),
            "qty": pa.array([rng.randrange(1000) for _ in ids], pa.int64()),
            "price": pa.array([rng.random() for _ in ids]),
            "note": pa.array([f"a note on document {i}, version {seq}" for i in ids]),
            "active": pa.array([rng.random() < 0.5 for _ in ids]),
        }
    )


def build(path: Path, n: int, files: int = 10) -> None:
    rng = random.Random(1)
    step = -(-n // files)
    for start in range(0, n, step):
        ids = list(range(start, min(n, start + step)))
        write_deltalake(str(path), rows(ids, 1, rng), mode="append", writer_properties=WRITER_PROPERTIES)


def source_ids(kind: str, n: int, m: int) -> list[int]:
    if kind == "narrow":
        return list(range(n // 5, n // 5 + m))
    return sorted(random.Random(2).sample(range(n), m))


def child(table: Path, variant: str, kind: str, n: int, m: int) -> dict[str, Any]:
    """One MERGE in this process; its figures."""
    src = rows(source_ids(kind, n, m), 2, random.Random(3))
    peak = [0]

    def watch() -> None:
        while True:
            with open("/proc/self/statm") as f:
                peak[0] = max(peak[0], int(f.read().split()[1]) * 4096 >> 20)
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()
    time.sleep(0.2)
    before = peak[0]
    condition = "t._key = s._key" + (_key_range(src) if variant == "streamed+range" else "")
    cols = src.column_names
    started = time.monotonic()
    metrics = (
        DeltaTable(str(table))
        .merge(
            src,
            condition,
            source_alias="s",
            target_alias="t",
            streamed_exec=variant != "in-memory",
            writer_properties=WRITER_PROPERTIES,
        )
        .when_matched_update({c: f"s.{c}" for c in cols if c != "_key"}, predicate="s._seq > t._seq")
        .when_not_matched_insert({c: f"s.{c}" for c in cols})
        .execute()
    )
    seconds = time.monotonic() - started
    time.sleep(0.1)
    return {
        "variant": variant,
        "source": kind,
        "rows": n,
        "updates": m,
        "seconds": round(seconds, 2),
        "rss_before_mib": before,
        "peak_rss_mib": peak[0],
        "merge_mib": peak[0] - before,
        "files_scanned": metrics.get("num_target_files_scanned"),
        "files_skipped": metrics.get("num_target_files_skipped_during_scan"),
        "rows_rewritten": metrics.get("num_output_rows"),
    }


def markdown(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [
        SECTION,
        "",
        f"Latest run of `python -m bench.merge_source` ({result['date']}, commit `{result['commit']}`), "
        "rewritten by each run (`bench/results/merge-source-*.json` keeps every run).",
        "",
        f"- One local Delta table of {c['rows']:,} mirror-like rows (14 columns) in 10 files; "
        f"one MERGE of {c['updates']:,} updates (`uniform`: spread over the table; "
        f"`narrow`: {c['narrow']:,} updates of one key range), in a fresh process on a fresh copy each.",
        "- `in-memory` = `streamed_exec=False`; `streamed` = `streamed_exec=True`; `streamed+range` = "
        "streamed, with the source's least and greatest `_key` in the join condition "
        "(what `DeltaTableWriter` does). MERGE MiB = peak RSS during the MERGE less RSS before it "
        "(the source table already built). delta-rs' file scan counts are in the JSON; at this size "
        "it reported 0 files scanned for every MERGE, so they are left out here.",
        "",
        "| source | variant | MERGE MiB | peak RSS MiB | s | rows rewritten |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['source']} ({r['updates']:,}) | {r['variant']} | {r['merge_mib']:,} | {r['peak_rss_mib']:,} | "
            f"{r['seconds']} | {r['rows_rewritten']:,} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.merge_source", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000, help="rows of the table")
    parser.add_argument("--updates", type=int, default=1_000_000, help="updates of the uniform MERGE")
    parser.add_argument("--narrow", type=int, default=100_000, help="updates of the narrow MERGE")
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    parser.add_argument("--markdown", type=Path, default=BENCH / "RESULTS.md")
    parser.add_argument("--child", nargs=5, metavar=("TABLE", "VARIANT", "SOURCE", "ROWS", "UPDATES"))
    args = parser.parse_args(argv)
    if args.child:
        table, variant, kind, n, m = args.child
        print(json.dumps(child(Path(table), variant, kind, int(n), int(m))))
        return 0
    runs = []
    with tempfile.TemporaryDirectory(prefix="cdc-bench-merge-") as tmp:
        base = Path(tmp) / "table"
        print(f"building {args.rows:,} rows under {tmp}", flush=True)
        build(base, args.rows)
        for kind, m in (("uniform", args.updates), ("narrow", args.narrow)):
            for variant in VARIANTS:
                work = Path(tmp) / "work"
                shutil.rmtree(work, ignore_errors=True)
                shutil.copytree(base, work)
                cmd = [sys.executable, "-m", "bench.merge_source", "--child", str(work), variant, kind]
                out = subprocess.run(
                    [*cmd, str(args.rows), str(m)], check=True, capture_output=True, text=True
                )
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(json.dumps(r), flush=True)
                runs.append(r)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    now = datetime.now(UTC)
    result = {
        "date": now.isoformat(timespec="seconds"),
        "commit": commit or "unknown",
        "config": {"rows": args.rows, "updates": args.updates, "narrow": args.narrow},
        "runs": runs,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"merge-source-{now.strftime('%Y-%m-%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    section = markdown(result)
    write_section(args.markdown, section, SECTION)
    print(section)
    print(f"results: {path}, {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
