"""The real Prometheus (Debian's package) scrapes a running `strokegate serve` with the shipped rule
file loaded: StrokeGate's metrics come back through Prometheus's HTTP API, every background loop
reads as up, every rule evaluates without error, and every dashboard query is valid PromQL."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from deploy_checks import DASHBOARD, RULES, require_tool
from dicom_tools import free_port, requires_storescu
from service_harness import Service, stop_process, wait_for

from service.store import tokens

pytestmark = [pytest.mark.integration, requires_storescu, pytest.mark.timeout(120)]

LOOPS = {"dicom-receiver", "dicom-filer", "recorder", "tracker", "sender", "worker-0", "http", "clinical"}


class Prometheus:
    """Prometheus scraping one target every second, on a free port, its data in ``root``."""

    def __init__(self, root: Path, target: str, token: str) -> None:
        self.root = root
        self.port = free_port()
        root.mkdir(parents=True, exist_ok=True)
        (root / "metrics_token").write_text(token)
        (root / "prometheus.yml").write_text(json.dumps({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{
                "job_name": "strokegate", "static_configs": [{"targets": [target]}],
                "authorization": {"type": "Bearer", "credentials_file": str(root / "metrics_token")},
            }],
        }))
        self.log = root / "prometheus.log"
        self.process: subprocess.Popen | None = None

    def start(self, binary: str) -> Prometheus:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [binary, f"--config.file={self.root / 'prometheus.yml'}", f"--storage.tsdb.path={self.root / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        wait_for(self._ready, 30, f"Prometheus to be ready (log: {self.log})")
        return self

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/{path}{query}", timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def stop(self) -> None:
        stop_process(self.process, grace_s=20)


def test_prometheus_reads_strokegate_metrics_and_evaluates_the_rules(tmp_path: Path) -> None:
    binary = require_tool("prometheus", "apt-get install prometheus")
    service = Service(tmp_path / "gate", f"sqlite:///{tmp_path / 'db.sqlite'}", [])
    prometheus: Prometheus | None = None
    try:
        service.start()
        # /metrics wants a token, as it does by default: Prometheus scrapes with a reader's.
        reader = service.create_token("prometheus", tokens.Role.READER)
        prometheus = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{service.http_port}", reader).start(binary)
        echo = subprocess.run(["echoscu", "-aec", "STROKEGATE", "127.0.0.1", str(service.port)],
                              capture_output=True, text=True, timeout=30, check=False)
        assert echo.returncode == 0, echo.stdout + echo.stderr

        # A value the service counted comes back through Prometheus's query API.
        def accepted() -> float | None:
            result = prometheus.query('strokegate_associations_total{job="strokegate", result="accepted"}')
            return float(result[0]["value"][1]) if result and float(result[0]["value"][1]) >= 1 else None

        assert wait_for(accepted, 30, "the C-ECHO association to be scraped") == 1.0
        build = prometheus.query("strokegate_build_info")
        assert build and build[0]["metric"]["version"] and build[0]["metric"]["instance"] == f"127.0.0.1:{service.http_port}"
        loops = {r["metric"]["loop"]: float(r["value"][1]) for r in prometheus.query("strokegate_loop_up")}
        assert loops == {loop: 1.0 for loop in LOOPS}, loops
        assert prometheus.query('up{job="strokegate"}')[0]["value"][1] == "1"

        # Every rule has been evaluated against the live data without error; none fires.
        def evaluated() -> list[dict] | None:
            rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
            return rules if rules and all(rule.get("lastEvaluation", "").startswith("20") for rule in rules) else None

        rules = wait_for(evaluated, 30, "every rule to be evaluated")
        assert len(rules) == 12
        assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]
        assert prometheus.api("alerts")["alerts"] == []

        # Every dashboard query is valid PromQL over these series (Grafana's interval macro set).
        panels = json.loads(DASHBOARD.read_text())["panels"]
        for panel in panels:
            for target in panel["targets"]:
                prometheus.query(target["expr"].replace("$__rate_interval", "1m"))
        assert prometheus.query("min(strokegate_loop_up)")[0]["value"][1] == "1"
    finally:
        if prometheus is not None:
            prometheus.stop()
        service.stop()
