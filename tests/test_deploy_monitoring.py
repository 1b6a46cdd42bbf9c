"""The monitoring files under deploy/ against the metrics the code really exports.

Every PromQL expression of the Grafana dashboard and of the Prometheus alerting rules may
only use metric names (and label names) that agent/metrics.py or controller/metrics.py
register, so a renamed metric breaks this test instead of silently emptying a panel or
disarming an alert. When `promtool` is on PATH (Debian package `prometheus`) the
Prometheus config and rules are also checked, and the alerts are run on synthetic series.

No network, no services: the files are read and, without PyYAML in the project's
environment, the few YAML facts needed are taken with regular expressions (promtool
checks the YAML itself).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

import agent.metrics as agent_metrics
from controller.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "orkestr-addons.json"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
CREDENTIALS_FILE = "/etc/prometheus/orkestr_metrics_token"
AGENT_CREDENTIALS_FILE = "/etc/prometheus/orkestr_agent_metrics_token"

# Labels Prometheus adds to every scraped series, and the scrape health metric.
TARGET_LABELS = frozenset({"instance", "job"})
SYNTHETIC = {"up": TARGET_LABELS}
# Declared in agent/metrics.py but never set by the agent: nothing may rely on it.
UNUSED = frozenset({"orkestr_agent_addons"})
GRAFANA_BUILTINS = frozenset({"__rate_interval", "__interval", "__range", "__range_s"})
AGGREGATIONS = frozenset(
    {"sum", "min", "max", "avg", "count", "stddev", "stdvar", "group", "topk", "bottomk"}
    | {"quantile", "count_values"}
)
KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
    | {"and", "or", "unless", "offset", "inf", "nan"}
)


# --- what the code exports -------------------------------------------------------------
def _exposed_names(name: str, kind: str) -> set[str]:
    """Sample names of one metric family as served (the *_created series are not used)."""
    if kind == "counter":
        return {f"{name}_total"}
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    if kind == "summary":
        return {name, f"{name}_sum", f"{name}_count"}
    if kind == "info":
        return {f"{name}_info"}
    return {name}


def _registry_families(registry: CollectorRegistry) -> dict[str, set[str]]:
    """Family name -> served sample names, for everything the registry collects."""
    families: dict[str, set[str]] = {}
    for family in registry.collect():
        names = _exposed_names(family.name, family.type)
        names |= {s.name for s in family.samples if not s.name.endswith("_created")}
        families[family.name] = names
    return families


def _wrappers() -> Iterator[MetricWrapperBase]:
    yield from (v for v in vars(agent_metrics).values() if isinstance(v, MetricWrapperBase))
    yield from (v for v in vars(Metrics()).values() if isinstance(v, MetricWrapperBase))


@functools.cache
def catalogue() -> tuple[dict[str, frozenset[str]], dict[str, set[str]]]:
    """(served sample name -> its label names, orkestr family -> its sample names).

    The agent serves prometheus_client's default REGISTRY; a controller process serves the
    registry of its one `Metrics`.
    """
    families = _registry_families(REGISTRY) | _registry_families(Metrics().registry)
    labels: dict[str, frozenset[str]] = {}
    for wrapper in _wrappers():
        (family,) = wrapper.describe()
        # The label names of a metric without children are only on the wrapper itself.
        names = frozenset(wrapper._labelnames) | TARGET_LABELS
        for sample in families[family.name]:
            labels[sample] = names | ({"le"} if sample.endswith("_bucket") else set())
    for samples in families.values():
        for sample in samples:
            labels.setdefault(sample, TARGET_LABELS | {"le", "quantile"})
    for sample, names in SYNTHETIC.items():
        labels[sample] = frozenset(names)
    orkestr = {
        name: samples
        for name, samples in families.items()
        if name.startswith("orkestr_") and name not in UNUSED
    }
    return labels, orkestr


def test_catalogue_sees_both_components() -> None:
    labels, orkestr = catalogue()
    assert "orkestr_agent_reconcile_total" in labels
    assert "orkestr_agent_wake_duration_seconds_bucket" in labels
    assert "orkestr_controller_http_requests_total" in labels
    assert labels["orkestr_agent_wake_duration_seconds_bucket"] >= {"kind", "stage", "le"}
    assert labels["orkestr_controller_http_requests_total"] >= {"method", "route", "status"}
    assert "orkestr_agent_addons" not in orkestr
    assert len(orkestr) >= 18


# --- a small PromQL reader -------------------------------------------------------------
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
MATCHERS = re.compile(r"\{([^{}]*)\}")
MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
RANGE = re.compile(r"\[[^\]]*\]")
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
TOKEN = re.compile(
    r"(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
    r"|(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)(?P<call>\s*\()?"
)
VARIABLE = re.compile(r"\$\{?(\w+)")
JOB = re.compile(r'\bjob\s*=~?\s*"([^"]*)"')


class Query:
    """The metric names, label names and Grafana variables one expression uses."""

    def __init__(self, expr: str) -> None:
        self.expr = expr
        self.variables = set(VARIABLE.findall(expr))
        self.jobs = set(JOB.findall(expr))
        text = STRING.sub('""', expr)
        self.labels: set[str] = set()
        for body in MATCHERS.findall(text):
            self.labels.update(MATCHER_LABEL.findall(body))
        text = MATCHERS.sub(" ", text)
        text = RANGE.sub(" ", text)
        self.grouping: set[str] = set()
        for _clause, names in GROUPING.findall(text):
            found = {n.strip() for n in names.split(",") if n.strip()}
            self.grouping |= found
            self.labels |= found
        text = GROUPING.sub(" ", text)
        self.metrics: set[str] = set()
        self.calls: set[str] = set()
        for token in TOKEN.finditer(text):
            ident = token["ident"]
            if ident is None:
                continue
            if token["call"]:
                self.calls.add(ident)
            elif ident.lower() not in KEYWORDS:
                self.metrics.add(ident)

    def output_labels(self, labels: dict[str, frozenset[str]]) -> set[str]:
        """Roughly, the labels of the result: the grouping if aggregated, else all."""
        if self.grouping:
            return self.grouping
        if self.calls & AGGREGATIONS:
            return set()
        return set().union(*(labels.get(m, frozenset()) for m in self.metrics))

    def problems(self) -> list[str]:
        labels, _ = catalogue()
        out: list[str] = []
        if not self.metrics:
            out.append("uses no metric")
        unknown = sorted(self.metrics - set(labels))
        if unknown:
            out.append(f"unknown metrics {unknown}")
        if self.metrics & UNUSED:
            out.append(f"relies on metrics the code never sets: {sorted(self.metrics & UNUSED)}")
        allowed = set().union(*(labels.get(m, frozenset()) for m in self.metrics))
        if self.labels - allowed:
            out.append(f"label names {sorted(self.labels - allowed)} not on {sorted(self.metrics)}")
        return out


def test_query_reader() -> None:
    q = Query(
        "histogram_quantile(0.99, sum by (kind, le) (rate(orkestr_agent_wake_duration_seconds"
        '_bucket{instance=~"$instance", stage!="x}"}[$__rate_interval]))) > 2e0 unless on() '
        "vector(1)"
    )
    assert q.metrics == {"orkestr_agent_wake_duration_seconds_bucket"}
    assert q.labels == {"kind", "le", "instance", "stage"}
    assert q.variables == {"instance", "__rate_interval"}
    assert q.output_labels(catalogue()[0]) == {"kind", "le"}
    assert q.problems() == []
    assert Query("orkestr_agent_reconcile_totl").problems() == [
        "unknown metrics ['orkestr_agent_reconcile_totl']"
    ]
    assert (
        "label names ['phase'] not on"
        in Query("sum by (phase) (orkestr_agent_addon_ready)").problems()[0]
    )


# --- prometheus.yml --------------------------------------------------------------------
def job_names() -> set[str]:
    return set(re.findall(r"^\s*-?\s*job_name:\s*[\"']?([\w.-]+)", CONFIG.read_text(), re.M))


def test_prometheus_config_shape() -> None:
    text = CONFIG.read_text()
    assert job_names() == {"orkestr-controller", "orkestr-agent"}
    assert re.search(r"^\s+scrape_interval:\s*15s\s*$", text, re.M)
    assert re.search(r"^rule_files:\s*\n\s+-\s*alerts\.yml\s*$", text, re.M)
    assert f"credentials_file: {CREDENTIALS_FILE}" in text
    assert f"credentials_file: {AGENT_CREDENTIALS_FILE}" in text
    assert "127.0.0.1:9464" in text
    assert "127.0.0.1:8080" in text
    assert "file_sd_configs" in text  # the comment on adding hosts


# --- alerts.yml ------------------------------------------------------------------------
BLOCK_SCALAR = frozenset({"|", "|-", "|+", ">", ">-", ">+"})
RULE_START = re.compile(r"^\s*- (alert|record):\s*(\S+)\s*$")
RULE_KEY = re.compile(r"^(\s*)(expr|for|severity|summary|description):\s*(.*?)\s*$")


def alert_rules() -> list[dict[str, str]]:
    """The rules of alerts.yml as {alert, expr, for, severity, summary, description}."""
    lines = ALERTS.read_text().splitlines()
    rules: list[dict[str, str]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.lstrip().startswith("#"):
            continue
        if start := RULE_START.match(line):
            rules.append({start[1]: start[2]})
            continue
        key = RULE_KEY.match(line)
        if key is None or not rules:
            continue
        indent, name, value = len(key[1]), key[2], key[3]
        if value in BLOCK_SCALAR:
            block: list[str] = []
            while i < len(lines) and (
                not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
            ):
                block.append(lines[i].strip())
                i += 1
            value = " ".join(b for b in block if b)
        elif len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        rules[-1][name] = value
    return rules


def test_alert_rules_are_complete() -> None:
    rules = alert_rules()
    text = ALERTS.read_text()
    assert len(rules) == len(re.findall(r"^\s*expr:", text, re.M)) >= 8
    names = [r.get("alert") for r in rules]
    assert None not in names, "recording rules are not expected in alerts.yml"
    assert len(set(names)) == len(names), "alert names must be unique"
    for rule in rules:
        for key in ("expr", "for", "severity", "summary", "description"):
            assert rule.get(key), f"{rule['alert']} has no {key}"
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule
        assert rule["severity"] in {"critical", "warning", "info"}, rule


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_expression_uses_real_metrics(rule: dict[str, str]) -> None:
    query = Query(rule["expr"])
    assert query.problems() == [], rule["expr"]
    assert query.jobs <= job_names(), "job matcher not in prometheus.yml"
    assert not query.variables - {"value", "labels"}
    used = set(re.findall(r"\$labels\.(\w+)", rule["summary"] + rule["description"]))
    missing = used - query.output_labels(catalogue()[0])
    assert not missing, f"annotations use labels the expression does not yield: {missing}"


def test_alerts_cover_the_asked_conditions() -> None:
    used: set[str] = set()
    for rule in alert_rules():
        used |= Query(rule["expr"]).metrics
    assert used >= {
        "up",
        "orkestr_agent_mqtt_connected",
        "orkestr_controller_mqtt_connected",
        "orkestr_agent_reconcile_total",
        "orkestr_controller_host_applied_generation",
        "orkestr_controller_host_desired_generation",
        "orkestr_agent_desired_rejected_total",
        "orkestr_agent_wake_duration_seconds_bucket",
    }
    # Readiness is 0 while an add-on sleeps: only its join with the sleep state is an alert.
    for rule in alert_rules():
        if "orkestr_agent_addon_ready" in Query(rule["expr"]).metrics:
            assert "orkestr_agent_addon_sleep_state" in Query(rule["expr"]).metrics, rule["alert"]


# --- counters alerted on exist from the start --------------------------------------------
EQUALITY = re.compile(r'([A-Za-z_]\w*)\s*(=~|=)\s*"([^"]*)"')


def started_samples() -> dict[str, list[dict[str, str]]]:
    """Label sets of every sample a freshly started agent and controller serve."""
    from agent import desired
    from agent import plan as p

    registry = CollectorRegistry()
    agent_metrics.start_at_zero(p.ACTION_KINDS, desired.REJECTION_REASONS)
    controller = Metrics()
    # What controller/app.py does with its routes; one route stands for them all here.
    controller.start_routes([("GET", "/v1/projects")], ("500", "503"))
    samples: dict[str, list[dict[str, str]]] = {}
    for source in (REGISTRY, controller.registry, registry):
        for family in source.collect():
            for sample in family.samples:
                samples.setdefault(sample.name, []).append(dict(sample.labels))
    return samples


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_counters_an_alert_uses_start_at_zero(rule: dict[str, str]) -> None:
    """increase() and rate() miss a series' first sample: it must exist before any event."""
    samples = started_samples()
    for selector in re.finditer(r"(orkestr_\w+_total)\s*(\{[^}]*\})?", rule["expr"]):
        name, matchers = selector[1], selector[2] or ""
        series = samples.get(name, [])
        assert series, f"{rule['alert']}: {name} has no series at start"
        for label, op, value in EQUALITY.findall(matchers):
            if label in TARGET_LABELS:
                continue
            wanted = value.split("|") if op == "=~" else [value]
            for want in wanted:
                if want.endswith(".."):  # a status class such as 5..
                    found = any(s.get(label, "").startswith(want[0]) for s in series)
                else:
                    found = any(s.get(label) == want for s in series)
                assert found, f"{rule['alert']}: no {name}{{{label}={want!r}}} at start"


