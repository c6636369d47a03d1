"""The shipped alert rules and dashboard: promtool checks the rules and runs their unit tests, and
every StrokeGate metric they use is one the service exports (a renamed metric would silently
leave an alert that can never fire)."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from prometheus_client import REGISTRY

from deploy_checks import DASHBOARD, DEPLOY, RULES, require_tool, run
from service.ops import metrics

pytestmark = pytest.mark.integration

PROMTOOL = "promtool"
INSTALL = "apt-get install prometheus"
METRIC = re.compile(r"\b(strokegate_[a-z0-9_]+)")


def exported_names() -> set[str]:
    """Every sample name the service can export, counters' _total and histograms' _bucket included
    (and readings, exported once read)."""
    names = {reading.name for reading in vars(metrics).values() if isinstance(reading, metrics.Reading)}
    for family in REGISTRY.collect():
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
        if family.type == "info":
            names.add(family.name + "_info")
    return names


def rule_expressions() -> dict[str, str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


def dashboard_expressions() -> dict[str, str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return {f"{panel['title']} [{target['refId']}]": target["expr"] for panel in dashboard["panels"] for target in panel["targets"]}


def test_promtool_accepts_the_rules_and_the_scrape_configuration() -> None:
    promtool = require_tool(PROMTOOL, INSTALL)
    checked = run([promtool, "check", "rules", str(RULES)])
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 12 rules found" in checked.stdout
    config = run([promtool, "check", "config", "--syntax-only", str(DEPLOY / "prometheus" / "prometheus.yml")])
    assert config.returncode == 0, config.stdout + config.stderr


def test_the_alert_rules_pass_their_unit_tests() -> None:
    promtool = require_tool(PROMTOOL, INSTALL)
    tested = run([promtool, "test", "rules", str(DEPLOY / "prometheus" / "tests" / "strokegate.test.yml")])
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    tests = yaml.safe_load((DEPLOY / "prometheus" / "tests" / "strokegate.test.yml").read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert fired == set(rule_expressions())


def test_rules_and_dashboard_use_only_metrics_the_service_exports() -> None:
    exported = exported_names()
    used = {name: where for where, expr in {**rule_expressions(), **dashboard_expressions()}.items() for name in METRIC.findall(expr)}
    missing = {name: where for name, where in used.items() if name not in exported}
    assert not missing, f"not exported by service/ops/metrics.py: {missing}"
    assert {"strokegate_loop_up", "strokegate_spool_free_bytes", "strokegate_jobs"} <= set(used)


def test_every_dashboard_panel_queries_the_provisioned_data_source() -> None:
    provisioned = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    uid = provisioned["datasources"][0]["uid"]
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "strokegate"
    titles = [panel["title"] for panel in dashboard["panels"]]
    for wanted in ("Studies and results per hour", "Last image to PACS acknowledgement", "Failures by reason, per hour", "Queue depth", "Disk"):
        assert wanted in titles
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == uid
        assert all(target["datasource"]["uid"] == uid for target in panel["targets"])
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
