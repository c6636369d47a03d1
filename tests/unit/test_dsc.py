"""DSC-MRI preprocessing on analytic signals: dR2* back from S = S0 exp(-TE dR2*), the baseline,
the parenchyma mask without CSF, and the reasons a series cannot be analysed."""

from __future__ import annotations

import numpy as np
import pytest

from service.errors import InputError
from service.perfusion import dsc

TE = 0.03


def bolus(times: np.ndarray, arrival: float, peak: float) -> np.ndarray:
    """A gamma-variate-like dR2* curve (1/s) arriving at ``arrival`` s."""
    t = np.clip(times - arrival, 0, None)
    return peak * (t / 4.0) ** 3 * np.exp(3 * (1 - t / 4.0))


def test_concentration_inverts_the_signal_model() -> None:
    times = np.arange(40) * 1.5
    truth = bolus(times, 12.0, 8.0)
    s0 = 900.0
    frames = (s0 * np.exp(-TE * truth))[:, None, None, None] * np.ones((1, 2, 3, 4), dtype=np.float32)
    n = dsc.baseline_frames(frames.mean(axis=(1, 2, 3)))
    assert 2 <= n <= 8  # arrival at frame 8 (12 s / 1.5 s)
    concentration = dsc.concentration_dsc(frames, n, TE)
    assert concentration.shape == frames.shape and concentration.dtype == np.float32
    np.testing.assert_allclose(concentration[:, 0, 0, 0], truth, atol=1e-3)


def test_signal_at_zero_is_clipped_and_empty_voxels_are_zero() -> None:
    frames = np.full((10, 1, 1, 2), 500.0, dtype=np.float32)
    frames[5, 0, 0, 0] = 0.0
    frames[:, 0, 0, 1] = 0.0
    concentration = dsc.concentration_dsc(frames, 3, TE)
    assert np.isfinite(concentration).all()
    assert concentration[5, 0, 0, 0] == pytest.approx(-np.log(dsc.MIN_SIGNAL_FRACTION) / TE, rel=1e-5)
    assert not concentration[:, 0, 0, 1].any()


def test_a_series_without_a_bolus_or_without_a_baseline_is_refused() -> None:
    times = np.arange(30) * 1.5
    with pytest.raises(InputError, match="no bolus passage"):
        dsc.baseline_frames(np.full(30, 800.0))
    with pytest.raises(InputError, match="at least 2 frames"):
        dsc.baseline_frames(800.0 * np.exp(-TE * bolus(times, 0.5, 8.0)))


def test_brain_mask_leaves_out_bright_csf() -> None:
    image = np.zeros((3, 40, 40), dtype=np.float32)
    yy, xx = np.mgrid[:40, :40]
    head = (yy - 20) ** 2 + (xx - 20) ** 2 < 15**2
    image[:, head] = 850.0
    ventricle = (yy - 20) ** 2 + (xx - 20) ** 2 < 4**2
    image[:, ventricle] = 1300.0
    brain = dsc.brain_mask_dsc(image, pixel_mm=1.8)
    assert brain[:, 20, 10].all() and not brain[:, 20, 20].any()  # parenchyma in, CSF out
    assert not brain[:, 0, 0].any()


def test_too_few_time_points_is_flagged() -> None:
    assert dsc.too_few_time_points(12) and "12 DSC frames" in dsc.too_few_time_points(12)
    assert dsc.too_few_time_points(50) is None