# --- the Grafana dashboard ---------------------------------------------------------------
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, expr, legendFormat) of every panel target."""
    return [
        (panel.get("title", ""), target["expr"], target.get("legendFormat", ""))
        for panel in all_panels(dashboard()["panels"])
        for target in panel.get("targets", [])
    ]


RATED = re.compile(r"(?:increase|rate)\((orkestr_\w+_total)")


def test_every_message_kind_the_ingest_counts_starts_at_zero() -> None:
    """The alert on rejected agent messages sums by kind: each kind's first one counts."""
    from typing import get_args

    from controller.ingest import Kind
    from controller.metrics import MESSAGE_KINDS, MESSAGE_RESULTS

    kinds = {s["kind"] for s in started_samples()["orkestr_controller_mqtt_messages_total"]}
    assert kinds >= {*get_args(Kind), "unknown"}
    assert {"rejected", "error"} <= set(MESSAGE_RESULTS) and set(MESSAGE_KINDS) == kinds


def test_counters_the_dashboard_rates_start_at_zero() -> None:
    """A labelled counter graphed with increase() or rate() shows its first event only if it
    was served before it, so each one has series from the start (plans: see test_metrics_*)."""
    from controller.plans import load_plans

    started = Metrics()
    started.start_plans(load_plans(None))
    samples = started_samples()
    for family in started.registry.collect():
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(dict(sample.labels))
    rated = {name for _, expr, _ in dashboard_queries() for name in RATED.findall(expr)}
    assert "orkestr_controller_plan_limit_rejections_total" in rated
    missing = sorted(name for name in rated if not samples.get(name))
    assert not missing, f"no series at start: {missing}"


