"""Shared phantom fixtures: small, noise-free patients written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.phantom.generate import write_patient
from service.phantom.patient import PhantomOptions

SMALL_NOISE_FREE = PhantomOptions(ct_matrix=96, ct_slices=8, ct_frames=16, noise_hu=0.0)


@pytest.fixture(scope="session")
def small_ctp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A noise-free, motion-free CTP patient (seed 2, which has a stroke) on a small grid."""
    out = tmp_path_factory.mktemp("ctp")
    write_patient(2, "ctp", out, SMALL_NOISE_FREE)
    return out / "SGPH00000002"
