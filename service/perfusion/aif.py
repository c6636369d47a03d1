"""Automatic arterial input (AIF) and venous output (VOF) selection from concentration curves.

Input contract: ``concentration`` is ``[time, slice, row, column]`` (``(T, Z, Y, X)``), any real
dtype, baseline already subtracted (HU for CT, dR2* in 1/s for MR); ``times`` ``(T,)`` in s,
strictly increasing (need not be uniform); ``mask`` bool ``(Z, Y, X)``: where vessels may be
looked for (the head inside the skull, or the brain with the large vessels). Only voxels in the
mask are considered.

Per-voxel features are read from the curve lightly smoothed in time (a [1, 2, 1] / 4 kernel):
peak height, time to peak (TTP, from ``times[0]``), full width at half maximum (FWHM, linear
interpolation of the half-maximum crossings) and the area (trapezoid rule, unsmoothed curve).
Noise is the RMS second difference divided by sqrt(6) (equal to sigma for white noise on a
smooth curve).

AIF (``select_aif``)
    1. Reject curves with non-positive area or peak, noisy curves (noise / peak above
       ``max_roughness``) and curves whose peak is within ``min_snr`` noise levels of zero.
    2. Score the rest ``peak / (TTP * FWHM)``: high, early and narrow wins (arteries beat
       partial-volume arteries, which are low, and veins, which are late and wide).
    3. Take a pool of the ``pool`` best scores; drop pool members whose peak is below
       ``min_relative_peak`` of the pool's 90th-percentile peak (partial volume).
    4. Shape consistency: the peak-normalised median of the ``n`` best remaining curves is the
       reference shape; curves that correlate below ``min_correlation`` with it are dropped,
       and the reference is rebuilt from the ``n`` best survivors (three rounds). This removes
       venous and odd curves that scored high by chance.
    5. The AIF is the mean of the ``n`` best-scoring surviving (unsmoothed) curves.

VOF (``select_vof``)
    Same rejection of noisy curves; candidates must peak at least one sampling interval after
    the AIF; the largest areas win (a large vein, the sagittal sinus, is the least partial-
    volumed vessel of the scan), with the same shape-consistency step; mean of the best ``n``.
    Candidates are ranked by the mean area over their 3 x 3 in-plane neighbourhood, not by
    their own area: ranking by a voxel's own noisy area picks the curves whose noise happened
    to add area, and the VOF then reads high (on the phantom +5-10 % at 10 HU noise, up to
    +22 % at 20 HU); the neighbourhood's noise is mostly independent of the chosen curves'
    own, and it favours the inside of large veins.

Partial volume (``partial_volume_scale``)
    A small artery is partial-volumed, a large vein much less so, and the area under the first
    pass is the same in both (the same indicator passes through). So ``area(VOF) / area(AIF)``,
    when above 1, is the factor by which the AIF's amplitude is too low. Areas come from a
    gamma-variate fit of the first pass (it extrapolates a truncated tail and leaves out
    recirculation), or the trapezoid rule when the fit fails.

Errors: shapes and parameters that are wrong raise ``ValueError``; data in which no usable
vessel curve is found raise ``service.errors.InputError`` with the reason (the study then fails
with that reason rather than being analysed with a meaningless input function).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage
from scipy.optimize import OptimizeWarning, curve_fit
from scipy.special import gamma as gamma_function

from service.errors import InputError

LOW_AIF_PEAK_HU = 100.0
"""QC: an AIF peak below this (in HU) suggests partial volume or a poor bolus."""
LATE_FRACTION = 0.6
"""QC: an AIF whose peak comes after this fraction of the acquisition is 'late'."""
TRUNCATED_FRACTION = 0.3
"""QC: a curve whose last sample is above this fraction of its peak did not return to baseline."""

_BLOCK = 32768  # voxels per block of feature computation

FLAG_LOW_PEAK = "low AIF peak"
FLAG_LATE = "late AIF"
FLAG_TRUNCATED = "AIF truncated"
FLAG_VOF_TRUNCATED = "VOF truncated"


@dataclass(frozen=True)
class VesselSelection:
    """An input (AIF) or output (VOF) curve chosen from the voxels of a series.

    Attributes
    ----------
    curve:
        ``(T,)`` float64, the mean of the chosen voxels' curves, in the concentration's units.
    voxels:
        ``(n, 3)`` int64, ``[slice, row, column]`` indices of the chosen voxels, best first.
    score:
        Mean selection score of the chosen voxels: ``peak / (TTP * FWHM)`` (units/s^2) for an
        AIF, 3 x 3 in-plane neighbourhood mean area (units * s) for a VOF. Comparable between voxels of one series only.
    consistency:
        Mean Pearson correlation of the chosen voxels' curves with ``curve`` (0..1).
    peak:
        Height of the maximum of ``curve`` smoothed by [1, 2, 1] / 4 in time, concentration
        units (a little below the raw maximum of a sharp bolus, but not inflated by noise).
    time_to_peak:
        Time of that maximum after ``times[0]``, s.
    fwhm:
        Full width at half maximum of ``curve``, s (to the end of the scan when it never
        falls back below half).
    qc_flags:
        Human-readable warnings (``FLAG_*``); empty when none.
    """

    curve: np.ndarray
    voxels: np.ndarray
    score: float
    consistency: float
    peak: float
    time_to_peak: float
    fwhm: float
    qc_flags: tuple[str, ...]


AifSelection = VesselSelection
"""The selection ``select_aif`` returns (same type as a VOF selection)."""


@dataclass(frozen=True)
class _Features:
    """Per-voxel curve features, each ``(M,)`` over the masked voxels."""

    peak: np.ndarray
    ttp: np.ndarray  # s after times[0]
    fwhm: np.ndarray  # s
    area: np.ndarray
    noise: np.ndarray
    last: np.ndarray  # last smoothed sample


def select_aif(
    concentration: np.ndarray,
    times: np.ndarray,
    mask: np.ndarray,
    n: int = 8,
    *,
    pool: int | None = None,
    max_roughness: float = 0.15,
    min_snr: float = 5.0,
    min_relative_peak: float = 0.5,
    min_correlation: float = 0.9,
    low_peak: float = LOW_AIF_PEAK_HU,
    late_fraction: float = LATE_FRACTION,
    truncated_fraction: float = TRUNCATED_FRACTION,
) -> VesselSelection:
    """Choose the arterial input function automatically (see the module docstring).

    Parameters
    ----------
    concentration:
        ``(T, Z, Y, X)`` baseline-subtracted concentration (HU or dR2*).
    times:
        ``(T,)`` acquisition times, s, strictly increasing.
    mask:
        ``(Z, Y, X)`` bool: where to look.
    n:
        Number of voxels averaged into the AIF.
    pool:
        Number of best-scoring voxels examined further (default ``max(5 n, 20)``).
    max_roughness:
        Reject curves whose noise exceeds this fraction of their peak.
    min_snr:
        Reject curves whose peak is below this many times the series' median voxel noise.
    min_relative_peak:
        Reject pool curves below this fraction of the pool's 90th-percentile peak.
    min_correlation:
        Reject curves whose shape correlates less with the reference shape.
    low_peak, late_fraction, truncated_fraction:
        QC thresholds: peak below ``low_peak`` (units of the data; 100 suits HU, pass a value
        for MR) flags "low AIF peak"; TTP beyond ``late_fraction`` of the acquisition flags
        "late AIF"; a last sample above ``truncated_fraction`` of the peak flags "AIF truncated".

    Raises
    ------
    ValueError: wrong shapes or parameters.
    InputError: no curve in the mask qualifies as arterial.
    """
    curves, t, index = _masked_curves(concentration, times, mask)
    _check_common(n, max_roughness, min_correlation)
    if not 0 <= min_relative_peak < 1:
        raise ValueError(f"min_relative_peak must be in [0, 1), got {min_relative_peak}")
    if not min_snr >= 0:
        raise ValueError(f"min_snr must be non-negative, got {min_snr}")
    pool_size = max(5 * n, 20) if pool is None else int(pool)
    if pool_size < n:
        raise ValueError(f"pool ({pool_size}) must be at least n ({n})")

    features = _features(curves, t)
    sigma = float(np.median(features.noise))
    valid = _clean(features, max_roughness) & (features.peak > min_snr * sigma)
    if not valid.any():
        raise InputError("no arterial input found: no voxel in the mask has a clean, positive contrast curve")
    step = float(np.median(np.diff(t)))
    score = np.where(valid, features.peak / (np.maximum(features.ttp, step) * np.maximum(features.fwhm, step)), -np.inf)
    order = np.argsort(score)[::-1][: min(pool_size, int(valid.sum()))]

    peaks = features.peak[order]
    order = order[peaks >= min_relative_peak * np.percentile(peaks, 90)]
    chosen = _consistent(curves, order, n, min_correlation)
    if chosen.size == 0:
        raise InputError("no arterial input found: the best candidate curves disagree in shape")

    selection = _summarise(curves, t, index, chosen, float(score[chosen].mean()))
    flags = []
    duration = t[-1] - t[0]
    if selection.peak < low_peak:
        flags.append(FLAG_LOW_PEAK)
    if selection.time_to_peak > late_fraction * duration:
        flags.append(FLAG_LATE)
    if _truncated(selection.curve, truncated_fraction):
        flags.append(FLAG_TRUNCATED)
    return _with_flags(selection, flags)


def select_vof(
    concentration: np.ndarray,
    times: np.ndarray,
    mask: np.ndarray,
    n: int = 8,
    *,
    aif: VesselSelection | np.ndarray | None = None,
    pool: int | None = None,
    max_roughness: float = 0.15,
    min_correlation: float = 0.9,
    truncated_fraction: float = TRUNCATED_FRACTION,
) -> VesselSelection:
    """Choose the venous output function: late-peaking curves with the largest area.

    Ranked by the mean area of each voxel's 3 x 3 in-plane neighbourhood (see the module
    docstring); the curve is the mean of the chosen voxels' own curves.

    Parameters are as for ``select_aif``. ``aif`` is the arterial selection or its ``(T,)`` curve;
    candidates must peak at least one (median) sampling interval after it. When not given,
    ``select_aif`` is run with its defaults. "VOF truncated" is flagged when the VOF's last
    sample is above ``truncated_fraction`` of its peak (its area then relies on the fit's tail).

    Raises
    ------
    ValueError: wrong shapes or parameters.
    InputError: no curve in the mask qualifies as venous.
    """
    curves, t, index = _masked_curves(concentration, times, mask)
    _check_common(n, max_roughness, min_correlation)
    pool_size = max(5 * n, 20) if pool is None else int(pool)
    if pool_size < n:
        raise ValueError(f"pool ({pool_size}) must be at least n ({n})")
    if aif is None:
        aif = select_aif(concentration, times, mask)
    aif_curve = aif.curve if isinstance(aif, VesselSelection) else np.asarray(aif, dtype=np.float64)
    if aif_curve.shape != t.shape:
        raise ValueError(f"aif must be ({t.size},), got shape {aif_curve.shape}")
    aif_ttp = float(t[np.argmax(_smooth(aif_curve[:, None])[:, 0])] - t[0])

    features = _features(curves, t)
    step = float(np.median(np.diff(t)))
    valid = _clean(features, max_roughness) & (features.ttp >= aif_ttp + step)
    if not valid.any():
        raise InputError("no venous output found: no clean curve peaks after the arterial input")
    area_map = np.zeros(np.shape(mask))
    area_map[tuple(index.T)] = np.where(features.area > 0, features.area, 0.0)
    neighbourhood = ndimage.uniform_filter(area_map, size=(1, 3, 3), mode="constant")[tuple(index.T)]
    score = np.where(valid, neighbourhood, -np.inf)
    order = np.argsort(score)[::-1][: min(pool_size, int(valid.sum()))]
    chosen = _consistent(curves, order, n, min_correlation)
    if chosen.size == 0:
        raise InputError("no venous output found: the best candidate curves disagree in shape")
    selection = _summarise(curves, t, index, chosen, float(score[chosen].mean()))
    flags = [FLAG_VOF_TRUNCATED] if _truncated(selection.curve, truncated_fraction) else []
    return _with_flags(selection, flags)


def bolus_area(curve: np.ndarray, times: np.ndarray, method: str = "gamma") -> float:
    """Area under a bolus curve, concentration units * s.

    ``method="gamma"`` fits a gamma variate ``A u^a exp(a (1 - u))``, ``u = (t - t0) / tp``, to
    the first pass (samples up to where the curve, after its peak, falls below 30 % of the peak;
    all samples if it never does) and returns its exact integral; so a truncated tail is
    extrapolated and recirculation left out. If the fit fails or disagrees wildly with the data
    (area outside 0.8-2.5x the trapezoid area), the trapezoid area is returned instead.
    ``method="trapezoid"``: the trapezoid rule over the samples.
    """
    c = np.asarray(curve, dtype=np.float64)
    t = np.asarray(times, dtype=np.float64)
    if c.ndim != 1 or t.shape != c.shape or c.size < 3:
        raise ValueError(f"curve and times must be 1-D of one length >= 3, got {c.shape} and {t.shape}")
    if not (np.isfinite(c).all() and np.isfinite(t).all() and (np.diff(t) > 0).all()):
        raise ValueError("curve and times must be finite and times strictly increasing")
    if method not in ("gamma", "trapezoid"):
        raise ValueError(f"method must be 'gamma' or 'trapezoid', got {method!r}")
    trapezoid = float(np.trapezoid(c, t))
    if method == "trapezoid":
        return trapezoid
    fitted = _gamma_fit_area(c, t)
    if fitted is None or not (trapezoid > 0 and 0.8 * trapezoid <= fitted <= 2.5 * trapezoid):
        return trapezoid
    return fitted


def partial_volume_scale(aif: np.ndarray, vof: np.ndarray, times: np.ndarray, method: str = "gamma") -> float:
    """Factor to multiply the AIF by for partial volume: ``area(VOF) / area(AIF)`` when > 1, else 1.

    ``aif`` and ``vof`` are ``(T,)`` curves in one unit on ``times`` ``(T,)`` s; areas as
    ``bolus_area(..., method)``. A factor well above 2 usually means a badly partial-volumed AIF
    or a VOF that is not a large vein: worth a look.

    Raises
    ------
    ValueError: shapes differ.
    InputError: either curve has no positive area.
    """
    a = np.asarray(aif, dtype=np.float64)
    v = np.asarray(vof, dtype=np.float64)
    if a.ndim != 1 or a.shape != v.shape:
        raise ValueError(f"aif and vof must be (T,) of one length, got {a.shape} and {v.shape}")
    aif_area = bolus_area(a, times, method)
    vof_area = bolus_area(v, times, method)
    if not aif_area > 0:
        raise InputError(f"the arterial input has no positive area ({aif_area:.3g})")
    if not vof_area > 0:
        raise InputError(f"the venous output has no positive area ({vof_area:.3g})")
    return max(1.0, vof_area / aif_area)


def _masked_curves(
    concentration: np.ndarray, times: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate the inputs; return (curves (T, M) float64, times (T,), voxel indices (M, 3))."""
    conc = np.asarray(concentration)
    t = np.asarray(times, dtype=np.float64)
    region = np.asarray(mask)
    if conc.ndim != 4:
        raise ValueError(f"concentration must be [time, slice, row, column], got shape {conc.shape}")
    if t.shape != (conc.shape[0],):
        raise ValueError(f"times must be ({conc.shape[0]},), got shape {t.shape}")
    if conc.shape[0] < 5:
        raise ValueError(f"need at least 5 time points, got {conc.shape[0]}")
    if not (np.isfinite(t).all() and (np.diff(t) > 0).all()):
        raise ValueError("times must be finite and strictly increasing")
    if region.shape != conc.shape[1:]:
        raise ValueError(f"mask must be {conc.shape[1:]}, got shape {region.shape}")
    if region.dtype != bool:
        raise ValueError(f"mask must be bool, got {region.dtype}")
    if not region.any():
        raise InputError("the vessel search mask is empty")
    index = np.argwhere(region)
    curves = conc[:, region].astype(np.float64)
    if not np.isfinite(curves).all():
        raise ValueError("concentration has non-finite values in the mask")
    return curves, t, index


def _check_common(n: int, max_roughness: float, min_correlation: float) -> None:
    if not (isinstance(n, (int, np.integer)) and n >= 1):
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not max_roughness > 0:
        raise ValueError(f"max_roughness must be positive, got {max_roughness}")
    if not -1 <= min_correlation < 1:
        raise ValueError(f"min_correlation must be in [-1, 1), got {min_correlation}")


def _smooth(curves: np.ndarray) -> np.ndarray:
    """[1, 2, 1] / 4 along time (axis 0), edges repeated."""
    padded = np.concatenate([curves[:1], curves, curves[-1:]])
    return (padded[:-2] + 2.0 * curves + padded[2:]) / 4.0


def _features(curves: np.ndarray, t: np.ndarray) -> _Features:
    """Peak, TTP, FWHM, area, noise and last sample of each column of ``curves`` (T, M), in
    blocks of voxels to bound the temporaries."""
    parts = [_block_features(curves[:, i : i + _BLOCK], t) for i in range(0, curves.shape[1], _BLOCK)]
    return _Features(*(np.concatenate([getattr(p, name) for p in parts]) for name in _Features.__dataclass_fields__))


def _block_features(curves: np.ndarray, t: np.ndarray) -> _Features:
    smooth = _smooth(curves)
    n_time, m = smooth.shape
    columns = np.arange(m)
    at = np.argmax(smooth, axis=0)
    peak = smooth[at, columns]
    half = peak / 2.0
    rows = np.arange(n_time)[:, None]
    below = smooth < half[None, :]
    left = np.where(below & (rows < at[None, :]), rows, -1).max(axis=0)
    right = np.where(below & (rows > at[None, :]), rows, n_time).min(axis=0)
    t_left = np.where(left >= 0, _crossing(smooth, t, left, half), t[0])
    t_right = np.where(right < n_time, _crossing(smooth, t, right - 1, half), t[-1])
    second = np.diff(curves, n=2, axis=0)
    noise = np.sqrt((second**2).mean(axis=0) / 6.0)
    return _Features(
        peak=peak,
        ttp=t[at] - t[0],
        fwhm=t_right - t_left,
        area=np.trapezoid(curves, t, axis=0),
        noise=noise,
        last=smooth[-1],
    )


def _crossing(smooth: np.ndarray, t: np.ndarray, i: np.ndarray, level: np.ndarray) -> np.ndarray:
    """Time where each column crosses ``level`` between samples ``i`` and ``i + 1`` (linear)."""
    i = np.clip(i, 0, len(t) - 2)
    columns = np.arange(smooth.shape[1])
    a, b = smooth[i, columns], smooth[i + 1, columns]
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(b != a, (level - a) / (b - a), 0.5)
    return t[i] + np.clip(w, 0.0, 1.0) * (t[i + 1] - t[i])


def _clean(features: _Features, max_roughness: float) -> np.ndarray:
    """Curves with positive area and peak whose noise is at most ``max_roughness`` of the peak."""
    return (features.area > 0) & (features.peak > 0) & (features.noise <= max_roughness * features.peak)


def _consistent(curves: np.ndarray, order: np.ndarray, n: int, min_correlation: float) -> np.ndarray:
    """The best ``n`` of ``order`` (best first) whose shape agrees with the reference shape."""
    if order.size == 0:
        return order
    shapes = _smooth(curves[:, order])
    shapes = shapes / shapes.max(axis=0, keepdims=True)
    keep = np.ones(order.size, dtype=bool)
    for _ in range(3):
        best = np.flatnonzero(keep)[:n]
        if best.size == 0:
            break
        reference = np.median(shapes[:, best], axis=1)
        correlation = _correlation(shapes, reference)
        updated = correlation >= min_correlation
        if np.array_equal(updated, keep):
            break
        keep = updated
    return order[np.flatnonzero(keep)[:n]]


def _correlation(curves: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Pearson correlation of each column of ``curves`` with ``reference``."""
    a = curves - curves.mean(axis=0, keepdims=True)
    b = reference - reference.mean()
    denominator = np.sqrt((a**2).sum(axis=0) * (b**2).sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, (a * b[:, None]).sum(axis=0) / denominator, 0.0)


def _summarise(
    curves: np.ndarray, t: np.ndarray, index: np.ndarray, chosen: np.ndarray, score: float
) -> VesselSelection:
    """The selection made of the ``chosen`` columns of ``curves``, without QC flags."""
    mean = curves[:, chosen].mean(axis=1)
    f = _features(mean[:, None], t)
    consistency = float(_correlation(curves[:, chosen], mean).mean())
    return VesselSelection(
        curve=mean,
        voxels=index[chosen].astype(np.int64),
        score=score,
        consistency=consistency,
        peak=float(f.peak[0]),
        time_to_peak=float(f.ttp[0]),
        fwhm=float(f.fwhm[0]),
        qc_flags=(),
    )


def _with_flags(selection: VesselSelection, flags: list[str]) -> VesselSelection:
    return replace(selection, qc_flags=tuple(flags))


def _truncated(curve: np.ndarray, fraction: float) -> bool:
    smooth = _smooth(curve[:, None])[:, 0]
    return bool(smooth[-1] > fraction * smooth.max())


def _gamma(t: np.ndarray, t0: float, tp: float, alpha: float, peak: float) -> np.ndarray:
    u = np.clip((t - t0) / tp, 0.0, None)
    return peak * u**alpha * np.exp(alpha * (1.0 - u))


def _gamma_fit_area(c: np.ndarray, t: np.ndarray) -> float | None:
    """Integral of a gamma variate fitted to the first pass of ``c``; None when the fit fails."""
    at = int(np.argmax(c))
    peak = float(c[at])
    if not peak > 0:
        return None
    after = np.flatnonzero(c[at:] < 0.3 * peak)
    stop = at + int(after[0]) + 1 if after.size else c.size
    if stop < 5:
        return None
    rising = np.flatnonzero(c[: at + 1] < 0.1 * peak)
    t0 = float(t[rising[-1]]) if rising.size else float(t[0])
    tp = max(float(t[at]) - t0, float(np.median(np.diff(t))))
    span = float(t[-1] - t[0])
    lower = [float(t[0]) - span, 1e-3, 0.3, 0.0]
    upper = [float(t[at]), 2.0 * span, 30.0, 10.0 * peak]
    guess = np.clip([t0, tp, 3.0, peak], np.add(lower, 1e-6), np.subtract(upper, 1e-6))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            (f_t0, f_tp, f_alpha, f_peak), _ = curve_fit(
                _gamma, t[:stop], c[:stop], p0=guess, bounds=(lower, upper), maxfev=2000
            )
    except (RuntimeError, ValueError):
        return None
    area = f_peak * f_tp * np.exp(f_alpha) * gamma_function(f_alpha + 1) / f_alpha ** (f_alpha + 1)
    return float(area) if np.isfinite(area) else None
