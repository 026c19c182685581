"""Results: the JSON record, the Markdown table (printed and kept as bench/RESULTS.md) and the chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dataflow.runtime.settings import DEFAULT_BATCH_ROWS

MIB = 1024 * 1024


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and met / not met (None: not measured)."""
    by = {v["name"]: v for v in results["variants"]}
    base = by.get("baseline", {}).get("events_per_s") if by.get("baseline", {}).get("ok") else None
    out = []

    def ratio(name: str, need: float, label: str) -> None:
        v = by.get(name)
        r = v["events_per_s"] / base if v and v.get("ok") and base else None
        out.append(
            {
                "target": label,
                "value": None if r is None else f"{r:.2f}x baseline",
                "met": None if r is None else r >= need,
            }
        )

    ratio("pipeline-append", 0.8, "pipeline append events/s ≥ 0.8x baseline")
    ratio("pipeline-merge", 0.5, "pipeline merge events/s ≥ 0.5x baseline")
    lat = results.get("latency") or {}
    limit = results["config"]["batch_max_seconds"] + 2
    p99 = lat.get("p99_s")
    out.append(
        {
            "target": f"p99 latency ≤ CDC_BATCH_MAX_SECONDS + 2 s = {limit:g} s",
            "value": None if p99 is None else f"{p99:.2f} s",
            "met": None if p99 is None else p99 <= limit,
        }
    )
    rss = [v["peak_rss_mib"] for v in results["variants"] if v["name"].startswith("pipeline") and v.get("ok")]
    if lat.get("pipeline"):
        rss.append(lat["pipeline"]["peak_rss_mib"])
    peak = max(rss) if rss else None
    out.append(
        {
            "target": "pipeline peak RSS < 1 GiB (per process)",
            "value": None if peak is None else f"{peak:,.0f} MiB",
            "met": None if peak is None else peak < 1024,
        }
    )
    return out


def pipeline_rows(config: dict[str, Any]) -> str:
    """The pipeline's batch size as the run set it (older records always set one)."""
    rows = config.get("pipeline_batch_rows", config["batch_rows"])
    if rows is None:
        modes = ", ".join(f"{m} {n}" for m, n in DEFAULT_BATCH_ROWS.items() if m != "both")
        return f"CDC_BATCH_MAX_ROWS at its defaults ({modes})"
    return f"CDC_BATCH_MAX_ROWS={rows}"


KEPT = "## Measured decisions"
TABLE_SIZE = "## Table size"  # written by `python -m bench.table_size`, just above `KEPT`
MAINTENANCE = "## Table maintenance"  # written by `python -m bench.maintenance`, just above `KEPT`


def kept_section(path: Path) -> str:
    """The part of RESULTS.md this run keeps: from `TABLE_SIZE`, `MAINTENANCE` or `KEPT` on.

    `KEPT` is kept by hand: the figures behind the code's defaults. `TABLE_SIZE`
    and `MAINTENANCE` are other benchmarks'. A run rewrites the tables above them
    and keeps them as they are.
    """
    text = path.read_text() if path.exists() else ""
    found = [at for at in (text.find(s + "\n") for s in (TABLE_SIZE, MAINTENANCE, KEPT)) if at >= 0]
    return "" if not found else "\n" + text[min(found) :].rstrip() + "\n"


