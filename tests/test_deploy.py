"""The Grafana dashboard and the Prometheus alerts of deploy/, held to what Bastion exports.

promtool (Debian's ``prometheus`` package; ``make test`` puts it in .venv/bin) checks the
alert rules, runs their unit tests (deploy/prometheus/alerts_test.yml) and parses every
PromQL expression of the dashboard. A JSON schema holds the dashboard to the parts of
Grafana's model it uses. And every metric the two name must be in the /metrics of a real
gateway process that served a request: a renamed metric breaks this file, not a pager.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import yaml
from conftest import Gateway, free_port, start, stop
from prometheus_client.parser import text_string_to_metric_families

from bastion.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "bastion.json"
DOCS = ROOT / "docs" / "observability.md"

# Grafana's own variables, replaced by a value of the right kind before promtool parses
GRAFANA_VARS = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "1m"}
# series Prometheus makes itself, not Bastion
PROMETHEUS_OWN = {"up"}
METRIC = re.compile(r"\b(bastion_[a-z0-9_]+)\b")
LABEL_VALUES = re.compile(r"^label_values\((.+),\s*\w+\)$")


# ---- promtool ---------------------------------------------------------------------------


def promtool() -> str:
    """promtool beside the venv's Python, else on PATH; a missing one fails, never skips."""
    beside = Path(sys.prefix) / "bin" / "promtool"
    found = str(beside) if beside.exists() else shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool not found in .venv/bin or on PATH: `make test` installs it (from Debian's"
            " prometheus package, without the service)",
            pytrace=False,
        )
    return found


def run_promtool(*args: str) -> str:
    done = subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=60, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


# ---- what the files say -----------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> dict[str, str]:
    """Every PromQL expression of the dashboard, by where it is: panel targets, and the
    series selectors of the template variables' ``label_values(…)``."""
    board = dashboard()
    exprs = {}
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            exprs[f"panel {panel['id']} {target['refId']}"] = target["expr"]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            match = LABEL_VALUES.match(var["definition"])
            assert match, f"variable {var['name']}: expected label_values(…), got {var}"
            exprs[f"variable {var['name']}"] = match.group(1)
    return exprs


