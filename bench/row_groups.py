"""`python -m bench.row_groups`: MERGE time against the Parquet row-group size.

A MERGE rewrites every file it touches, and the benchmark's updates pick
documents uniformly, so every batch rewrites the whole table. This writes one
collection's events (from `BenchGenerator`, parsed as the pipeline parses them)
in batches to two local merge-mode tables side by side, one with Parquet's
default row groups (one per file here) and one with the writer's, alternating
which goes first, and times every commit. Both see the same batches on the
same machine at the same moment, so their ratio is what to read.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from deltalake import DeltaTable

from bench.data import BenchGenerator
from dataflow.decode.envelopes import parse
from dataflow.lake import writer as delta_sink
from dataflow.lake.writer import DeltaTableWriter
from dataflow.model import ChangeEvent, SourceMessage

RESULTS = Path(__file__).resolve().parent / "results"


def events(n: int) -> list[ChangeEvent]:
    """The first collection's change events among `n` generated messages."""
    gen = BenchGenerator(prefix="bench", doc_bytes=1024)
    wanted = gen.topics[0]
    offsets: dict[str, int] = {}
    out = []
    for m in gen.messages(n):
        off = offsets[m.topic] = offsets.get(m.topic, -1) + 1
        if m.topic != wanted:
            continue
        e = parse(SourceMessage(m.key, m.value, m.topic, 0, off, (1, 0)))
        if type(e) is ChangeEvent:
            out.append(e)
    return out


def run(n: int, batch: int, workdir: Path) -> dict:
    evs = events(n)
    if len(evs) <= batch:
        raise SystemExit(f"{len(evs)} events make one batch of {batch}: nothing to compare after the first")
    variants = {"default": None, "pipeline": delta_sink.WRITER_PROPERTIES}
    writers = {
        k: DeltaTableWriter(str(workdir / k), mode="merge", writer_properties=v) for k, v in variants.items()
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants)
    for i in range(0, len(evs), batch):
        order.reverse()
        for k in order:
            t = time.perf_counter()
            writers[k].write(evs[i : i + batch])
            if i:  # the first commit creates the table, and the first of all warms delta-rs up
                times[k].append(time.perf_counter() - t)
    last = max(1, len(times["default"]) // 4)  # the last quarter: the table at its largest
    out: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "events": len(evs),
        "batch": batch,
        "rows": DeltaTable(str(workdir / "pipeline")).to_pyarrow_dataset().count_rows(),
        "variants": {},
    }
    for k in variants:
        files = DeltaTable(str(workdir / k)).file_uris()
        out["variants"][k] = {
            "total_s": round(sum(times[k]), 2),
            "last_quarter_median_s": round(statistics.median(times[k][-last:]), 3),
            "files": len(files),
        }
    out["speedup_total"] = round(
        out["variants"]["default"]["total_s"] / out["variants"]["pipeline"]["total_s"], 2
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=600_000, help="messages generated over 3 collections")
    ap.add_argument("--batch", type=int, default=10_000, help="events per commit")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-rowgroups-") as tmp:
        result = run(args.events, args.batch, Path(tmp))
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.fromisoformat(result["date"]).strftime("%Y-%m-%dT%H%M%SZ")
    path = RESULTS / f"row-groups-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"MERGE of {result['events']:,} events in batches of {result['batch']:,}, {result['rows']:,} rows at the end"
    )
    print("| row groups | total s | median s, last quarter | files |")
    print("|---|--:|--:|--:|")
    for k, v in result["variants"].items():
        print(f"| {k} | {v['total_s']} | {v['last_quarter_median_s']} | {v['files']} |")
    print(f"pipeline's row groups: {result['speedup_total']}x as fast in total; written to {path}")


if __name__ == "__main__":
    main()
