"""`python -m bench.nested_updates`: what an update inside a field costs against a top-level one.

MongoDB's connector sends an update without the document by default. A change
of a top-level field is a patch of its column; a change inside one (`a.b`,
`arr.1`) must read the field's stored value first (`dataflow.lake.documents`),
one scan of the table per batch. This builds two identical local merge-mode
tables of `--docs` documents, then commits the same number of batches of
`--batch` updates of random documents to each, alternating which goes first:
to one `profile` replaced whole (top level), to the other `profile.city` (inside
the field). Their ratio is what to read.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from dataflow.decode.updates import Update
from dataflow.lake.writer import DeltaTableWriter
from dataflow.model import ChangeEvent

RESULTS = Path(__file__).parent / "results"


def _event(i: int, offset: int, **kw) -> ChangeEvent:
    return ChangeEvent(
        "bench", "users", f"{i:024x}", kw.pop("op"), kw.pop("doc", None), 1_700_000_000_000 + offset, 0,
        "bench.users", 0, offset, 200, **kw,
    )  # fmt: skip


def run(docs: int, batch: int, batches: int, workdir: Path) -> dict:
    rng = random.Random(7)
    writers = {k: DeltaTableWriter(str(workdir / k), mode="merge") for k in ("top_level", "inside")}
    base = [
        {
            "_id": f"{i:024x}",
            "name": f"user {i}",
            "profile": {"city": "Oslo", "zip": f"{i % 9999:04}"},
            "n": i,
        }
        for i in range(docs)
    ]
    offset = 0
    for start in range(0, docs, 100_000):
        chunk = [
            _event(int(d["_id"], 16), offset + j, op="insert", doc=d)
            for j, d in enumerate(base[start : start + 100_000])
        ]
        offset += len(chunk)
        for w in writers.values():
            w.write(chunk)
    times: dict[str, list[float]] = {k: [] for k in writers}
    order = list(writers)
    for _ in range(batches):
        ids = rng.sample(range(docs), batch)
        city = f"city {offset}"
        top = [
            _event(
                i,
                offset + j,
                op="update",
                updated={"profile": {"city": city, "zip": base[i]["profile"]["zip"]}},
            )
            for j, i in enumerate(ids)
        ]
        inside = [
            _event(i, offset + j, op="update", change=Update(set=((("profile", "city"), city),)))
            for j, i in enumerate(ids)
        ]
        offset += batch
        order.reverse()
        for k in order:
            t = time.perf_counter()
            writers[k].write(top if k == "top_level" else inside)
            times[k].append(time.perf_counter() - t)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "docs": docs,
        "batch": batch,
        "batches": batches,
        "median_s": {k: round(statistics.median(v), 3) for k, v in times.items()},
        "ratio": round(statistics.median(times["inside"]) / statistics.median(times["top_level"]), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=500_000)
    ap.add_argument("--batch", type=int, default=25_000)
    ap.add_argument("--batches", type=int, default=6)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-nested-") as tmp:
        result = run(args.docs, args.batch, args.batches, Path(tmp))
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.fromisoformat(result["date"]).strftime("%Y-%m-%dT%H%M%SZ")
    path = RESULTS / f"nested-updates-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    m = result["median_s"]
    print(
        f"{result['batches']} batches of {result['batch']:,} updates into {result['docs']:,} documents: "
        f"median {m['top_level']} s a batch top-level, {m['inside']} s inside a field "
        f"({result['ratio']}x); written to {path}"
    )


if __name__ == "__main__":
    main()
