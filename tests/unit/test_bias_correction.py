"""The SVD bias correction (calibrated on the study's own AIF) and the TIPS denoising.

Uncorrected, oSVD reads the peak of an exponential residue low (fast flow most) and late; the
correction must bring CBF within 10 % and Tmax within 0.3 s over the MTTs and delays of brain
tissue, noise-free, for every sampling the tests of test_deconvolution.py use.
"""

from __future__ import annotations

import numpy as np
import pytest

from service.perfusion import ctp
from service.perfusion.deconvolution import (
    OSVD_THRESHOLDS,
    apply_bias,
    bias_of,
    calibrate_bias,
    correct_bias,
    deconvolve,
    perfusion_parameters,
)
from service.phantom.haemodynamics import GammaVariate, tissue_curves

AIF = GammaVariate(arrival=5.0, time_to_peak=6.0, alpha=3.0, peak=400.0)
CBF, MTTS, DELAYS = 50.0, (3.0, 4.0, 6.0, 9.0, 12.0), (0.0, 1.3, 2.7, 4.0, 6.5, 8.0)


def _curves(dt: float, n: int, residue: str = "exponential") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    mtt, delay = (a.ravel() for a in np.meshgrid(MTTS, DELAYS, indexing="ij"))
    times = np.arange(n) * dt
    tissue, _ = tissue_curves(times, AIF, np.full(mtt.size, CBF), mtt, delay, residue)
    return tissue, AIF(times), mtt, delay


@pytest.mark.parametrize("dt, n", [(1.0, 60), (1.5, 40), (0.5, 120)])
def test_correction_removes_the_fast_flow_underestimate_and_the_late_tmax(dt: float, n: int) -> None:
    tissue, aif, mtt, delay = _curves(dt, n)
    fit = deconvolve(tissue, aif, dt, "osvd")
    raw = perfusion_parameters(fit, tissue, aif, dt)
    fixed = perfusion_parameters(correct_bias(fit, calibrate_bias(aif, dt, "osvd")), tissue, aif, dt)
    # Uncorrected: fast flow read clearly low, Tmax late (what the correction is for).
    assert np.median(raw.cbf[mtt == 3.0]) < 0.85 * CBF
    assert np.median(raw.tmax - delay) > 0.3
    # Corrected: within 10 % and 0.3 s everywhere; CBV (an area ratio) untouched.
    np.testing.assert_allclose(fixed.cbf, CBF, rtol=0.10)
    np.testing.assert_allclose(fixed.tmax, delay, atol=0.3)
    np.testing.assert_array_equal(fixed.cbv, raw.cbv)


def test_correction_works_for_fixed_thresholds() -> None:
    tissue, aif, _, delay = _curves(1.0, 60)
    for threshold in (0.1, 0.2, 0.3):
        fit = deconvolve(tissue, aif, 1.0, "csvd", threshold=threshold)
        raw = perfusion_parameters(fit, tissue, aif, 1.0)
        fixed = perfusion_parameters(correct_bias(fit, calibrate_bias(aif, 1.0, "csvd", threshold=threshold)), tissue, aif, 1.0)
        assert np.median(np.abs(fixed.cbf / CBF - 1)) < 0.5 * np.median(np.abs(raw.cbf / CBF - 1)), threshold
        assert np.median(np.abs(fixed.cbf / CBF - 1)) < 0.08, threshold
        assert np.median(np.abs(fixed.tmax - delay)) < 0.3, threshold


def test_calibration_is_monotone_and_bias_shrinks_with_mtt() -> None:
    table = calibrate_bias(AIF(np.arange(40) * 1.5), 1.5, "osvd")
    assert table.levels.tolist() == list(OSVD_THRESHOLDS)
    assert (np.diff(table.measured_mtt, axis=1) >= 0).all()
    # More regularisation, more smoothing, more to correct; long MTTs need the least.
    assert (table.flow_ratio[-1] >= table.flow_ratio[0] - 1e-9).all()
    assert (table.flow_ratio[:, 0] > table.flow_ratio[:, -1]).all()


