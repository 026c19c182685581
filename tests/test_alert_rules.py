"""The monitoring contract: alert rules, their unit tests, the dashboard and the runbook.

- promtool (Debian's `prometheus` package; `.ci/install-promtool`) checks the rule file and
  the Prometheus config, and runs the rules' unit tests (`alerts_test.yml`).
- Every alert has a unit test where it fires and one where it does not.
- Every metric name in the alerts and the dashboard is one `dataflow/runtime/metrics.py` exports.
- Every alert's runbook_url points at a heading of `docs/runbook.md` named after the alert.

PyYAML is not a dependency of this project, so the YAML files are read by `MiniYaml`, a
reader for the block-style subset they are written in; it refuses anything else loudly,
and its reading of alerts.yml is checked against promtool's rule count.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = ROOT / "monitoring" / "prometheus"
ALERTS = PROM_DIR / "alerts.yml"
ALERTS_TEST = PROM_DIR / "alerts_test.yml"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
DASHBOARD = ROOT / "monitoring" / "grafana" / "cdc-pipeline.json"
RUNBOOK = ROOT / "docs" / "runbook.md"
METRICS = ROOT / "dataflow" / "metrics.py"

# Series Prometheus makes itself, not the pipeline.
PROMETHEUS_SERIES = {"up"}
SEVERITIES = {"warning", "critical"}


# ---------------------------------------------------------------- a YAML subset


class MiniYaml:
    """Block mappings and sequences, plain and quoted scalars, `|`/`>` block scalars, comments,
    and `[]`/`{}`. Scalars stay strings. Flow collections, anchors, tags, multi-line plain
    scalars and multiple documents raise ValueError."""

    KEY = re.compile(r"""^("(?:[^"\\]|\\.)*"|'(?:[^']|'')*'|[A-Za-z_][\w.\-/]*)\s*:(?:\s+(.*))?$""")

    def __init__(self, text: str, source: str) -> None:
        self.lines = text.splitlines()
        self.i = 0
        self.source = source

    @classmethod
    def load(cls, path: Path) -> object:
        return cls(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT))).parse()

    def error(self, msg: str) -> ValueError:
        return ValueError(
            f"{self.source}:{self.i + 1}: {msg} (tests/test_alert_rules.py reads a YAML subset: "
            "block style, no anchors, tags or flow collections)"
        )

    def peek(self) -> tuple[int, str] | None:
        """(indent, content) of the next line with content; skips blanks and comments."""
        while self.i < len(self.lines):
            raw = self.lines[self.i]
            content = raw.strip()
            if content and not content.startswith("#"):
                if content == "---" or content == "...":
                    raise self.error("document markers are not supported")
                indent = len(raw) - len(raw.lstrip(" "))
                if raw[indent] == "\t":
                    raise self.error("tab indentation")
                return indent, content
            self.i += 1
        return None

    def parse(self) -> object:
        first = self.peek()
        if first is None:
            return None
        node = self.node(first[0])
        if self.peek() is not None:
            raise self.error("content left over: bad indentation?")
        return node

    @staticmethod
    def is_item(content: str) -> bool:
        return content == "-" or content.startswith("- ")

    def node(self, indent: int) -> object:
        nxt = self.peek()
        assert nxt is not None
        return self.seq(indent) if self.is_item(nxt[1]) else self.mapping(indent)

    def seq(self, indent: int) -> list[object]:
        items: list[object] = []
        while (nxt := self.peek()) and nxt[0] == indent and self.is_item(nxt[1]):
            rest = nxt[1][1:].lstrip()
            if not rest:
                self.i += 1
                child = self.peek()
                items.append(self.node(child[0]) if child and child[0] > indent else None)
            elif self.KEY.match(rest):  # "- key: value" opens a mapping at the key's column
                column = indent + len(nxt[1]) - len(rest)
                self.lines[self.i] = " " * column + rest
                items.append(self.mapping(column))
            else:
                items.append(self.scalar(rest))
                self.i += 1
        if (nxt := self.peek()) and nxt[0] > indent:
            raise self.error("unexpected indentation")
        return items

    def mapping(self, indent: int) -> dict[str, object]:
        out: dict[str, object] = {}
        while (nxt := self.peek()) and nxt[0] == indent and not self.is_item(nxt[1]):
            m = self.KEY.match(nxt[1])
            if not m:
                raise self.error(f"expected `key: value`, got {nxt[1]!r}")
            key = str(self.scalar(m.group(1)))
            if key in out:
                raise self.error(f"duplicate key {key!r}")
            value = (m.group(2) or "").strip()
            self.i += 1
            if value.startswith(("|", ">")):
                out[key] = self.block_scalar(indent, value)
            elif not value or value.startswith("#"):
                child = self.peek()
                nested = child and (child[0] > indent or (child[0] == indent and self.is_item(child[1])))
                out[key] = self.node(child[0]) if nested else None
            else:
                out[key] = self.scalar(value)
        if (nxt := self.peek()) and nxt[0] > indent:
            raise self.error("unexpected indentation")
        return out

    def scalar(self, text: str) -> object:
        if text.startswith('"'):
            m = re.fullmatch(r'"((?:[^"\\]|\\.)*)"\s*(?:#.*)?', text)
            if not m:
                raise self.error(f"bad double-quoted scalar {text!r}")
            return json.loads(f'"{m.group(1)}"')
        if text.startswith("'"):
            m = re.fullmatch(r"'((?:[^']|'')*)'\s*(?:#.*)?", text)
            if not m:
                raise self.error(f"bad single-quoted scalar {text!r}")
            return m.group(1).replace("''", "'")
        plain = re.split(r"\s#", text, maxsplit=1)[0].rstrip()
        if plain == "[]":
            return []
        if plain == "{}":
            return {}
        if plain[0] in "[{&*!%@`|>" or ": " in plain:
            raise self.error(f"unsupported scalar {text!r}")
        return plain

    def block_scalar(self, indent: int, header: str) -> str:
        m = re.fullmatch(r"([|>])([-+]?)\s*(?:#.*)?", header)
        if not m:
            raise self.error(f"unsupported block scalar header {header!r}")
        style, chomp = m.groups()
        lines: list[str] = []
        block_indent = None
        while self.i < len(self.lines):
            raw = self.lines[self.i]
            if not raw.strip():
                lines.append("")
                self.i += 1
                continue
            ind = len(raw) - len(raw.lstrip(" "))
            if ind <= indent:
                break
            if block_indent is None:
                block_indent = ind
            elif ind < block_indent:
                raise self.error("block scalar line indented less than its first line")
            lines.append(raw[block_indent:])
            self.i += 1
        trailing = 0
        while lines and not lines[-1]:
            lines.pop()
            trailing += 1
        if style == "|":
            text = "\n".join(lines)
        else:  # folded: lines join with a space, a blank line is a newline
            text = ""
            for line in lines:
                text += "\n" if not line else (" " if text and not text.endswith("\n") else "") + line
        if chomp == "-" or not lines:
            return text
        return text + "\n" * (1 + trailing if chomp == "+" else 1)


