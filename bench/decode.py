"""The parse step and the Arrow conversion alone, per message, on the benchmark's change events.

`python -m bench.decode [--events N] [--tree PATH ...]` times, on one set of
messages, `parse` of every message and `field_columns` of every decoded
document, for the code in each tree given (default: this one), alternating
trees round by round so that a noisy machine weighs on each alike. Each tree
runs in its own process (its own `dataflow` package and C speed-ups). Prints
microseconds per message, the best of the rounds, and the ratio to the first tree.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import pickle, sys, time
from dataflow.decode.envelopes import parse
from dataflow.lake.columns import field_columns
from dataflow.model import ChangeEvent, SourceMessage
msgs = [SourceMessage(k, v, t, p, o, (1, 0)) for k, v, t, p, o in pickle.load(open(sys.argv[1], "rb"))]
t0 = time.perf_counter()
events = [parse(m) for m in msgs]
t1 = time.perf_counter()
docs = [e.doc for e in events if type(e) is ChangeEvent and e.doc is not None]
for i in range(0, len(docs), 10_000):
    field_columns(docs[i : i + 10_000])
t2 = time.perf_counter()
print((t1 - t0) / len(msgs) * 1e6, (t2 - t1) / len(msgs) * 1e6)
"""


def messages(n: int, path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from bench.data import BenchGenerator

    out = []
    for i, m in enumerate(BenchGenerator(seed=11).messages(n)):
        if m.value is not None:
            out.append((m.key, m.value, m.topic, 0, i))
    path.write_bytes(pickle.dumps(out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tree", action="append", type=Path, help="a checkout to time (repeatable)")
    args = parser.parse_args(argv)
    trees = args.tree or [ROOT]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "messages.pickle"
        messages(args.events, data)
        best: dict[Path, list[float]] = {t: [float("inf"), float("inf")] for t in trees}
        for _ in range(args.rounds):
            for tree in trees:
                env = {**os.environ, "PYTHONPATH": str(tree)}
                out = subprocess.run(
                    [sys.executable, "-c", _CHILD, str(data)],
                    env=env,
                    cwd=tree,
                    capture_output=True,
                    text=True,
                )
                if out.returncode:
                    print(out.stderr, file=sys.stderr)
                    return 1
                parse_us, arrow_us = map(float, out.stdout.split())
                best[tree] = [min(best[tree][0], parse_us), min(best[tree][1], arrow_us)]
                time.sleep(0.5)
    base = best[trees[0]]
    rows = []
    for tree in trees:
        p, a = best[tree]
        rows.append({"tree": str(tree), "parse_us": round(p, 2), "field_columns_us": round(a, 2),
                     "parse_ratio": round(p / base[0], 3), "field_columns_ratio": round(a / base[1], 3)})  # fmt: skip
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
