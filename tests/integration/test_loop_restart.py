"""A background loop that dies anyway (a bug nobody expected) is restarted, and /readyz says
"not ready" while it is down (issue 11). The bug is injected: no input reaches one on purpose."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from service.config import load_settings
from service.ops import metrics
from service.server import StrokeGate
from service_harness import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def readiness(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_a_crashed_loop_is_restarted_and_the_service_is_not_ready_meanwhile(tmp_path: Path) -> None:
    settings = load_settings(
        host="127.0.0.1", port=0, http_host="127.0.0.1", http_port=0, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        spool_dir=tmp_path / "spool", results_dir=tmp_path / "results", min_free_bytes=0,
    )
    gate = StrokeGate(settings)
    trigger, crashed = threading.Event(), []
    real = gate.tracker.loop.target

    def crash_when_told() -> None:
        if not crashed:
            while not trigger.wait(0.05):
                if gate.tracker._stop.is_set():
                    return
            crashed.append(True)
            raise RuntimeError("a bug nobody expected")
        real()

    gate.tracker.loop.target = crash_when_told
    gate.tracker.loop.restart_delay_s = 2.0
    before = metrics.LOOP_RESTARTS.labels(loop="tracker")._value.get()
    gate.start()
    try:
        port = wait_for(lambda: gate.http_port, 30, "the HTTP server")
        wait_for(lambda: readiness(port)[0] == 200, 30, "ready")
        trigger.set()
        status, body = wait_for(lambda: (r := readiness(port))[0] == 503 and r, 5, "not ready while the loop is down",
                                interval=0.05)
        assert body["services"] is False and body["database"] is True
        wait_for(lambda: readiness(port)[0] == 200, 10, "ready again once the loop is restarted")
        assert gate.tracker.loop.up and gate.tracker.loop.restarts == 1
        assert metrics.LOOP_RESTARTS.labels(loop="tracker")._value.get() == before + 1
    finally:
        gate.stop()