def test_mini_yaml_reads_the_subset_and_refuses_the_rest():
    text = """\
# comment
a: 1
b: "x: \\"y\\""  # trailing comment
c: 'it''s'
d:
  - e: |
      line 1
      line 2
    f: >-
      folded
      text
  -
    g: []
  - plain scalar
h:
- 1
- {}
"""
    assert MiniYaml(text, "t").parse() == {
        "a": "1",
        "b": 'x: "y"',
        "c": "it's",
        "d": [{"e": "line 1\nline 2\n", "f": "folded text"}, {"g": []}, "plain scalar"],
        "h": ["1", {}],
    }
    for bad in ("a: [1, 2]\n", "a: &x 1\n", "a: 1\n  b: 2\n", "a: 1\na: 2\n", "a: b: c\n"):
        with pytest.raises(ValueError):
            MiniYaml(bad, "t").parse()


# ---------------------------------------------------------------- the files


def alert_rules() -> list[dict]:
    doc = MiniYaml.load(ALERTS)
    groups = doc["groups"]
    assert [g["name"] for g in groups] == ["cdc-pipeline"]
    rules = [r for g in groups for r in g["rules"]]
    assert all("alert" in r for r in rules), "alerts.yml should hold alerting rules only"
    return rules


def rule_tests() -> list[dict]:
    """Every alert_rule_test entry of alerts_test.yml, with its test group's name."""
    doc = MiniYaml.load(ALERTS_TEST)
    assert doc["rule_files"] == ["alerts.yml"]
    out = []
    for group in doc["tests"]:
        for case in group.get("alert_rule_test") or []:
            out.append({**case, "group": group.get("name", "?")})
    return out


def contract_metrics() -> set[str]:
    """Series names dataflow/runtime/metrics.py exports: histograms as _bucket/_sum/_count."""
    found = re.findall(r"\b(Counter|Gauge|Histogram)\(\s*\"([a-zA-Z_:][a-zA-Z0-9_:]*)\"", METRICS.read_text())
    assert len(found) >= 20, f"parsed only {found} from {METRICS}"
    names = set()
    for kind, name in found:
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


def test_promtool_check_rules():
    promtool = promtool_path()
    proc = run([promtool, "check", "rules", str(ALERTS.relative_to(ROOT))], cwd=ROOT)
    m = re.search(r"SUCCESS: (\d+) rules found", proc.stdout)
    assert m, proc.stdout
    # The YAML reader of these tests sees the rules promtool sees.
    assert int(m.group(1)) == len(alert_rules()), proc.stdout


def test_promtool_check_config():
    promtool = promtool_path()
    # rule_files resolve relative to the config file; run from its folder anyway.
    run([promtool, "check", "config", PROM_CONFIG.name], cwd=PROM_DIR)


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
        "CDCMaxRetriesExceeded",
        "CDCCheckpointLagHigh",
        "CDCCircuitBreakerOpen",
        "CDCCorruptionRateHigh",
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
    assert not unknown, "metric names not exported by dataflow/runtime/metrics.py:\n" + "\n".join(
        f"  {where}: {names}" for where, names in unknown.items()
    )


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