def test_dashboard_structure() -> None:
    data = dashboard()
    assert data["uid"] and data["title"]
    assert 36 <= data["schemaVersion"] <= 41
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query"
    panels = list(all_panels(data["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert len(rows) >= 6, rows
    for panel in panels:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel.get("targets"), f"{panel['title']} has no query"
            for target in panel["targets"]:
                assert target["datasource"] == panel["datasource"], panel["title"]
                assert target.get("expr", "").strip(), panel["title"]


@pytest.mark.parametrize(
    ("title", "expr", "legend"), dashboard_queries(), ids=lambda v: str(v)[:60]
)
def test_dashboard_query_uses_real_metrics(title: str, expr: str, legend: str) -> None:
    query = Query(expr)
    assert query.problems() == [], f"{title}: {expr}"
    assert query.jobs <= job_names(), f"{title}: job matcher not in prometheus.yml"
    defined = {v["name"] for v in dashboard()["templating"]["list"]} | GRAFANA_BUILTINS
    assert query.variables <= defined, f"{title}: undefined variables"
    shown = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
    missing = shown - query.output_labels(catalogue()[0])
    assert not missing, f"{title}: legend uses labels the query does not yield: {missing}"


def test_dashboard_variable_queries() -> None:
    labels, _ = catalogue()
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        found = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", text)
        assert found, text
        selector = Query(found[1])
        assert selector.problems() == [], text
        assert selector.jobs <= job_names()
        assert found[2] in set().union(*(labels[m] for m in selector.metrics)), text


def test_dashboard_covers_every_metric() -> None:
    _, orkestr = catalogue()
    used: set[str] = set()
    for _title, expr, _legend in dashboard_queries():
        used |= Query(expr).metrics
    missing = sorted(name for name, samples in orkestr.items() if not samples & used)
    assert not missing, f"no panel shows {missing}"


# --- promtool ------------------------------------------------------------------------------
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not on PATH (Debian package `prometheus` provides it)"
)


def promtool(*args: str, cwd: Path | None = None) -> str:
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


@needs_promtool
def test_promtool_check_config(tmp_path: Path) -> None:
    # check config also opens credentials_file: point it at a temporary token.
    token = tmp_path / "metrics_token"
    token.write_text("test-token\n")
    text = CONFIG.read_text()
    assert text.count(CREDENTIALS_FILE) == 1
    assert text.count(AGENT_CREDENTIALS_FILE) == 1
    text = text.replace(CREDENTIALS_FILE, str(token)).replace(AGENT_CREDENTIALS_FILE, str(token))
    (tmp_path / "prometheus.yml").write_text(text)
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    output = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert f"SUCCESS: {len(alert_rules())} rules found" in output


@needs_promtool
def test_promtool_check_rules() -> None:
    output = promtool("check", "rules", str(ALERTS))
    assert f"SUCCESS: {len(alert_rules())} rules found" in output


# Synthetic series, one minute apart, and which alerts must fire when. Each alert's
# annotations are left out of the comparison by asking for the ALERTS series instead.
RULE_TESTS = """\
rule_files:
  - alerts.yml
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'up{job="orkestr-agent", instance="a"}'
        values: '1 1 0x40'
      - series: 'up{job="orkestr-agent", instance="b"}'
        values: '1x42'
      - series: 'orkestr_agent_mqtt_connected{job="orkestr-agent", instance="b"}'
        values: '1x9 0x32'
      - series: 'orkestr_controller_mqtt_connected{job="orkestr-controller", instance="c"}'
        values: '1x42'
      - series: 'orkestr_controller_desired_generation{job="orkestr-controller", instance="c"}'
        values: '12x42'
      - series: 'orkestr_agent_applied_generation{job="orkestr-agent", instance="a"}'
        values: '5x42'
      - series: 'orkestr_agent_applied_generation{job="orkestr-agent", instance="b"}'
        values: '11x14 12x27'
      # Per host, as the controller sees it: node-b catches up at 15m; node-c stays behind
      # while node-b is current, which a fleet-wide maximum never alerted on.
      - series: 'orkestr_controller_host_desired_generation{job="orkestr-controller", instance="c", host="node-b"}'
        values: '12x42'
      - series: 'orkestr_controller_host_applied_generation{job="orkestr-controller", instance="c", host="node-b"}'
        values: '11x14 12x27'
      - series: 'orkestr_controller_host_desired_generation{job="orkestr-controller", instance="c", host="node-c"}'
        values: '_x15 9x27'
      - series: 'orkestr_controller_host_applied_generation{job="orkestr-controller", instance="c", host="node-c"}'
        values: '_x15 7x27'
      - series: 'orkestr_agent_reconcile_total{job="orkestr-agent", instance="a", result="success"}'
        values: '0+10x42'
      - series: 'orkestr_agent_reconcile_total{job="orkestr-agent", instance="a", result="error"}'
        values: '0+3x42'
      - series: 'orkestr_agent_reconcile_total{job="orkestr-agent", instance="b", result="success"}'
        values: '0+10x5 50x37'
      - series: 'orkestr_agent_reconcile_total{job="orkestr-agent", instance="b", result="requeue"}'
        values: '0x5 0+2x37'
      - series: 'orkestr_agent_desired_rejected_total{job="orkestr-agent", instance="b", reason="StaleGeneration"}'
        values: '0x30 1x11'
      # A counter born at its first event (not created at zero): increase() cannot see
      # that event, so instance d's rejection never alerts. Hence metrics.start_at_zero.
      - series: 'orkestr_agent_desired_rejected_total{job="orkestr-agent", instance="d", reason="Invalid"}'
        values: '_x30 1x11'
      - series: 'orkestr_agent_wake_duration_seconds_bucket{job="orkestr-agent", instance="a", kind="redis", stage="deep", le="1"}'
        values: '0x42'
      - series: 'orkestr_agent_wake_duration_seconds_bucket{job="orkestr-agent", instance="a", kind="redis", stage="deep", le="2.5"}'
        values: '0+1x42'
      - series: 'orkestr_agent_wake_duration_seconds_bucket{job="orkestr-agent", instance="a", kind="redis", stage="deep", le="+Inf"}'
        values: '0+1x42'
      - series: 'orkestr_agent_wake_duration_seconds_bucket{job="orkestr-agent", instance="b", kind="redis", stage="deep", le="1"}'
        values: '0+1x42'
      - series: 'orkestr_agent_wake_duration_seconds_bucket{job="orkestr-agent", instance="b", kind="redis", stage="deep", le="+Inf"}'
        values: '0+1x42'
    promql_expr_test:
      - expr: count by (alertname, instance) (ALERTS{alertstate="firing"})
        eval_time: 1m
        exp_samples: []
      - expr: count by (alertname, instance) (ALERTS{alertstate="firing"})
        eval_time: 12m
        exp_samples:
          - labels: '{alertname="OrkestrAgentDown", instance="a"}'
            value: 1
          - labels: '{alertname="OrkestrAgentReconcileErrorRatio", instance="a"}'
            value: 1
          - labels: '{alertname="OrkestrDesiredGenerationNotApplied"}'
            value: 1
          - labels: '{alertname="OrkestrAgentWakeSlow", instance="a"}'
            value: 1
      - expr: count by (alertname, instance) (ALERTS{alertstate="firing"})
        eval_time: 25m
        exp_samples:
          - labels: '{alertname="OrkestrDesiredGenerationNotApplied"}'
            value: 1
          - labels: '{alertname="OrkestrAgentDown", instance="a"}'
            value: 1
          - labels: '{alertname="OrkestrAgentBrokerDisconnected", instance="b"}'
            value: 1
          - labels: '{alertname="OrkestrAgentReconcileErrorRatio", instance="a"}'
            value: 1
          - labels: '{alertname="OrkestrAgentWakeSlow", instance="a"}'
            value: 1
      - expr: count by (alertname, instance) (ALERTS{alertstate="firing"})
        eval_time: 40m
        exp_samples:
          - labels: '{alertname="OrkestrDesiredGenerationNotApplied"}'
            value: 1
          - labels: '{alertname="OrkestrAgentDown", instance="a"}'
            value: 1
          - labels: '{alertname="OrkestrAgentBrokerDisconnected", instance="b"}'
            value: 1
          - labels: '{alertname="OrkestrAgentReconcileErrorRatio", instance="a"}'
            value: 1
          - labels: '{alertname="OrkestrAgentReconcileStuck", instance="b"}'
            value: 1
          - labels: '{alertname="OrkestrAgentDesiredStateRejected", instance="b"}'
            value: 1
          - labels: '{alertname="OrkestrAgentWakeSlow", instance="a"}'
            value: 1
  # The controller's alerts, the permanent action failures and the not-ready add-on.
  - interval: 1m
    input_series:
      - series: 'up{job="orkestr-controller", instance="c"}'
        values: '1x5 0x30'
      - series: 'orkestr_controller_mqtt_connected{job="orkestr-controller", instance="c"}'
        values: '1x5 0x30'
      - series: 'orkestr_controller_mqtt_connects_total{job="orkestr-controller", instance="c"}'
        values: '1x5 1+1x30'
      - series: 'orkestr_controller_desired_published_total{job="orkestr-controller", instance="c", result="published"}'
        values: '0+5x35'
      - series: 'orkestr_controller_desired_published_total{job="orkestr-controller", instance="c", result="too_large"}'
        values: '0x10 1x25'
      - series: 'orkestr_controller_mqtt_messages_total{job="orkestr-controller", instance="c", kind="status", result="accepted"}'
        values: '0+20x35'
      - series: 'orkestr_controller_mqtt_messages_total{job="orkestr-controller", instance="c", kind="status", result="rejected"}'
        values: '0x10 1x25'
      - series: 'orkestr_controller_http_requests_total{job="orkestr-controller", instance="c", method="GET", route="/v1/projects", status="200"}'
        values: '0+10x35'
      - series: 'orkestr_controller_http_requests_total{job="orkestr-controller", instance="c", method="GET", route="/v1/projects", status="500"}'
        values: '0+1x35'
      # /metrics is left out of the ratio: its many 200s must not hide the API's 5xx.
      - series: 'orkestr_controller_http_requests_total{job="orkestr-controller", instance="c", method="GET", route="/metrics", status="200"}'
        values: '0+1000x35'
      - series: 'orkestr_agent_actions_total{job="orkestr-agent", instance="a", action="RemoveContainer", result="permanent_error"}'
        values: '0x10 1x25'
      - series: 'orkestr_agent_actions_total{job="orkestr-agent", instance="a", action="RunContainer", result="error"}'
        values: '0+1x35'
      - series: 'orkestr_agent_addon_ready{job="orkestr-agent", instance="a", addon="x", project="p", kind="redis"}'
        values: '1x5 0x30'
      - series: 'orkestr_agent_addon_sleep_state{job="orkestr-agent", instance="a", addon="x", project="p", kind="redis"}'
        values: '0x35'
      # Asleep, so not ready by design: no alert.
      - series: 'orkestr_agent_addon_ready{job="orkestr-agent", instance="e", addon="y", project="p", kind="redis"}'
        values: '0x35'
      - series: 'orkestr_agent_addon_sleep_state{job="orkestr-agent", instance="e", addon="y", project="p", kind="redis"}'
        values: '2x35'
    promql_expr_test:
      - expr: count by (alertname, instance) (ALERTS{alertstate="firing"})
        eval_time: 5m
        exp_samples: []
      - expr: count by (alertname, instance) (ALERTS{alertstate="firing"})
        eval_time: 9m
        exp_samples:
          - labels: '{alertname="OrkestrControllerDown", instance="c"}'
            value: 1
      - expr: count by (alertname, instance) (ALERTS{alertstate="firing"})
        eval_time: 20m
        exp_samples:
          - labels: '{alertname="OrkestrControllerDown", instance="c"}'
            value: 1
          - labels: '{alertname="OrkestrControllerBrokerDisconnected", instance="c"}'
            value: 1
          - labels: '{alertname="OrkestrControllerBrokerFlapping", instance="c"}'
            value: 1
          - labels: '{alertname="OrkestrControllerPublishFailing", instance="c"}'
            value: 1
          - labels: '{alertname="OrkestrControllerAgentMessagesRejected", instance="c"}'
            value: 1
          - labels: '{alertname="OrkestrControllerHttpErrors", instance="c"}'
            value: 1
          - labels: '{alertname="OrkestrAgentActionsFailingPermanently", instance="a"}'
            value: 1
          - labels: '{alertname="OrkestrAddonNotReady", instance="a"}'
            value: 1
"""


def test_rule_tests_fire_every_alert() -> None:
    tests = RULE_TESTS + BACKUP_RULE_TESTS + NETWORK_RULE_TESTS
    fired = set(re.findall(r"alertname=\"(\w+)\"", tests))
    assert fired == {r["alert"] for r in alert_rules()}


# The backup alerts, on their own series. Minute steps. Instance a: a verification fails
# at minute 10; b: a backup fails at 20; add-on x's newest verified backup is 30 hours old
# from the start, y's is fresh.
BACKUP_RULE_TESTS = """\
rule_files:
  - alerts.yml
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'orkestr_agent_backup_verifications_total{job="orkestr-agent", instance="a", kind="postgres", result="failed"}'
        values: '0x10 1x30'
      - series: 'orkestr_agent_backup_verifications_total{job="orkestr-agent", instance="a", kind="postgres", result="verified"}'
        values: '0+1x40'
      - series: 'orkestr_agent_backup_operations_total{job="orkestr-agent", instance="b", op="backup", kind="redis", result="failed"}'
        values: '0x20 1x20'
      - series: 'orkestr_controller_backup_last_verified_timestamp_seconds{job="orkestr-controller", instance="c", addon="x", project="p"}'
        values: '-108000x40'
      - series: 'orkestr_controller_backup_last_verified_timestamp_seconds{job="orkestr-controller", instance="c", addon="y", project="p"}'
        values: '0+60x40'
    promql_expr_test:
      - expr: count by (alertname, instance) (ALERTS{alertstate="firing", alertname=~"OrkestrBackup.*"})
        eval_time: 5m
        exp_samples: []
      - expr: count by (alertname, instance) (ALERTS{alertstate="firing", alertname=~"OrkestrBackup.*"})
        eval_time: 15m
        exp_samples:
          - labels: '{alertname="OrkestrBackupVerificationFailed", instance="a"}'
            value: 1
      - expr: count by (alertname, addon) (ALERTS{alertstate="firing", alertname=~"OrkestrBackup.*"})
        eval_time: 35m
        exp_samples:
          - labels: '{alertname="OrkestrBackupVerificationFailed"}'
            value: 1
          - labels: '{alertname="OrkestrBackupOperationsFailing"}'
            value: 1
          - labels: '{alertname="OrkestrBackupStale", addon="x"}'
            value: 1
"""


# A network Docker refuses to remove (agent/netremoval.py): instance a's from minute 10
# on; b's for 20 minutes only (the dockerd restart cleared it).
NETWORK_RULE_TESTS = """\
rule_files:
  - alerts.yml
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'orkestr_agent_networks_unremovable{job="orkestr-agent", instance="a"}'
        values: '0x10 1x50'
      - series: 'orkestr_agent_networks_unremovable{job="orkestr-agent", instance="b"}'
        values: '1x20 0x40'
    promql_expr_test:
      - expr: count by (alertname, instance) (ALERTS{alertstate="firing", alertname="OrkestrAgentNetworkUnremovable"})
        eval_time: 35m
        exp_samples: []
      - expr: count by (alertname, instance) (ALERTS{alertstate="firing", alertname="OrkestrAgentNetworkUnremovable"})
        eval_time: 45m
        exp_samples:
          - labels: '{alertname="OrkestrAgentNetworkUnremovable", instance="a"}'
            value: 1
"""


@needs_promtool
@pytest.mark.parametrize(
    "rule_tests",
    [RULE_TESTS, BACKUP_RULE_TESTS, NETWORK_RULE_TESTS],
    ids=["on-synthetic-series", "backups", "network"],
)
def test_promtool_alerts_fire(tmp_path: Path, rule_tests: str) -> None:
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    (tmp_path / "tests.yml").write_text(rule_tests)
    promtool("test", "rules", "tests.yml", cwd=tmp_path)
