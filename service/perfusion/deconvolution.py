"""Deconvolution of tissue concentration curves by the arterial input: the residue k(t) = F * R(t).

The indicator-dilution model inverted here (the phantom, ``service.phantom.haemodynamics``,
generates data by the same one)::

    C(t) = (rho / k_H) * CBF / 6000 * (AIF conv R)(t - delay)
    k(t) = (rho / k_H) * CBF / 6000 * R(t - delay)          [1/s]
    CBF  = k_H / rho * 6000 * max k                          [mL/100 g/min]
    CBV  = k_H / rho * 100 * integral C / integral AIF       [mL/100 g]
    MTT  = 60 * CBV / CBF                                    [s]
    Tmax = time of max k                                     [s]

``C`` and ``AIF`` share units (HU for CT, dR2* in 1/s for MR) and have their baselines removed.
Curves are arrays ``(n_time, n_voxels)`` sampled on one uniform grid of step ``dt`` seconds
(``resample_uniform`` brings non-uniform acquisitions onto one).

Methods
-------
``"svd"``
    Standard truncated SVD of the lower-triangular (causal) convolution matrix, singular values
    below ``threshold`` (relative to the largest, 0.2 by default) dropped (Ostergaard 1996).
    Sensitive to tissue delay: the CBF of late-arriving tissue is underestimated.
``"csvd"``
    The block-circulant matrix of the AIF zero-padded to 2N samples, fixed relative threshold
    (0.1 by default) (Wu 2003). Insensitive to delay; Tmax is read with wrap-around.
``"osvd"``
    The block-circulant matrix with the threshold chosen per voxel: thresholds from low to high
    regularisation, the first whose residue has an oscillation index ``OI <= oi_target``
    (0.095 by default) is kept (Wu 2003). The default.

The convolution is discretised with ``k`` constant on each sampling interval and the AIF linear
between samples: ``C[i] = sum_j B[i - j] k[j]``, ``B[m] = dt * (AIF[m] + AIF[m - 1]) / 2``. Every
method is vectorised over voxels: one SVD of the AIF matrix, then matrix products over blocks of
voxels (no loop over voxels).

Known biases (noise-free phantom curves; tests/unit/test_deconvolution.py pins them): truncation
smooths k, so the peak of a residue that jumps at arrival and decays (exponential) is read low
and late: oSVD CBF about 0.75x the truth at MTT 3 s, 0.9x at 6 s, 1.0x at 12 s, Tmax 0.5-1.3 s
late. A flat-topped (boxcar) residue rings: CBF reads 1.1-1.35x, and Tmax lands anywhere on the
plateau, between the delay and the delay plus MTT. Noise raises oSVD's threshold and deepens the
underestimate of fast flow. CBV is a ratio of areas and needs the acquisition to cover the bolus
passage.

Bias correction
---------------
``calibrate_bias`` measures these biases for one study: noise-free exponential-residue curves
made with the study's own AIF (MTT 2-25 s, delays 0-12 s in 0.25 s steps) are deconvolved with
every threshold, giving per threshold the measured ``area / peak`` against the true MTT, the
peak's true / measured ratio and Tmax's lateness. ``bias_of`` looks each voxel up by the
threshold oSVD chose for it and its measured ``area / peak``; ``apply_bias`` multiplies the flow
and moves Tmax earlier. Noise-free it brings CBF within 10 % and Tmax within 0.3 s for MTT 3-12 s
and delays 0-8 s (tests/unit/test_bias_correction.py). A boxcar residue, read high, is not helped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from scipy.interpolate import PchipInterpolator
from scipy.stats import gamma as gamma_distribution

from threadpoolctl import threadpool_limits

RHO = 1.04
"""Brain tissue density, g/mL (the phantom uses the same value)."""
K_H = 0.73
"""Large-to-small-vessel haematocrit correction (the phantom uses the same value)."""

METHODS = ("svd", "csvd", "osvd")
DEFAULT_THRESHOLD = {"svd": 0.2, "csvd": 0.1}
"""Relative singular-value threshold of the fixed-threshold methods."""
OSVD_THRESHOLDS = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.65)
"""Relative thresholds oSVD tries, low to high regularisation."""
OI_TARGET = 0.095
"""Oscillation index oSVD accepts (Wu 2003)."""

_BLOCK = 16384  # voxels per matrix product: bounds the working memory


@dataclass(frozen=True)
class ResidueFit:
    """The deconvolved residue of each voxel, summarised.

    All per-voxel arrays are float64 with shape ``(n_voxels,)``.

    Attributes
    ----------
    flow_scaled:
        ``max k``, 1/s: ``(rho / k_H) * CBF / 6000`` in the model. The vertex of the parabola
        through the largest sample and its neighbours, so a peak between samples is not read low.
    tmax_s:
        Time of ``max k`` after the AIF's time origin, s, refined to a fraction of a sample by a
        parabola through the peak and its neighbours. In ``[0, N * dt)``; for the block-circulant
        methods a peak in the wrapped half (tissue ahead of the AIF) reads 0.
    area:
        ``integral k dt``, dimensionless: ``(rho / k_H) * CBV / 100`` in the model.
    threshold:
        Relative singular-value threshold used for each voxel.
    oscillation_index:
        Wu's oscillation index of the chosen residue (``sum |second difference| / (L * max k)``).
    residue:
        ``k`` itself, shape ``(L, n_voxels)``, 1/s, sampled every ``dt`` from 0 (``L = N`` for
        ``"svd"``, ``2N`` for the block-circulant methods); None unless asked for.
    dt:
        Sampling interval, s.
    method:
        The method that produced the fit.
    """

    flow_scaled: np.ndarray
    tmax_s: np.ndarray
    area: np.ndarray
    threshold: np.ndarray
    oscillation_index: np.ndarray
    residue: np.ndarray | None
    dt: float
    method: str


@dataclass(frozen=True)
class PerfusionParameters:
    """Perfusion maps of a set of voxels, each float64 ``(n_voxels,)``.

    ``cbf`` in mL/100 g/min, ``cbv`` in mL/100 g, ``mtt`` and ``tmax`` in s. MTT is 0 where CBF
    is not positive.
    """

    cbf: np.ndarray
    cbv: np.ndarray
    mtt: np.ndarray
    tmax: np.ndarray


def deconvolve(
    concentration: np.ndarray,
    aif: np.ndarray,
    dt: float,
    method: str = "osvd",
    *,
    threshold: float | None = None,
    thresholds: Sequence[float] = OSVD_THRESHOLDS,
    oi_target: float = OI_TARGET,
    return_residue: bool = False,
) -> ResidueFit:
    """Deconvolve tissue curves by the arterial input; see the module docstring for the model.

    Parameters
    ----------
    concentration:
        ``(n_time, n_voxels)`` tissue concentration, baseline subtracted, any real dtype.
    aif:
        ``(n_time,)`` arterial concentration in the same units, baseline subtracted.
    dt:
        Uniform sampling interval, s.
    method:
        ``"svd"``, ``"csvd"`` or ``"osvd"``.
    threshold:
        Relative singular-value threshold of ``"svd"`` and ``"csvd"`` (in (0, 1)); default
        ``DEFAULT_THRESHOLD[method]``. ``"osvd"`` takes ``thresholds`` instead.
    thresholds, oi_target:
        ``"osvd"``: the relative thresholds to try, in order (low to high regularisation), and
        the oscillation index to accept. A voxel that meets none gets the last threshold.
    return_residue:
        Keep the full ``k(t)`` in ``ResidueFit.residue``.

    Returns
    -------
    ``ResidueFit``; voxels whose curve is all zero get ``flow_scaled = area = 0`` and ``tmax_s = 0``.
    """
    # float32 curves are deconvolved in float32 (half the memory traffic; the noise of CT
    # curves is far above its round-off), anything else in float64.
    work = np.float32 if np.asarray(concentration).dtype == np.float32 else np.float64
    conc = np.asarray(concentration, dtype=work)
    arterial = np.asarray(aif, dtype=np.float64)
    if conc.ndim != 2:
        raise ValueError(f"concentration must be (n_time, n_voxels), got shape {conc.shape}")
    if arterial.ndim != 1 or arterial.shape[0] != conc.shape[0]:
        raise ValueError(f"aif must be (n_time,) = ({conc.shape[0]},), got shape {arterial.shape}")
    if conc.shape[0] < 3:
        raise ValueError(f"need at least 3 time points, got {conc.shape[0]}")
    if not (np.isfinite(dt) and dt > 0):
        raise ValueError(f"dt must be a positive number of seconds, got {dt}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not np.isfinite(arterial).all():
        raise ValueError("aif has non-finite values")
    if not (arterial > 0).any():
        raise ValueError("aif has no positive signal (is the baseline subtracted, the sign right?)")
    if not np.isfinite(conc).all():
        raise ValueError("concentration has non-finite values")
    if method == "osvd":
        if threshold is not None:
            raise ValueError("osvd chooses its threshold per voxel: pass thresholds=..., not threshold=")
        levels = np.asarray(thresholds, dtype=np.float64)
        if levels.ndim != 1 or levels.size == 0 or not ((levels > 0) & (levels < 1)).all():
            raise ValueError(f"thresholds must be a non-empty sequence in (0, 1), got {thresholds!r}")
        if not oi_target > 0:
            raise ValueError(f"oi_target must be positive, got {oi_target}")
    else:
        level = DEFAULT_THRESHOLD[method] if threshold is None else float(threshold)
        if not 0 < level < 1:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        levels = np.array([level])

    n_time, n_voxels = conc.shape
    circulant = method != "svd"
    matrix = _convolution_matrix(arterial, dt, circulant)
    with single_threaded_lapack():
        u, s, vt = np.linalg.svd(matrix)
    # k = pinv_r(matrix) @ c, c zero-padded for the circulant methods: only the first n_time
    # columns of the pseudo-inverse meet data.
    inverses = [_truncated_inverse(u, s, vt, level)[:, :n_time].astype(work) for level in levels]
    length = matrix.shape[0]

    flow = np.zeros(n_voxels)
    tmax = np.zeros(n_voxels)
    area = np.zeros(n_voxels)
    used = np.zeros(n_voxels)
    oscillation = np.zeros(n_voxels)
    residue = np.zeros((length, n_voxels)) if return_residue else None
    for start in range(0, n_voxels, _BLOCK):
        part = slice(start, min(start + _BLOCK, n_voxels))
        k, index, oi = _select(inverses, conc[:, part], oi_target)
        flow[part], position = _peak(k, n_time, circulant)
        tmax[part] = position * dt
        area[part] = k.sum(axis=0, dtype=np.float64) * dt
        used[part] = levels[index]
        oscillation[part] = oi
        if residue is not None:
            residue[:, part] = k
    return ResidueFit(flow, tmax, area, used, oscillation, residue, float(dt), method)


def perfusion_parameters(fit: ResidueFit, concentration: np.ndarray, aif: np.ndarray, dt: float) -> PerfusionParameters:
    """CBF, CBV, MTT and Tmax of each voxel from a fit and the curves it was fitted to.

    ``concentration`` ``(n_time, n_voxels)`` and ``aif`` ``(n_time,)`` as given to ``deconvolve``.
    CBV is model-free: the ratio of the curves' areas (trapezoid rule), so it does not depend on
    the regularisation; CBF comes from ``max k`` and so carries the method's smoothing bias.
    """
    conc = np.asarray(concentration, dtype=np.float64)
    arterial = np.asarray(aif, dtype=np.float64)
    if conc.ndim != 2 or arterial.shape != (conc.shape[0],):
        raise ValueError(f"need concentration (n_time, n_voxels) and aif (n_time,), got {conc.shape} and {arterial.shape}")
    if conc.shape[1] != fit.flow_scaled.shape[0]:
        raise ValueError(f"fit has {fit.flow_scaled.shape[0]} voxels, concentration {conc.shape[1]}")
    if not (np.isfinite(dt) and dt > 0):
        raise ValueError(f"dt must be a positive number of seconds, got {dt}")
    aif_area = np.trapezoid(arterial, dx=dt)
    if not aif_area > 0:
        raise ValueError(f"aif must have a positive area, got {aif_area}")
    cbf = K_H / RHO * 6000.0 * fit.flow_scaled
    cbv = K_H / RHO * 100.0 * np.trapezoid(conc, dx=dt, axis=0) / aif_area
    return PerfusionParameters(cbf, cbv, mean_transit_time(cbf, cbv), fit.tmax_s.copy())


def mean_transit_time(cbf: np.ndarray, cbv: np.ndarray) -> np.ndarray:
    """MTT in s = CBV / CBF (central volume principle; mL/100 g over mL/100 g/min), 0 where CBF is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(cbf > 0, 60.0 * cbv / cbf, 0.0)


