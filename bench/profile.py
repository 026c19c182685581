"""`python -m bench.profile`: where the pipeline's CPU goes, sampled with py-spy.

Starts its own Kafka and MinIO (as `python -m bench` does), produces
`--events` change events, runs `python -m dataflow` over them to the end under
`py-spy record` once per table mode, and writes a summary: the top functions by
self and by cumulative samples, and the share of each stage of the flow.
py-spy sees Python frames; time spent in native code (librdkafka, Arrow,
delta-rs, Bytewax's Rust runtime) is charged to the Python function that called
into it (with `--native`, to the native frames themselves).
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from bench.data import BenchGenerator, DataStats
from bench.measure import run_processes
from bench.stack import ROOT, pipeline_commands, started
from dataflow.source.topics import create_topics
from services.generate import produce

log = logging.getLogger("bench")
BENCH = Path(__file__).resolve().parent

# Stages of the flow, by the first matching frame from the leaf up.
STAGES = [
    # bytewax.run's module frame is where Python calls into Bytewax's Rust runtime (scheduling,
    # exchange between workers, recovery snapshots): time sampled there is the runtime's own.
    ("Bytewax runtime (Rust, charged to bytewax.run)", r"^<module> \(run\.py\)$"),
    (
        "Kafka read (bytewax KafkaSource, librdkafka)",
        r"connectors/kafka|confluent_kafka|kafka_source\.py",
    ),
    ("Delta commit: write_deltalake / merge (delta-rs)", r"deltalake/"),
    ("Arrow conversion (arrow_convert, pyarrow)", r"arrow_convert\.py|pyarrow/"),
    ("Delta sink logic (delta_sink, lake_sink)", r"delta_sink\.py|lake_sink\.py|lake_offsets\.py"),
    ("Extended JSON decoding (extjson)", r"extjson\.py"),
    ("Parsing envelopes (events, parse_step, orjson)", r"events\.py|parse_step\.py"),
    ("Batching (batching)", r"batching\.py"),
    ("Metrics (prometheus_client)", r"prometheus_client|metrics\.py"),
    ("Recovery store / DLQ", r"recovery|dlq\.py"),
    ("Start-up (imports, settings, topic look-ups)", r"<module>|importlib|settings\.py|kafka_admin\.py"),
]


def _short(frame: str) -> str:
    """`func (/long/path/site-packages/pkg/mod.py)` -> `func (pkg/mod.py)`."""
    m = re.match(r"(.*) \((.*)\)$", frame)
    if not m:
        return frame
    func, path = m.groups()
    for marker in ("site-packages/", str(ROOT) + "/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{func} ({path})"


# A thread blocked on a lock or event (the sink's idle commit thread) can be sampled as busy.
WAITING = re.compile(r"^(\w+\.)?(wait|_wait_for_tstate_lock) \((.*/)?threading\.py(:\d+)?\)$")


def summarize(raw: Path, title: str, top: int = 25) -> str:
    """Self and cumulative samples per function, and per stage, from py-spy's raw (collapsed) output.

    Samples whose innermost frame waits in `threading` are left out: waiting is not CPU.
    """
    self_n: collections.Counter[str] = collections.Counter()
    cum_n: collections.Counter[str] = collections.Counter()
    stage_n: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";")]
        if WAITING.match(frames[-1]):
            continue
        total += n
        self_n[frames[-1]] += n
        for f in set(frames):
            cum_n[f] += n
        for f in reversed(frames):
            stage = next((name for name, rx in STAGES if re.search(rx, f)), None)
            if stage:
                stage_n[stage] += n
                break
        else:
            stage_n["other (Bytewax runtime, stdlib)"] += n
    if not total:
        return f"## {title}\n\nno samples\n"

    def table(counter: collections.Counter[str], heading: str) -> list[str]:
        rows = [f"### {heading}", "", f"{'samples':>8} {'%':>6}  function"]
        rows += [f"{n:>8} {100 * n / total:>5.1f}%  {f}" for f, n in counter.most_common(top)]
        return [*rows, ""]

    lines = [f"## {title}", "", f"{total} samples of busy (non-idle) threads.", ""]
    lines += table(stage_n, "By stage (the innermost frame that names one)")
    lines += table(self_n, "Self time (the sampled frame itself)")
    # The runpy / bytewax.run chain is on every stack: leave it out of the cumulative list.
    chain = [f for f, n in cum_n.items() if n >= 0.95 * total]
    for f in chain:
        del cum_n[f]
    lines += table(cum_n, "Cumulative (anywhere on the stack; the start-up chain on every stack left out)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--modes", default="append,merge", help="table modes to profile, comma list")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples a second")
    parser.add_argument("--native", action="store_true", help="sample native (Rust, C) frames too")
    parser.add_argument("--out", type=Path, default=BENCH / "profile-before.txt")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bench: %(message)s", datefmt="%H:%M:%S")
    pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if pyspy is None:
        sys.exit("py-spy is not installed: pip install py-spy")
    tmp = Path(tempfile.mkdtemp(prefix="cdc-profile-"))
    sections = []
    try:
        with started(tmp) as stack:
            gen = BenchGenerator(prefix="bench", doc_bytes=1024)
            create_topics(stack.brokers, [*gen.topics, "bench.dlq"], 4)
            data = DataStats()
            produce(stack.brokers, data.count(gen.messages(args.events)))
            topics = sorted(data.per_topic)
            for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
                raw = tmp / f"{mode}.raw"
                spy = [pyspy, "record", "-f", "raw", "-o", str(raw), "-r", str(args.rate), "--nolineno"]
                if args.native:
                    spy.append("--native")
                commands = pipeline_commands(
                    stack, f"profile-{mode}", topics, mode=mode, batch_rows=10_000, prefix=[*spy, "--"]
                )
                log.info("profiling %s mode over %s events", mode, f"{data.events:,}")
                run = run_processes(commands, log_dir=tmp / f"profile-{mode}", cwd=ROOT, timeout=1800)
                if not run.ok or not raw.exists():
                    sections.append(f"## {mode} mode\n\nfailed (exit {[p.rc for p in run.procs]})\n")
                    continue
                sections.append(
                    summarize(
                        raw,
                        f"{mode} mode: {data.events:,} events, {run.wall_s:.1f} s wall, "
                        f"{data.events / run.wall_s:,.0f} events/s under the profiler",
                    )
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    header = (
        "# Pipeline profile (py-spy)\n\n"
        f"`python -m bench.profile --events {args.events}`: one `python -m dataflow` process "
        f"(recovery on, CDC_STOP_AT_END=1, batches of 10,000) sampled at {args.rate} Hz"
        f"{' with native frames' if args.native else ''}. Samples count busy threads only, start-up included. "
        f"Load average at the end: {load} on {os.cpu_count()} CPUs (rates are only comparable on a quiet machine; "
        "the shares are what this file is for).\n\n"
    )
    args.out.write_text(header + "\n".join(sections))
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