def grafana_free(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$__" not in expr, f"a Grafana variable this test does not know: {expr}"
    return expr


def metric_names(exprs: list[str]) -> set[str]:
    return {name for expr in exprs for name in METRIC.findall(expr)}


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of the headings: lower case, punctuation dropped, spaces → '-'."""
    headings = re.findall(r"^#+ (.+)$", markdown, re.M)
    return {re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-") for h in headings}


# ---- the alerts -------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check() -> None:
    output = run_promtool("check", "rules", str(ALERTS))
    assert f"SUCCESS: {len(alert_rules())} rules found" in output


def test_alert_unit_tests_pass() -> None:
    """Each alert fires on its input series, and stays quiet where it must."""
    output = run_promtool("test", "rules", str(ALERT_TESTS))
    assert "SUCCESS" in output


def test_every_alert_is_tested_firing() -> None:
    tested = {
        case["alertname"]
        for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names))
    assert set(names) - tested == set()


def test_every_alert_has_for_severity_and_a_runbook_that_exists() -> None:
    sections = anchors(DOCS.read_text())
    for rule in alert_rules():
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{name}: no for:"
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        notes = rule["annotations"]
        assert notes["summary"].strip() and notes["description"].strip(), name
        doc, _, anchor = notes["runbook"].partition("#")
        assert doc == "docs/observability.md", name
        assert anchor == name.lower(), f"{name}: runbook anchor {anchor!r}"
        assert anchor in sections, f"{name}: docs/observability.md has no section {anchor}"


def test_money_in_alerts_and_dashboard_is_shown_in_usd() -> None:
    """Counters of nano-dollars are divided by 1e9 wherever they are shown."""
    exprs = [rule["expr"] for rule in alert_rules()] + list(dashboard_exprs().values())
    money = [e for e in exprs if "nanodollars" in e]
    assert len(money) >= 4
    for expr in money:
        assert "/ 1e9" in expr, expr
    for panel in dashboard()["panels"]:
        if any("nanodollars" in t["expr"] for t in panel.get("targets", [])):
            assert panel["fieldConfig"]["defaults"]["unit"] == "currencyUSD", panel["title"]


# ---- the dashboard ----------------------------------------------------------------------

DATASOURCE_REF = {
    "type": "object",
    "required": ["type", "uid"],
    "properties": {"type": {"const": "prometheus"}, "uid": {"const": "${datasource}"}},
}
GRID_POS = {
    "type": "object",
    "required": ["h", "w", "x", "y"],
    "additionalProperties": False,
    "properties": {
        "h": {"type": "integer", "minimum": 1},
        "w": {"type": "integer", "minimum": 1, "maximum": 24},
        "x": {"type": "integer", "minimum": 0, "maximum": 23},
        "y": {"type": "integer", "minimum": 0},
    },
}
TEXT = {"type": "string", "minLength": 1}
TARGET = {
    "type": "object",
    "required": ["refId", "expr", "datasource"],
    "properties": {
        "refId": {"type": "string", "pattern": "^[A-Z]$"},
        "expr": TEXT,
        "datasource": DATASOURCE_REF,
        "legendFormat": {"type": "string"},
    },
}
ROW = {
    "type": "object",
    "required": ["id", "type", "title", "gridPos", "collapsed", "panels"],
    "properties": {
        "id": {"type": "integer", "minimum": 1},
        "type": {"const": "row"},
        "title": TEXT,
        "gridPos": GRID_POS,
        "collapsed": {"const": False},  # open rows: their panels sit in the top-level list
        "panels": {"type": "array", "maxItems": 0},
    },
}
PANEL = {
    "type": "object",
    "required": ["id", "type", "title", "description", "gridPos", "datasource", "targets"],
    "properties": {
        "id": {"type": "integer", "minimum": 1},
        "type": {"enum": ["timeseries", "stat", "bargauge", "state-timeline"]},
        "title": TEXT,
        "description": TEXT,
        "gridPos": GRID_POS,
        "datasource": DATASOURCE_REF,
        "targets": {"type": "array", "minItems": 1, "items": TARGET},
        "fieldConfig": {
            "type": "object",
            "required": ["defaults", "overrides"],
            "properties": {"defaults": {"type": "object"}, "overrides": {"type": "array"}},
        },
    },
}
DATASOURCE_VAR = {
    "type": "object",
    "required": ["name", "type", "query"],
    "properties": {
        "name": {"const": "datasource"},
        "type": {"const": "datasource"},
        "query": {"const": "prometheus"},
    },
}
QUERY_VAR = {
    "type": "object",
    "required": ["name", "type", "datasource", "definition", "query"],
    "properties": {
        "name": {"enum": ["instance", "model"]},
        "type": {"const": "query"},
        "datasource": DATASOURCE_REF,
        "definition": {"type": "string", "pattern": "^label_values\\("},
        "query": {"type": "object", "required": ["query"]},
    },
}
DASHBOARD_SCHEMA = {
    "type": "object",
    "required": ["title", "uid", "schemaVersion", "time", "templating", "panels"],
    "properties": {
        "title": TEXT,
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "schemaVersion": {"type": "integer", "minimum": 39},
        "time": {"type": "object", "required": ["from", "to"]},
        "templating": {
            "type": "object",
            "required": ["list"],
            "properties": {
                "list": {
                    "type": "array",
                    "contains": DATASOURCE_VAR,
                    "items": {"oneOf": [DATASOURCE_VAR, QUERY_VAR]},
                }
            },
        },
        "panels": {"type": "array", "minItems": 1, "items": {"oneOf": [ROW, PANEL]}},
    },
}


def test_dashboard_matches_grafanas_model() -> None:
    jsonschema.validate(dashboard(), DASHBOARD_SCHEMA)


def test_the_schema_refuses_a_panel_tied_to_one_datasource() -> None:
    """The schema bites: a panel pinned to a datasource uid would not import elsewhere."""
    board = dashboard()
    panel = next(p for p in board["panels"] if p["type"] == "timeseries")
    panel["targets"][0]["datasource"] = {"type": "prometheus", "uid": "P1809F7CD0C75ACF3"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(board, DASHBOARD_SCHEMA)


def test_panel_ids_are_unique_and_panels_do_not_overlap() -> None:
    panels = dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    boxes = []
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        boxes.append((p["title"], g["x"], g["y"], g["x"] + g["w"], g["y"] + g["h"]))
    for i, (a, ax0, ay0, ax1, ay1) in enumerate(boxes):
        for b, bx0, by0, bx1, by1 in boxes[i + 1 :]:
            overlap = ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1
            assert not overlap, f"{a!r} overlaps {b!r}"


def test_dashboard_uses_only_the_variables_it_defines() -> None:
    board = dashboard()
    defined = {var["name"] for var in board["templating"]["list"]}
    text = DASHBOARD.read_text()
    used = set(re.findall(r"\$\{?([A-Za-z_]\w*)", text)) - {k[1:] for k in GRAFANA_VARS}
    assert used == defined


def test_every_dashboard_expression_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each one, written as a recording rule."""
    exprs = dashboard_exprs()
    rules = [
        {"record": f"dashboard:expr_{i}", "expr": grafana_free(expr)}
        for i, expr in enumerate(exprs.values())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    output = run_promtool("check", "rules", str(path))
    assert f"SUCCESS: {len(rules)} rules found" in output


def test_an_invalid_expression_fails_the_check(tmp_path: Path) -> None:
    """The PromQL check can fail: a missing bracket is refused."""
    path = tmp_path / "bad.yml"
    rule = {"record": "dashboard:bad", "expr": "sum(rate(bastion_requests_total[1m])"}
    path.write_text(yaml.safe_dump({"groups": [{"name": "bad", "rules": [rule]}]}))
    done = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True)
    assert done.returncode != 0


# ---- against a real gateway -------------------------------------------------------------

WEBHOOK_TOML = '[webhooks]\nurl = "http://127.0.0.1:{hook}/hook"\n'  # the rest: defaults, env


def scrape(root: str) -> str:
    response = httpx.get(f"{root}/metrics", timeout=10)
    assert response.status_code == 200
    return response.text


def sample_names(exposition: str) -> set[str]:
    """The names the samples carry, suffixes included (_total, _bucket, _sum, _count)."""
    return {
        sample.name
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def declared_names(exposition: str) -> set[str]:
    """The families a process declares, samples or not (full names: ``…_total``)."""
    return set(re.findall(r"^# TYPE (\S+) ", exposition, re.M))


@pytest.fixture(scope="module")
def served(gateway: Gateway) -> str:
    """/metrics of the session's gateway after a request it served and one it refused."""
    key, _ = gateway.new_key("5.00")
    client = openai.OpenAI(base_url=gateway.url, api_key=key, max_retries=0, timeout=20)
    chat = client.chat.completions.create(
        model="gpt-oss-120b", messages=[{"role": "user", "content": "hello"}], max_tokens=8
    )
    assert chat.usage is not None and chat.usage.completion_tokens > 0
    stranger = openai.OpenAI(base_url=gateway.url, api_key="sk-unknown", max_retries=0)
    with pytest.raises(openai.AuthenticationError):  # counted in bastion_refusals_total
        stranger.chat.completions.create(
            model="gpt-oss-120b", messages=[{"role": "user", "content": "x"}]
        )
    return scrape(gateway.root)


@pytest.fixture(scope="module")
def with_webhooks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """/metrics of a gateway with webhooks.url set: the only one with the webhook family."""
    tmp = tmp_path_factory.mktemp("deploy")
    port = free_port()
    config = tmp / "bastion.toml"
    config.write_text(WEBHOOK_TOML.format(hook=free_port()))
    env = {
        **os.environ,
        "BASTION_DATABASE_URL": f"sqlite:///{tmp / 'b.db'}",
        "BASTION_WEBHOOKS_SECRET": "whsec_deploy_test_0123456789",
    }
    root = f"http://127.0.0.1:{port}"
    args = ["serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    proc = start(args, f"{root}/healthz", env=env)
    try:
        yield scrape(root)
    finally:
        stop(proc)


def test_every_metric_the_alerts_and_dashboard_name_is_exported(
    served: str, with_webhooks: str
) -> None:
    exported = sample_names(served)
    # no event was due, so the webhook family is declared without samples yet
    webhook_only = declared_names(with_webhooks) - declared_names(served)
    assert webhook_only == {"bastion_webhook_deliveries_total"}
    alerts = [rule["expr"] for rule in alert_rules()]
    named = metric_names(alerts + list(dashboard_exprs().values()))
    assert len(named) >= 25
    missing = {n for n in named if n not in exported and n not in webhook_only}
    assert missing == set(), f"not in a real gateway's /metrics: {sorted(missing)}"
    # the alerts' only other series is Prometheus's own scrape health
    others = {
        word
        for expr in alerts
        for word in re.findall(r"\b([a-z_:][a-z0-9_:]*)\s*\{", expr)
        if not word.startswith("bastion_")
    }
    assert others <= PROMETHEUS_OWN


def test_model_upstream_info_says_which_replicas_serve_each_model(served: str) -> None:
    """The join BastionModelUnavailable makes: models × their replicas, from the config."""
    pairs = {
        (s.labels["model"], s.labels["upstream"])
        for family in text_string_to_metric_families(served)
        for s in family.samples
        if s.name == "bastion_model_upstream_info" and s.value == 1
    }
    assert pairs, "no bastion_model_upstream_info samples: the gateway sets metrics.models"
    assert ("gpt-oss-120b", "sim") in pairs
    assert ("dead-model", "dead") in pairs
    assert ("slow-model", "slow") in pairs
    assert ("gpt-oss-120b", "dead") not in pairs


def test_model_upstream_info_comes_from_the_mapping_it_is_given() -> None:
    """metrics.py alone: one sample per model and replica; no refresh age before the
    ledger writer has run (an age of "since boot" would page for nothing)."""
    metrics = Metrics()
    metrics.models = {"a": ("r1", "r2"), "b": ("r1",)}
    samples = [
        s for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    ]  # fmt: skip
    pairs = [
        (s.labels["model"], s.labels["upstream"], s.value)
        for s in samples
        if s.name == "bastion_model_upstream_info"
    ]
    assert sorted(pairs) == [("a", "r1", 1), ("a", "r2", 1), ("b", "r1", 1)]
    assert not [s for s in samples if s.name == "bastion_store_refresh_age_seconds"]


def test_store_refresh_age_is_exported(served: str) -> None:
    ages = [
        s.value
        for family in text_string_to_metric_families(served)
        for s in family.samples
        if s.name == "bastion_store_refresh_age_seconds"
    ]
    assert len(ages) == 1 and ages[0] >= 0


def test_every_exported_metric_is_documented(served: str, with_webhooks: str) -> None:
    docs = DOCS.read_text()
    for exposition in (served, with_webhooks):
        for family in text_string_to_metric_families(exposition):
            if family.name.endswith("_created"):  # a histogram's start time, not a metric
                continue
            name = family.name + ("_total" if family.type == "counter" else "")
            assert f"`{name}`" in docs, f"{name} is not in docs/observability.md"
