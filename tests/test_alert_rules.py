"""The monitoring contract: alert rules, their unit tests, the dashboard and the runbook.

- promtool (Debian's `prometheus` package; `.ci/install-promtool`) checks the rule file and
  the Prometheus config, and runs the rules' unit tests (`alerts_test.yml`).
- Every alert has a unit test where it fires and one where it does not.
- Every metric name in the alerts and the dashboard is one `dataflow/runtime/metrics.py` exports;
  every metric name starts with `cdc_`, and the docs use no old (unprefixed) name.
- Every alert's runbook_url points at a heading of `docs/runbook.md` named after the alert.

The YAML files are read with PyYAML (the `dev` extra); its reading of alerts.yml is
checked against promtool's rule count. The promtool tests are marked `tools`: they fail,
never skip, when promtool is missing; `pytest -m "not tools"` leaves them out.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.harness import StrictLoader

ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = ROOT / "monitoring" / "prometheus"
ALERTS = PROM_DIR / "alerts.yml"
ALERTS_TEST = PROM_DIR / "alerts_test.yml"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
DASHBOARD = ROOT / "monitoring" / "grafana" / "cdc-pipeline.json"
RUNBOOK = ROOT / "docs" / "runbook.md"
METRICS = ROOT / "dataflow" / "runtime" / "metrics.py"

# Series Prometheus makes itself, not the pipeline.
PROMETHEUS_SERIES = {"up"}
# Metrics deleted because they recorded the same value as another one: no document,
# alert or dashboard may name them again.
REMOVED = {
    "checkpoint_duration_seconds",  # = cdc_delta_commit_duration_seconds, summed over mode
    "dlq_write_failures_total",  # = cdc_dlq_fallback_writes_total{cause="delivery_failed"}
}
SEVERITIES = {"warning", "critical"}


# ---------------------------------------------------------------- YAML


def load_yaml(path: Path) -> object:
    return yaml.load(path.read_text(encoding="utf-8"), Loader=StrictLoader)


def test_yaml_loader_refuses_duplicate_keys():
    assert yaml.load("a: 1\nb: {c: 2}\n", Loader=StrictLoader) == {"a": 1, "b": {"c": 2}}
    for bad in ("a: 1\na: 2\n", "a:\n  b: 1\n  b: 2\n"):
        with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key"):
            yaml.load(bad, Loader=StrictLoader)


# ---------------------------------------------------------------- the files


def alert_rules() -> list[dict]:
    doc = load_yaml(ALERTS)
    groups = doc["groups"]
    assert [g["name"] for g in groups] == ["cdc-pipeline"]
    rules = [r for g in groups for r in g["rules"]]
    assert all("alert" in r for r in rules), "alerts.yml should hold alerting rules only"
    return rules


def rule_tests() -> list[dict]:
    """Every alert_rule_test entry of alerts_test.yml, with its test group's name."""
    doc = load_yaml(ALERTS_TEST)
    assert doc["rule_files"] == ["alerts.yml"]
    out = []
    for group in doc["tests"]:
        for case in group.get("alert_rule_test") or []:
            out.append({**case, "group": group.get("name", "?")})
    return out


def metric_definitions() -> list[tuple[str, str]]:
    """(kind, name) of every metric dataflow/runtime/metrics.py defines."""
    found = re.findall(r"\b(Counter|Gauge|Histogram)\(\s*\"([a-zA-Z_:][a-zA-Z0-9_:]*)\"", METRICS.read_text())
    assert len(found) >= 20, f"parsed only {found} from {METRICS}"
    return found


def contract_metrics() -> set[str]:
    """Series names dataflow/runtime/metrics.py exports: histograms as _bucket/_sum/_count."""
    names = set()
    for kind, name in metric_definitions():
        assert name not in REMOVED, f"{name} was removed as a duplicate"
        if kind == "Histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
    return names


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
PROMQL_WORDS |= {"and", "or", "unless", "offset", "bool", "atan2", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords,
    label names, strings, durations or Grafana variables."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    e = re.sub(r"\$\{?\w+(?::\w+)?\}?", "", e)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", e):
        if e[m.end() :].lstrip().startswith("(") or m.group().lower() in PROMQL_WORDS:
            continue
        names.add(m.group())
    return names


