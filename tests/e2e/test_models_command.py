"""`strokegate models` as a user runs it: the shipped models, their cards, the backends here, parity."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

STROKEGATE = Path(sys.executable).parent / "strokegate"
WEIGHTS = Path(__file__).resolve().parents[2] / "models" / "weights"
pytestmark = pytest.mark.timeout(300)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(STROKEGATE), "models", *args], capture_output=True, text=True, timeout=280,
                          env={**os.environ, "COLUMNS": "200"})


def test_models_lists_the_shipped_model_and_checks_its_parity() -> None:
    result = _run()
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "ctp-core-penumbra" in out and "Research use only. Not for diagnosis." in out
    assert "tensorrt" in out and "onnxruntime" in out
    assert "parity on onnxruntime (CPUExecutionProvider)" in out and "holds" in out and "FAILS" not in out
    if "torch 2.13.0" in out:  # the test install has the training extra
        assert "parity on torch" in out


def test_models_refuses_a_model_whose_card_does_not_match_it(tmp_path: Path) -> None:
    for path in WEIGHTS.glob("ctp-core-penumbra.*"):
        shutil.copy(path, tmp_path / path.name)
    card = tmp_path / "ctp-core-penumbra.card.json"
    record = json.loads(card.read_text())
    record["files"]["test_input"]["sha256"] = "0" * 64
    card.write_text(json.dumps(record))
    result = _run("--models-dir", str(tmp_path))
    assert result.returncode == 1
    assert "does not match its model card" in result.stdout