def test_one_flow_factor_per_side_gives_the_true_flow_of_noisy_tissue() -> None:
    """Why the fields are applied separately: per voxel the flow factor follows the noise (the
    threshold oSVD picks varies), so the analysis applies one factor per side of the Tmax
    border and the Tmax lateness as a field. On noisy normal (CBF 50, MTT 4 s) and delayed
    (CBF 25, MTT 8 s, 6.5 s late) tissue that gives each side its true flow and Tmax, and a
    tighter flow than the per-voxel correction."""
    times = np.arange(40) * 1.5
    n = 400
    cbf = np.r_[np.full(n, 50.0), np.full(n, 25.0)]
    mtt = np.r_[np.full(n, 4.0), np.full(n, 8.0)]
    delay = np.r_[np.full(n, 0.5), np.full(n, 6.5)]
    clean, _ = tissue_curves(times, AIF, cbf, mtt, delay)
    noisy = clean + np.random.default_rng(3).normal(0.0, 1.0, clean.shape).astype(np.float32)
    aif = AIF(times)
    fit = deconvolve(noisy, aif, 1.5, "osvd")
    ratio, late = bias_of(fit, calibrate_bias(aif, 1.5))
    sides = [slice(0, n), slice(n, 2 * n)]
    per_side_ratio, per_side_late = ratio.copy(), late.copy()
    for side in sides:
        per_side_ratio[side] = np.exp(np.median(np.log(ratio[side])))
        per_side_late[side] = np.mean(late[side])
    per_side = perfusion_parameters(apply_bias(fit, per_side_ratio, per_side_late), noisy, aif, 1.5)
    per_voxel = perfusion_parameters(correct_bias(fit, calibrate_bias(aif, 1.5)), noisy, aif, 1.5)
    for side in sides:
        assert abs(np.median(per_side.cbf[side]) / cbf[side][0] - 1.0) < 0.12
        assert abs(np.median(per_side.tmax[side]) - delay[side][0]) < 0.75
        assert np.std(per_side.cbf[side]) < np.std(per_voxel.cbf[side])
    assert (apply_bias(fit, np.ones_like(ratio), np.full_like(late, 100.0)).tmax_s == 0).all()  # never negative


# --- edge-preserving denoising ----------------------------------------------------------------


def _two_territories(noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A [T, Z, Y, X] series: left half normal tissue, right half delayed by 6 s; and its truth."""
    times = np.arange(40) * 1.2
    left, _ = tissue_curves(times, AIF, np.array([50.0]), np.array([4.0]), np.array([0.5]))
    right, _ = tissue_curves(times, AIF, np.array([25.0]), np.array([8.0]), np.array([6.5]))
    clean = np.empty((40, 2, 48, 48), dtype=np.float32)
    clean[..., :24] = left[:, 0, None, None, None]
    clean[..., 24:] = right[:, 0, None, None, None]
    noisy = clean + np.random.default_rng(seed).normal(0.0, noise, clean.shape).astype(np.float32)
    mask = np.zeros(clean.shape[1:], dtype=bool)
    mask[:, 4:44, 4:44] = True
    return noisy, clean, mask


def test_tips_keeps_the_border_of_a_delayed_territory_sharp_and_removes_noise() -> None:
    noisy, clean, mask = _two_territories(noise=10.0)
    spacing = (5.0, 0.94, 0.94)
    tips = ctp.denoise_tips(noisy, spacing, mask, sigma_mm=3.0)
    gauss = ctp.denoise(noisy, spacing, mask, sigma_mm=3.0)
    border = mask.copy()
    border[..., :21] = border[..., 27:] = False  # three columns either side of the edge
    flat = mask.copy()
    flat[..., 16:] = False

    def rmse(x: np.ndarray, where: np.ndarray) -> float:
        return float(np.sqrt(np.mean((x - clean)[:, where] ** 2)))

    assert rmse(tips, border) < 0.9 * rmse(gauss, border)  # the edge is kept better
    assert rmse(tips, flat) < 0.3 * rmse(noisy, flat)  # and the noise goes
    np.testing.assert_array_equal(tips[:, ~mask], noisy[:, ~mask])  # outside the mask untouched


def test_block_average_and_expand() -> None:
    data = np.arange(2 * 3 * 4 * 6, dtype=np.float32).reshape(2, 3, 4, 6)
    small = ctp.block_average(data, 2)
    assert small.shape == (2, 3, 2, 3) and small.dtype == np.float32
    assert small[0, 0, 0, 0] == np.mean(data[0, 0, :2, :2])
    assert ctp.block_expand(small[0], 2, (5, 7)).shape == (3, 5, 7)  # odd sizes padded at the edge
    assert ctp.block_average(data, 1) is data
    assert ctp.working_factor((5.0, 0.47, 0.47)) == 2 and ctp.working_factor((5.0, 0.94, 0.94)) == 1