def markdown(results: dict[str, Any]) -> str:
    m, c, d = results["machine"], results["config"], results["data"]
    lines = [
        "# Benchmark results",
        "",
        f"Latest run of `python -m bench` ({results['date']}, commit `{results.get('commit') or '?'}`).",
        "Rewritten by every run; the JSON record and chart of each run are kept in `bench/results/`.",
        "",
        f"- Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_gib']:.0f} GiB memory, "
        f"Python {m['python']}, {m['kernel']}. Kafka, MinIO, the benchmark and the measured "
        "process all share these CPUs; load average (1 min) "
        f"{m.get('load_avg_at_start', ['?'])[0]} at the start, {m.get('load_avg_at_end', ['?'])[0]} at the end "
        "(well above 0 means something else competed for the CPUs).",
        f"- Packages: {', '.join(f'{k} {v}' for k, v in m['packages'].items())}",
        f"- Data: {d['events']:,} change events ({d['tombstones']:,} delete tombstones besides), "
        f"{d['value_bytes'] / MIB:,.1f} MiB of message values ({d['value_bytes'] / max(1, d['events']):,.0f} B "
        f"average), {len(d['per_topic'])} collections × {c['partitions']} partitions; ops: "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(d["ops"].items()))
        + f". Produced in {d['produce_seconds']:.1f} s.",
        f"- Pipeline: `python -m dataflow`, recovery on, {pipeline_rows(c)}, "
        f"CDC_BATCH_MAX_SECONDS={c['batch_max_seconds']:g}; baseline writes per {c['batch_rows']:,} "
        "events per collection.",
        "- Wall time is the process's whole life, start-up included (a few seconds); with a small "
        "`--events` that start-up dominates the rates. CPU is user+sys of the process(es); RSS is the "
        "peak of the largest process.",
        "",
        "| variant | events/s | MB/s | vs baseline | wall s | CPU s | CPU/wall | peak RSS MiB "
        "| data files | data MiB | log files | rows | ok |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    base = next((v for v in results["variants"] if v["name"] == "baseline" and v.get("ok")), None)
    for v in results["variants"]:
        vs = v["events_per_s"] / base["events_per_s"] if base and v.get("ok") else None
        rows = _fmt(v.get("rows"))
        if v.get("expected_rows") is not None and v.get("rows") != v.get("expected_rows"):
            rows += f" (expected {v['expected_rows']:,})"
        lines.append(
            f"| {v['name']} | {_fmt(v['events_per_s'], 0)} | {_fmt(v['mb_per_s'])} | "
            f"{'–' if vs is None else f'{vs:.2f}x'} | {_fmt(v['wall_s'])} | {_fmt(v['cpu_s'])} | "
            f"{_fmt(v['cpu_s'] / v['wall_s'] if v['wall_s'] else None, 2)} | {_fmt(v['peak_rss_mib'], 0)} | "
            f"{_fmt(v.get('data_files'))} | {_fmt(v['data_bytes'] / MIB if 'data_bytes' in v else None)} | "
            f"{_fmt(v.get('log_files'))} | {rows} | {'yes' if v.get('ok') else 'NO: ' + v.get('error', '')} |"
        )
    lat = results.get("latency")
    lines += ["", "## End-to-end latency", ""]
    if not lat:
        lines.append(f"Not measured ({results.get('latency_skipped') or 'skipped'}).")
    else:
        lines += [
            f"Tail mode (append tables), {lat.get('achieved_rate') or 0:,.0f} events/s for "
            f"{lat.get('produce_seconds') or 0:.0f} s (target rate {lat['rate']:,.0f} = 50% of pipeline append); "
            f"{lat['measured']:,} of {lat.get('rows_expected') or 0:,} events measured (partial updates "
            "and deletes carry no stamped document). Visible = first seen by a poller that refreshes "
            "each table every 200 ms.",
            "",
            "| p50 s | p90 s | p99 s | max s | mean s | pipeline CPU s | pipeline peak RSS MiB |",
            "|--:|--:|--:|--:|--:|--:|--:|",
            f"| {_fmt(lat['p50_s'], 2)} | {_fmt(lat['p90_s'], 2)} | {_fmt(lat['p99_s'], 2)} | "
            f"{_fmt(lat['max_s'], 2)} | {_fmt(lat['mean_s'], 2)} | {_fmt(lat['pipeline']['cpu_s'])} | "
            f"{_fmt(lat['pipeline']['peak_rss_mib'], 0)} |",
        ]
    lines += ["", "## Targets", "", "| target | measured | |", "|---|--:|---|"]
    for t in results["targets"]:
        met = "not measured" if t["met"] is None else ("met" if t["met"] else "**not met**")
        lines.append(f"| {t['target']} | {_fmt(t['value'])} | {met} |")
    if results.get("chart"):
        lines += ["", f"Chart: `{results['chart']}`"]
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any], latencies: list[float], path: Path) -> bool:
    """Bar chart of events/s per variant; latency histogram and CDF beside it when measured."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    variants = [v for v in results["variants"] if v.get("ok")]
    ncols = 2 if latencies else 1
    fig, axes = plt.subplots(1, ncols, figsize=(7 * ncols, 4.8), squeeze=False)
    ax = axes[0][0]
    names = [v["name"] for v in variants]
    rates = [v["events_per_s"] for v in variants]
    colors = ["#9e9e9e" if n == "floor" else "#5b8def" if n == "baseline" else "#e8833a" for n in names]
    bars = ax.bar(range(len(names)), rates, color=colors)
    ax.bar_label(bars, labels=[f"{r:,.0f}" for r in rates], fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("events/s")
    ax.set_title(f"Throughput, {results['data']['events']:,} events ({results['machine']['nproc']} CPUs)")
    base = next((v["events_per_s"] for v in variants if v["name"] == "baseline"), None)
    if base:
        ax.axhline(0.8 * base, color="#5b8def", ls="--", lw=1, label="0.8x baseline (append target)")
        ax.axhline(0.5 * base, color="#5b8def", ls=":", lw=1, label="0.5x baseline (merge target)")
        ax.legend(fontsize=7)
    if latencies:
        lat = results["latency"]
        ax = axes[0][1]
        ax.hist(latencies, bins=60, range=(min(0.0, latencies[0]), latencies[-1]), color="#e8833a", alpha=0.7)
        ax.set_xlabel("produce → visible in Delta (s)")
        ax.set_ylabel("events")
        limit = results["config"]["batch_max_seconds"] + 2
        ax.axvline(limit, color="red", ls="--", lw=1, label=f"p99 target {limit:g} s")
        for q, style in (("p50_s", ":"), ("p99_s", "-.")):
            if lat.get(q) is not None:
                ax.axvline(lat[q], color="black", ls=style, lw=1, label=f"{q[:-2]} {lat[q]:.2f} s")
        cdf = ax.twinx()
        n = len(latencies)
        cdf.plot(latencies, [(i + 1) / n for i in range(n)], color="black", lw=1)
        cdf.set_ylim(0, 1.02)
        cdf.set_ylabel("CDF")
        ax.legend(fontsize=7, loc="center right")
        ax.set_title(f"End-to-end latency at {lat.get('achieved_rate') or 0:,.0f} events/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