def resample_uniform(times: np.ndarray, curves: np.ndarray, dt: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation of curves sampled at increasing ``times`` onto a uniform grid.

    ``times`` ``(n_time,)`` in s; ``curves`` ``(n_time, ...)`` (time first, any trailing shape).
    ``dt`` defaults to the median sampling interval. The grid runs from ``times[0]`` in steps of
    ``dt`` up to ``times[-1]``. Returns ``(grid (n_grid,), curves (n_grid, ...))``, float64.
    """
    t = np.asarray(times, dtype=np.float64)
    values = np.asarray(curves, dtype=np.float64)
    if t.ndim != 1 or t.size < 2:
        raise ValueError(f"times must be 1-D with at least 2 points, got shape {t.shape}")
    if values.ndim < 1 or values.shape[0] != t.size:
        raise ValueError(f"curves must have time first, {t.size} points, got shape {values.shape}")
    steps = np.diff(t)
    if not (np.isfinite(t).all() and (steps > 0).all()):
        raise ValueError("times must be finite and strictly increasing")
    step = float(np.median(steps)) if dt is None else float(dt)
    if not (np.isfinite(step) and step > 0):
        raise ValueError(f"dt must be a positive number of seconds, got {dt}")
    grid = t[0] + step * np.arange(int(np.floor((t[-1] - t[0]) / step + 1e-9)) + 1)
    right = np.clip(np.searchsorted(t, grid, side="right"), 1, t.size - 1)
    weight = (grid - t[right - 1]) / (t[right] - t[right - 1])
    weight = weight.reshape((-1,) + (1,) * (values.ndim - 1))
    return grid, values[right - 1] + weight * (values[right] - values[right - 1])


@contextmanager
def single_threaded_lapack() -> Iterator[None]:
    """Run small LAPACK factorisations on one thread: OpenBLAS's threaded SVD of an 80 x 80
    matrix took 150 ms instead of 1 ms on a loaded 2-core machine (measured)."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _convolution_matrix(aif: np.ndarray, dt: float, circulant: bool) -> np.ndarray:
    """``B[i - j]``, ``B[m] = dt * (AIF[m] + AIF[m - 1]) / 2``: lower-triangular (N, N), or circulant
    (2N, 2N) over the AIF zero-padded to 2N.

    ``B[m]`` is the integral of the AIF, linear between samples, over one sampling interval: the
    exact weight of a residue that is constant on each interval ``[j dt, (j + 1) dt)``. So ``k[j]``
    is the mean of k over that interval, and a residue that jumps at the arrival time (both
    model shapes do) is not smeared back by half a sample as the centred rectangle rule does.
    """
    n = aif.size
    size = 2 * n if circulant else n
    padded = np.concatenate([aif, np.zeros(size - n)])
    kernel = dt * (padded + np.concatenate([[0.0], padded[:-1]])) / 2.0
    index = np.arange(size)[:, None] - np.arange(size)[None, :]
    if circulant:
        return kernel[index % size]
    return np.where(index >= 0, kernel[np.clip(index, 0, None)], 0.0)


def _truncated_inverse(u: np.ndarray, s: np.ndarray, vt: np.ndarray, level: float) -> np.ndarray:
    """Pseudo-inverse keeping the singular values at or above ``level * max``."""
    keep = s >= level * s[0]
    return (vt[keep].T / s[keep]) @ u[:, keep].T


def _oscillation_index(k: np.ndarray) -> np.ndarray:
    """Wu's OI per column of ``k`` (L, n): ``sum |k[t] - 2 k[t-1] + k[t-2]| / (L * max k)``."""
    second = np.abs(k[2:] - 2.0 * k[1:-1] + k[:-2]).sum(axis=0)
    peak = k.max(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(peak > 0, second / (k.shape[0] * peak), 0.0)


def _select(inverses: list[np.ndarray], conc: np.ndarray, oi_target: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Residues of a block of voxels with the first inverse whose OI meets the target.

    Returns ``(k (L, n), index of the inverse used (n,), its OI (n,))``. With one inverse, that one.
    Each further inverse is applied only to the voxels still pending.
    """
    n = conc.shape[1]
    chosen = inverses[0] @ conc
    index = np.zeros(n, dtype=np.int64)
    oi = _oscillation_index(chosen)
    if len(inverses) == 1:
        return chosen, index, oi
    pending = np.flatnonzero(oi > oi_target)
    for i, inverse in enumerate(inverses[1:], start=1):
        if pending.size == 0:
            break
        k = inverse @ conc[:, pending]
        k_oi = _oscillation_index(k)
        take = (k_oi <= oi_target) | (i == len(inverses) - 1)
        columns = pending[take]
        chosen[:, columns] = k[:, take]
        index[columns] = i
        oi[columns] = k_oi[take]
        pending = pending[~take]
    return chosen, index, oi


def _peak(k: np.ndarray, n_time: int, circulant: bool) -> tuple[np.ndarray, np.ndarray]:
    """Height and position (in samples) of each column's maximum, refined by a parabola through
    the peak sample and its neighbours (circular neighbours for circulant k). Positions in the
    wrapped half of a circulant k (negative delays) are clipped to 0; all are in [0, n_time)."""
    length = k.shape[0]
    columns = np.arange(k.shape[1])
    peak_at = np.argmax(k, axis=0)
    centre = k[peak_at, columns].astype(np.float64)  # the vertex in float64 whatever k's type
    if circulant:
        before = k[(peak_at - 1) % length, columns].astype(np.float64)
        after = k[(peak_at + 1) % length, columns].astype(np.float64)
        inside = np.ones(peak_at.shape, dtype=bool)
    else:
        before = k[np.clip(peak_at - 1, 0, length - 1), columns].astype(np.float64)
        after = k[np.clip(peak_at + 1, 0, length - 1), columns].astype(np.float64)
        inside = (peak_at > 0) & (peak_at < length - 1)
    curvature = before - 2.0 * centre + after
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.where(inside & (curvature < 0), 0.5 * (before - after) / curvature, 0.0)
    shift = np.clip(shift, -0.5, 0.5)
    height = centre - 0.25 * (before - after) * shift  # the parabola's vertex
    position = peak_at + shift
    if circulant:
        position = np.where(position >= n_time, position - length, position)
    return height, np.clip(position, 0.0, np.nextafter(n_time, 0))


# --- correction of the SVD biases, calibrated per study on the study's own AIF ---

CALIBRATION_MTT_S = tuple(np.geomspace(2.0, 25.0, 24))
"""True MTTs (s) of the calibration curves (brain tissue: about 3-20 s). A voxel read shorter than
the shortest gets that one's correction, not an extrapolation."""
CALIBRATION_DELAY_S = tuple(np.arange(0.0, 12.01, 0.25))
"""Delays (s) of the calibration curves: every sub-sample phase of a 0.5-2 s sampling."""


@dataclass(frozen=True)
class BiasCorrection:
    """How a deconvolution reads the peak flow and Tmax of exponential residues, per threshold.

    For each relative threshold in ``levels`` and each true MTT of the calibration, averaged
    over delays: the measured ``area / peak`` (an MTT estimate, s; increasing along the last
    axis), the ratio true / measured peak flow, and the measured minus true Tmax (s). Arrays
    ``(n_levels, n_mtt)``.
    """

    levels: np.ndarray
    measured_mtt: np.ndarray
    flow_ratio: np.ndarray
    tmax_bias: np.ndarray


def calibrate_bias(
    aif: np.ndarray,
    dt: float,
    method: str = "osvd",
    *,
    thresholds: Sequence[float] = OSVD_THRESHOLDS,
    threshold: float | None = None,
    mtts: Sequence[float] = CALIBRATION_MTT_S,
    delays: Sequence[float] = CALIBRATION_DELAY_S,
) -> BiasCorrection:
    """Deconvolve noise-free curves made with this study's AIF at every threshold of ``method``.

    Truncating the small singular values smooths the residue: a residue that jumps at arrival
    and decays (the exponential of indicator-dilution theory) is read with a lower, later peak,
    the more so the shorter the MTT and the higher the threshold. The size of this bias depends
    on the AIF's shape and the sampling, so it is measured on the study's own AIF: tissue curves
    ``AIF conv F exp(-t/MTT)`` shifted by each delay (integrated on a
    grid 20 times finer than the sampling, monotone-cubic between samples), deconvolved with
    each fixed threshold.
    """
    arterial = np.asarray(aif, dtype=np.float64)
    n = arterial.size
    times = np.arange(n) * dt
    fine_dt = dt / 20.0
    fine = np.arange(0.0, times[-1] + fine_dt / 2, fine_dt)
    # A monotone cubic through the samples: the bolus peak between two samples is not cut flat
    # as linear interpolation would (that made the correction overshoot by 10-15 % at 1.5 s).
    fine_aif = np.clip(PchipInterpolator(times, arterial)(fine), 0.0, None)
    mtt = np.asarray(mtts, dtype=np.float64)
    delay = np.asarray(delays, dtype=np.float64)
    flow = 0.01  # 1/s; the bias is relative, the value does not matter
    curves = np.empty((n, mtt.size, delay.size))
    for i, m in enumerate(mtt):
        c0 = np.convolve(fine_aif, flow * np.exp(-fine / m))[: fine.size] * fine_dt
        for j, d in enumerate(delay):
            curves[:, i, j] = np.interp(times - d, fine, c0, left=0.0)
    flat = curves.reshape(n, -1)
    if method == "osvd":
        levels = np.asarray(thresholds, dtype=np.float64)
    else:
        levels = np.array([DEFAULT_THRESHOLD[method] if threshold is None else float(threshold)])
    measured_mtt = np.empty((levels.size, mtt.size))
    ratio = np.empty_like(measured_mtt)
    bias = np.empty_like(measured_mtt)
    fixed = "csvd" if method == "osvd" else method
    for k, level in enumerate(levels):
        fit = deconvolve(flat, arterial, dt, fixed, threshold=level)
        peak = fit.flow_scaled.reshape(mtt.size, delay.size)
        area = fit.area.reshape(mtt.size, delay.size)
        tmax = fit.tmax_s.reshape(mtt.size, delay.size)
        measured_mtt[k] = np.median(area / np.maximum(peak, 1e-12), axis=1)
        ratio[k] = np.median(flow / np.maximum(peak, 1e-12), axis=1)
        bias[k] = np.median(tmax - delay[None, :], axis=1)
        # Keep the lookup monotone in the measured MTT (it is, bar round-off at long MTTs).
        measured_mtt[k] = np.maximum.accumulate(measured_mtt[k] + np.arange(mtt.size) * 1e-9)
    return BiasCorrection(levels, measured_mtt, ratio, bias)


def bias_of(fit: ResidueFit, correction: BiasCorrection) -> tuple[np.ndarray, np.ndarray]:
    """Per voxel: the factor (true / measured peak flow) and the lateness of Tmax (s) that the
    calibration gives for the voxel's threshold (the nearest level) and measured ``area / peak``.

    Both are noisy where the fit is (the threshold oSVD picks and the measured MTT vary from
    voxel to voxel with the noise); the bias itself varies slowly across tissue, so callers
    with images smooth them before ``apply_bias`` (``service.analysis.ctp_perfusion``).
    """
    level = np.abs(np.log(fit.threshold[:, None]) - np.log(correction.levels[None, :])).argmin(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        measured = np.where(fit.flow_scaled > 0, fit.area / fit.flow_scaled, 0.0)
    ratio = np.ones_like(measured)
    late = np.zeros_like(measured)
    for k in np.unique(level):
        pick = level == k
        ratio[pick] = np.interp(measured[pick], correction.measured_mtt[k], correction.flow_ratio[k])
        late[pick] = np.interp(measured[pick], correction.measured_mtt[k], correction.tmax_bias[k])
    return ratio, late


def apply_bias(fit: ResidueFit, ratio: np.ndarray, late: np.ndarray) -> ResidueFit:
    """The fit with its peak flow multiplied by ``ratio`` and its Tmax moved earlier by ``late``
    (never below 0); the area (CBV) is unbiased and unchanged."""
    return ResidueFit(fit.flow_scaled * ratio, np.clip(fit.tmax_s - late, 0.0, None), fit.area, fit.threshold,
                      fit.oscillation_index, fit.residue, fit.dt, fit.method)


def correct_bias(fit: ResidueFit, correction: BiasCorrection) -> ResidueFit:
    """The fit with each voxel's own bias (``bias_of``) removed, without spatial smoothing.

    Calibrated on exponential residues: a flat-topped (boxcar) residue, which SVD reads high
    rather than low, comes out higher still.
    """
    return apply_bias(fit, *bias_of(fit, correction))


MODEL_MTT_S = tuple(np.geomspace(1.0, 30.0, 48))
"""The MTTs (s) of the residues the model fit chooses among."""
MODEL_DELAY_STEP_S = 0.5
"""Spacing of the bolus delays (s) it chooses among, from 0 to the scan's last third."""
RESIDUE_SHAPES = (1.0, 2.0, 4.0, 8.0, float("inf"))
"""Transit-time distributions the shape-agnostic fit chooses among, by gamma shape ``k``: the
residue is the gamma survival function of mean MTT, ``k = 1`` the exponential (a well-mixed
compartment), larger ``k`` narrower transit times, ``inf`` the box (plug flow, every transit
time equal to the MTT)."""
SHAPE_MARGIN = 0.01
"""How much less summed residual (relative) another residue shape must leave on a study's patches
than the exponential to be chosen: above what noise gives other shapes on exponential-residue
tissue of the tuning families, below what a box or gamma residue gives them
(benchmarks/residue_shape.py; the README has the figures)."""
MODEL_SHAPE_MTT_S = tuple(np.geomspace(1.0, 30.0, 24))
"""The MTTs (s) of the residue family fit: half the exponential grid's density (5 %/step is below
the noise of one voxel's MTT), so that five shapes cost 2.5 times one."""


def residue_function(shape_k: float, mtt_s: float, t: np.ndarray) -> np.ndarray:
    """The residue R(t) (R(0) = 1, mean transit time ``mtt_s``) of gamma shape ``shape_k``
    (``inf``: the box)."""
    if not shape_k > 0:
        raise ValueError(f"residue shape must be positive, got {shape_k}")
    if np.isinf(shape_k):
        return (t < mtt_s).astype(np.float64)
    return gamma_distribution.sf(t, shape_k, scale=mtt_s / shape_k)


@dataclass(frozen=True)
class ModelFit:
    """The residue ``F R(t - delay)`` (from ``delay`` on, R(0) = 1) that fits each voxel's curve
    best in least squares; float64 ``(n_voxels,)`` each. ``flow_scaled`` is ``F``, 1/s, as
    ``ResidueFit.flow_scaled``; ``shape_k`` the gamma shape of R (1: exponential, inf: box);
    ``residual`` the sum of squared residuals of the fit (the curve's units squared)."""

    flow_scaled: np.ndarray
    delay_s: np.ndarray
    mtt_s: np.ndarray
    shape_k: np.ndarray
    residual: np.ndarray


def fit_exponential_residue(
    concentration: np.ndarray,
    aif: np.ndarray,
    dt: float,
    *,
    mtts: Sequence[float] = MODEL_MTT_S,
    delay_step_s: float = MODEL_DELAY_STEP_S,
) -> ModelFit:
    """Fit ``AIF conv F exp(-(t - delay)/MTT)`` to each curve (``fit_residue`` with the one shape)."""
    return fit_residue(concentration, aif, dt, shapes=(1.0,), mtts=mtts, delay_step_s=delay_step_s)


def fit_residue(
    concentration: np.ndarray,
    aif: np.ndarray,
    dt: float,
    *,
    shapes: Sequence[float] = RESIDUE_SHAPES,
    mtts: Sequence[float] = MODEL_SHAPE_MTT_S,
    delay_step_s: float = MODEL_DELAY_STEP_S,
) -> ModelFit:
    """Fit ``AIF conv F R_k(t - delay; MTT)`` to each curve over a grid of residue shapes, MTTs
    and delays, the flow ``F`` by linear least squares for each, the one of least residual kept.

    Where SVD reads low flows high (noise lifts the peak of a deconvolved residue that is small
    and flat), the model's flow is the amplitude of a whole fitted curve, which noise moves up
    and down alike. Its MTT holds whatever the shape of the transit-time distribution, where an
    exponential fitted to a narrower one (a box, a gamma) reads it short (CBV / MTT 1.2-2.5 times
    the flow: benchmarks/residue_shape.py). The model curves are made as in ``calibrate_bias``
    (AIF monotone-cubic on a grid 20 times finer than the sampling). ``concentration``
    ``(n_time, n_voxels)`` and ``aif`` ``(n_time,)`` on a uniform grid of ``dt`` s, as for
    ``deconvolve``.
    """
    conc = np.asarray(concentration)
    arterial = np.asarray(aif, dtype=np.float64)
    if conc.ndim != 2 or arterial.shape != (conc.shape[0],):
        raise ValueError(f"need concentration (n_time, n_voxels) and aif (n_time,), got {conc.shape} and {arterial.shape}")
    if not (np.isfinite(dt) and dt > 0):
        raise ValueError(f"dt must be a positive number of seconds, got {dt}")
    n = arterial.size
    # The models on the sampling interval to the millisecond: acquisition times read back from
    # DICOM (rounded to the microsecond) then choose the same model for the same curves.
    dt = max(round(float(dt), 3), 1e-3)
    times = np.arange(n) * dt
    fine_dt = dt / 20.0
    fine = np.arange(0.0, times[-1] + fine_dt / 2, fine_dt)
    fine_aif = np.clip(PchipInterpolator(times, arterial)(fine), 0.0, None)
    shape = np.asarray(shapes, dtype=np.float64)
    mtt = np.asarray(mtts, dtype=np.float64)
    delay = np.arange(0.0, max(times[-1] * 2.0 / 3.0, delay_step_s), delay_step_s)
    models = np.empty((n, shape.size, mtt.size, delay.size))
    for h, k in enumerate(shape):
        for i, m in enumerate(mtt):
            c0 = np.convolve(fine_aif, residue_function(k, m, fine))[: fine.size] * fine_dt
            for j, d in enumerate(delay):
                models[:, h, i, j] = np.interp(times - d, fine, c0, left=0.0)
    basis = models.reshape(n, -1)
    energy = np.einsum("tm,tm->m", basis, basis)
    usable = energy > 1e-12 * energy.max()
    basis, energy = basis[:, usable], energy[usable]
    triples = np.stack(np.meshgrid(shape, mtt, delay, indexing="ij"), axis=-1).reshape(-1, 3)[usable]
    # Unit-energy models: the residual of each is |c|^2 - projection^2, so the best model is the
    # one of largest positive projection.
    unit = (basis / np.sqrt(energy)).astype(np.float32)
    n_voxels = conc.shape[1]
    flow, best_delay, best_mtt, best_shape, residual = (np.zeros(n_voxels) for _ in range(5))
    block = _BLOCK // 4
    for start in range(0, n_voxels, block):
        part = slice(start, min(start + block, n_voxels))
        block_curves = conc[:, part].T.astype(np.float32)
        projection = block_curves @ unit  # (voxels, models)
        best = np.argmax(projection, axis=1)
        top = projection[np.arange(best.size), best].astype(np.float64)
        residual[part] = np.einsum("vt,vt->v", block_curves, block_curves, dtype=np.float64) - np.clip(top, 0.0, None) ** 2
        flow[part] = np.clip(top / np.sqrt(energy[best]), 0.0, None)
        best_shape[part], best_mtt[part], best_delay[part] = triples[best, 0], triples[best, 1], triples[best, 2]
    return ModelFit(flow, best_delay, best_mtt, best_shape, np.clip(residual, 0.0, None))


def choose_residue_shape(pooled: np.ndarray, aif: np.ndarray, dt: float, *, shapes: Sequence[float] = RESIDUE_SHAPES,
                         margin: float = SHAPE_MARGIN) -> float:
    """The residue shape (gamma ``k``; inf: box) whose best fits leave the least summed residual
    over ``pooled`` curves ``(n_time, n_curves)``, each the mean curve of a small patch of tissue;
    the exponential (k 1, when among ``shapes``) unless another leaves ``margin`` (relative) less.

    One voxel's curve is too noisy to tell the shapes apart: choosing per voxel among five
    shapes fitted the noise and read an exponential residue's MTT long (its flow 5-10 % low at
    10 HU); a patch's mean curve is a few times less noisy, and the shape is one for the study.
    Where the patches cannot tell the shapes apart the exponential stays, on which the bias
    correction and the low-flow table are calibrated.
    """
    if not len(shapes):
        raise ValueError("need at least one residue shape")
    totals = np.array([float(np.sum(fit_residue(pooled, aif, dt, shapes=(k,)).residual)) for k in shapes])
    best = int(np.argmin(totals))
    if 1.0 in shapes and totals[best] > (1.0 - margin) * totals[list(shapes).index(1.0)]:
        return 1.0
    return float(shapes[best])