def test_promql_metric_names():
    expr = (
        'histogram_quantile(0.99, sum by (le, table) (rate(cdc_batch_rows_bucket{job=~"$job"}[$__rate_interval])))'
        " / on(table) group_left() (a_total offset 10m > 1e-9) unless sum(up) without (instance)"
    )
    assert promql_metric_names(expr) == {"cdc_batch_rows_bucket", "a_total", "up"}


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = []

    def walk(panels):
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))

    walk(dash["panels"])
    return exprs


def dashboard_variable_metrics() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    names = set()
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"\s*label_values\(\s*(.*?),\s*\w+\s*\)\s*", query)
        assert m, (
            f"dashboard variable {var['name']}: expected label_values(<selector>, <label>), got {query!r}"
        )
        names |= promql_metric_names(m.group(1))
    return names


# ---------------------------------------------------------------- promtool


def promtool_path() -> str:
    """promtool, or a failed test (never a skipped one) saying how to install it."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not on PATH: install Debian's prometheus package "
            "(`apt-get install --no-install-recommends prometheus`, or run .ci/install-promtool)",
            pytrace=False,
        )
    return path


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (
        f"`{' '.join(args)}` (in {cwd}) exited {proc.returncode}\n"
        f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )
    return proc


@pytest.mark.tools
def test_promtool_check_rules():
    promtool = promtool_path()
    proc = run([promtool, "check", "rules", str(ALERTS.relative_to(ROOT))], cwd=ROOT)
    m = re.search(r"SUCCESS: (\d+) rules found", proc.stdout)
    assert m, proc.stdout
    # The YAML loader of these tests sees the rules promtool sees.
    assert int(m.group(1)) == len(alert_rules()), proc.stdout


@pytest.mark.tools
def test_promtool_check_config():
    promtool = promtool_path()
    # rule_files resolve relative to the config file; run from its folder anyway.
    run([promtool, "check", "config", PROM_CONFIG.name], cwd=PROM_DIR)


@pytest.mark.tools
def test_promtool_test_rules():
    promtool = promtool_path()
    run([promtool, "test", "rules", ALERTS_TEST.name], cwd=PROM_DIR)


# ---------------------------------------------------------------- structure


def test_every_alert_is_labelled_and_annotated():
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), f"duplicate alert names: {names}"
    required = {
        "CDCDeadLetterRateHigh",
        "CDCCommitsRetrying",
        "CDCCheckpointLagHigh",
        "CDCCircuitBreakerOpen",
        "CDCCorruptionRateHigh",
        "CDCMirrorBehind",
        "CDCMirrorStuck",
    }
    assert required <= set(names)
    for r in rules:
        assert (r.get("labels") or {}).get("severity") in SEVERITIES, r["alert"]
        annotations = r.get("annotations") or {}
        for key in ("summary", "description", "runbook_url"):
            assert annotations.get(key), f"{r['alert']} has no annotations.{key}"


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    cases = rule_tests()
    # The reader saw every test case in the file.
    assert len(cases) == len(re.findall(r"^\s*(?:- )?alertname:", ALERTS_TEST.read_text(), re.M))
    missing = []
    for name in (r["alert"] for r in alert_rules()):
        mine = [c for c in cases if c["alertname"] == name]
        if not any(c.get("exp_alerts") for c in mine):
            missing.append(f"{name}: no case where it fires (non-empty exp_alerts)")
        if not any(c.get("exp_alerts") == [] for c in mine):
            missing.append(f"{name}: no case where it does not fire (exp_alerts: [])")
    assert not missing, "\n".join(missing)
    known = {r["alert"] for r in alert_rules()}
    assert {c["alertname"] for c in cases} <= known, "alerts_test.yml tests an alert alerts.yml lacks"


def test_firing_cases_expect_the_rule_annotations():
    """Every firing case spells out all three annotations, so a changed text is a failed test."""
    for case in rule_tests():
        for alert in case.get("exp_alerts") or []:
            got = set((alert.get("exp_annotations") or {}).keys())
            assert got == {"summary", "description", "runbook_url"}, (case["group"], case["alertname"])


def test_metric_names_are_in_the_contract():
    contract = contract_metrics() | PROMETHEUS_SERIES
    used: dict[str, set[str]] = {}
    for r in alert_rules():
        names = promql_metric_names(r["expr"])
        assert names, f"no metric name found in {r['alert']}: {r['expr']}"
        used[f"alerts.yml {r['alert']}"] = names
    exprs = dashboard_exprs()
    assert len(exprs) >= 10, "the dashboard lost its panels?"
    for expr in exprs:
        names = promql_metric_names(expr)
        assert names, f"no metric name found in dashboard query {expr}"
        used[f"dashboard: {expr}"] = names
    used["dashboard variables"] = dashboard_variable_metrics()
    unknown = {where: sorted(n - contract) for where, n in used.items() if n - contract}
    assert not unknown, (
        "metric names not exported by dataflow/runtime/metrics.py (or pending removal):\n"
        + "\n".join(f"  {where}: {names}" for where, names in unknown.items())
    )


def test_metric_names_have_one_prefix():
    names = [name for _, name in metric_definitions()]
    assert len(names) == len(set(names)), f"a metric name is defined twice: {sorted(names)}"
    unprefixed = sorted(n for n in names if not n.startswith("cdc_") and n not in REMOVED)
    assert not unprefixed, f"metric names without the cdc_ prefix: {unprefixed}"


def test_docs_name_metrics_by_their_current_names():
    """No unprefixed (old) name of a metric, and no metric pending removal, in the files
    people read: the runbook, the README, the rules and the dashboard."""
    prefixed = [name for _, name in metric_definitions() if name.startswith("cdc_")]
    stale = {name.removeprefix("cdc_") for name in prefixed} | REMOVED
    problems = []
    for path in (RUNBOOK, ROOT / "README.md", ALERTS, ALERTS_TEST, DASHBOARD):
        text = path.read_text(encoding="utf-8")
        for name in sorted(stale):
            if re.search(rf"(?<!\w){name}(?!\w)|(?<!\w){name}_(?:bucket|sum|count)\b", text):
                problems.append(f"{path.relative_to(ROOT)}: {name}")
    assert not problems, "old or pending-removal metric names:\n" + "\n".join(problems)


def test_dashboard_uses_the_datasource_variable():
    dash = json.loads(DASHBOARD.read_text())
    assert 36 <= dash["schemaVersion"] <= 41
    var_names = {v["name"] for v in dash["templating"]["list"]}
    assert "DS_PROMETHEUS" in var_names

    def walk(panels):
        for p in panels:
            for ds in [p.get("datasource")] + [t.get("datasource") for t in p.get("targets", [])]:
                if ds is not None:
                    assert ds == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, (p["title"], ds)
            walk(p.get("panels", []))

    walk(dash["panels"])
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"


def github_anchor(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_runbook_urls_point_at_runbook_headings():
    text = RUNBOOK.read_text()
    headings = [m.group(1).strip() for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)]
    anchors = {github_anchor(h) for h in headings}
    problems = []
    for r in alert_rules():
        name, url = r["alert"], r["annotations"]["runbook_url"]
        path, _, anchor = url.partition("#")
        if path != "docs/runbook.md":
            problems.append(f"{name}: runbook_url {url!r} is not docs/runbook.md#...")
        if anchor not in anchors:
            problems.append(f"{name}: no heading in docs/runbook.md has the anchor #{anchor}")
        if name not in headings:
            problems.append(f"{name}: docs/runbook.md has no heading `## {name}`")
        if anchor != github_anchor(name):
            problems.append(f"{name}: runbook_url anchor #{anchor} is not #{github_anchor(name)}")
    assert not problems, "\n".join(problems)
