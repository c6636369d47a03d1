"""CT perfusion preprocessing: baseline, brain mask, concentration, denoising and quality checks.

Pure functions over numpy arrays in the house contract: a series is ``[time, slice, row, column]``
float HU, times in seconds after the first frame, spacing ``(slice, row, column)`` in mm. Motion
correction (``service.perfusion.motion``) comes first; these functions assume aligned frames.

In CT, attenuation rises linearly with the iodine concentration, so the baseline-subtracted HU
*is* the concentration curve the deconvolution (``service.perfusion.deconvolution``) inverts.

Studies that cannot be analysed raise ``service.errors.InputError`` with a readable reason;
wrong arguments (shapes, ranges) raise ``ValueError``. The quality checks return a short flag
string, or ``None`` when the study passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage

from service.errors import InputError
from service.perfusion.deconvolution import single_threaded_lapack

# --- thresholds (HU unless stated), for unenhanced CT of the adult brain ---
TISSUE_HU = (0.0, 80.0)
"""Baseline window of brain parenchyma: below is air/fat, above is bone and calcification."""
CSF_HU = 22.0
"""Baseline (smoothed) below this is CSF: a voxel half CSF (~5), half grey (~38) or white (~29) matter
reads 17-22 HU."""
VESSEL_ENHANCEMENT_HU = 100.0
"""Peak enhancement above baseline that marks a large vessel (tissue peaks at 20-40 HU)."""
BONE_MARGIN_MM = 2.0
"""The brain mask keeps this far from bone, in-plane and across slices."""
GROWTH_BONE_GAP_MM = 1.0
"""The brain mask grows back towards the skull up to this distance from bone: the voxel beside
the bone is mostly CSF lifted into the tissue window by the bone's partial volume."""
MIN_BRAIN_ML = 20.0
"""Smaller brain masks mean the study does not cover the brain (or is not a head CT)."""
RISE_FRACTION = 0.05
"""The bolus has arrived once the curve is this fraction of its range above its baseline..."""
STEP_BACK_FRACTION = 0.01
"""...and it started at the first frame before that one more than this fraction above the median."""
MIN_TIME_POINTS = 15
"""Fewer frames cannot sample the bolus passage for deconvolution."""
MIN_COVERAGE_MM = 40.0
"""Craniocaudal coverage below this misses most of a territory."""
TRUNCATION_FRACTION = 0.3
"""The bolus is truncated when the last tissue value is above this fraction of its peak (a complete
acquisition comes back to within 10 % of baseline, recirculation included)."""
EXCESSIVE_MOTION_MM = 15.0
"""Head displacement beyond which motion correction is not trusted."""
MIN_SIMILARITY = 0.8
"""Correlation with the reference below which a frame counts as not registered."""


def baseline_frames(
    data: np.ndarray,
    times: Sequence[float] | np.ndarray,
    *,
    k_sigma: float = 4.0,
    noise: float | None = None,
) -> int:
    """Number of frames acquired before the contrast bolus arrives.

    Parameters
    ----------
    data:
        Either the 4D series ``[T, Z, Y, X]`` (HU), or one global curve ``(T,)`` (e.g. an arterial
        or whole-brain mean, any units). From a series, the curve is the mean of the most strongly
        and smoothly enhancing voxels (range times lag-1 autocorrelation; the end slices left out):
        the large arteries and veins, 0.2 % of the soft tissue, at least 10:
        they rise earliest and by hundreds of HU, so the arrival is seen within a frame. Their range
        must exceed three times the voxel noise, or there was no bolus.
    times:
        ``(T,)`` acquisition times in s, increasing.
    k_sigma:
        The bolus has arrived at the first frame that, with the next, lies more than ``k_sigma``
        noise standard deviations above the mean of the frames before it, and at least
        ``RISE_FRACTION`` of the curve's range above it (noise-free data; and resampled frames,
        whose interpolation blur shifts vessels next to bone by a few HU against the reference).
        From there it steps back over the frames still above the median baseline by
        ``max(2 sigma, STEP_BACK_FRACTION x range)``: the start of the rise.
    noise:
        Standard deviation of the curve's noise; estimated when ``None`` (from a series: the
        voxel noise of frame-to-frame differences over the square root of the voxels averaged;
        from a curve: the median absolute frame-to-frame difference).

    Returns
    -------
    int
        ``n_baseline`` >= 1: frames ``0 .. n_baseline - 1`` carry no contrast.

    Raises
    ------
    InputError
        Contrast is already present in the first frame, or no arrival is seen at all.
    ValueError
        Shapes of ``data`` and ``times`` disagree, or fewer than 3 frames.
    """
    data = np.asarray(data)
    times = np.asarray(times, dtype=np.float64)
    if data.ndim not in (1, 4):
        raise ValueError(f"data must be a curve (T,) or a series [T, Z, Y, X], got shape {data.shape}")
    if times.shape != (data.shape[0],):
        raise ValueError(f"times has shape {times.shape}, expected ({data.shape[0]},)")
    if data.shape[0] < 3:
        raise ValueError(f"need at least 3 frames to find a baseline, got {data.shape[0]}")
    if np.any(np.diff(times) <= 0):
        raise ValueError("times must increase strictly")
    if data.ndim == 4:
        curve, estimated, voxel_sigma = _enhancing_curve(data)
        span = float(curve.max() - curve.min())
        if span < 3.0 * voxel_sigma:
            raise InputError(
                f"no contrast arrival detected: the most enhancing voxels change by {span:.1f} HU, "
                f"within the noise ({voxel_sigma:.1f} HU)"
            )
    else:
        curve = data.astype(np.float64)
        diffs = np.abs(np.diff(curve))
        estimated = 1.4826 * float(np.median(diffs)) / np.sqrt(2.0)
    sigma = estimated if noise is None else float(noise)
    if not np.all(np.isfinite(curve)):
        raise ValueError("data contains non-finite values")
    span = float(curve.max() - curve.min())
    floor = max(RISE_FRACTION * span, 1e-6 * max(1.0, float(np.abs(curve).max())))
    threshold = max(k_sigma * sigma, floor)

    # Contrast in frame 0: the curve starts well above where it later comes down to.
    if curve[0] - curve.min() > max(threshold, 0.1 * span) and curve[0] - curve[1:].min() > threshold:
        raise InputError(
            "no baseline before contrast arrival: the first frame is already enhanced "
            f"({curve[0] - curve.min():.1f} above the curve's minimum)"
        )
    arrival = None
    for i in range(1, len(curve) - 1):
        level = curve[:i].mean()
        if curve[i] - level > threshold and curve[i + 1] - level > threshold:
            arrival = i
            break
    if arrival is None:
        if curve[-1] - curve[:-1].mean() > threshold:
            return len(curve) - 1
        raise InputError("no contrast arrival detected: the curve never rises above its baseline noise")
    # The detection threshold is crossed a little after the start of the rise: step back over the
    # frames already above the (median) baseline by a smaller margin.
    level = float(np.median(curve[:arrival]))
    early = max(2.0 * sigma, STEP_BACK_FRACTION * span)
    while arrival > 1 and curve[arrival - 1] - level > early:
        arrival -= 1
    return arrival


def _enhancing_curve(frames: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Mean curve of the most enhancing soft-tissue voxels, its noise and the voxel noise (SD)."""
    # The unenhanced level is the minimum over time (of a 3-frame running mean, against noise):
    # vessels are soft tissue before and after the bolus, whenever the series starts.
    running = ndimage.uniform_filter1d(frames.astype(np.float32, copy=False), 3, axis=0, mode="nearest")
    lowest = running.min(axis=0)
    soft = (lowest > -50.0) & (lowest < 300.0)
    if soft.shape[0] >= 5:  # the end slices take what motion brings in and out of the slab
        soft[[0, -1]] = False
    n_soft = int(soft.sum())
    if n_soft < 10:
        raise InputError("no soft tissue (-50..300 HU) in the series: not a head CT perfusion")
    curves = frames[:, soft].astype(np.float32)  # (T, n_soft)
    # A bolus is smooth in time: rank by range times the lag-1 autocorrelation, which is near 1
    # for a bolus and near 0 for noise and for frame-to-frame jitter (residual motion at bone).
    centred = curves - curves.mean(axis=0)
    power = np.einsum("tv,tv->v", centred, centred)
    lag1 = np.einsum("tv,tv->v", centred[1:], centred[:-1]) / np.maximum(power, 1e-12)
    enhancement = (running.max(axis=0)[soft] - lowest[soft]) * np.clip(lag1, 0.0, 1.0)
    n = int(np.clip(0.002 * n_soft, 10, 500))
    top = np.argpartition(enhancement, -n)[-n:]
    curve = curves[:, top].mean(axis=1, dtype=np.float64)
    diffs = np.diff(curves[:, :: max(1, n_soft // 200000)], axis=0)
    voxel_sigma = 1.4826 * float(np.median(np.abs(diffs))) / np.sqrt(2.0)
    return curve, voxel_sigma / np.sqrt(n), voxel_sigma


def concentration_ct(frames: np.ndarray, n_baseline: int) -> np.ndarray:
    """Baseline-subtracted series: each frame minus the mean of the first ``n_baseline`` frames.

    Parameters
    ----------
    frames:
        ``[T, Z, Y, X]`` HU (aligned).
    n_baseline:
        Frames before contrast arrival (``baseline_frames``), ``1 <= n_baseline < T``.

    Returns
    -------
    np.ndarray
        ``[T, Z, Y, X]`` float32, enhancement in HU (proportional to iodine concentration).
    """
    frames = _series(frames)
    n_baseline = _n_baseline(n_baseline, frames.shape[0])
    baseline = frames[:n_baseline].mean(axis=0, dtype=np.float64).astype(np.float32)
    return (frames - baseline[None]).astype(np.float32, copy=False)


def brain_mask_ct(
    frames: np.ndarray,
    spacing_mm: Sequence[float],
    n_baseline: int,
    *,
    csf_hu: float = CSF_HU,
    vessel_hu: float = VESSEL_ENHANCEMENT_HU,
    bone_margin_mm: float = BONE_MARGIN_MM,
    smooth_mm: float = 1.5,
    growth_bone_gap_mm: float = GROWTH_BONE_GAP_MM,
) -> np.ndarray:
    """Brain parenchyma of a CT perfusion series: no bone, air, scalp, CSF or large vessels.

    Steps: the mean of the baseline frames; bone (>= 80 HU after an in-plane 3 x 3 median);
    the other voxels smoothed in-plane (Gaussian ``smooth_mm``, against the noise) without the
    bone, which would lift the cortex beside it out of the tissue window; voxels in ``TISSUE_HU`` and at
    least ``bone_margin_mm`` from bone; the largest 3D connected component (the brain
    inside the skull; the scalp is cut off by the skull and the margin); then grown back by the
    margin into tissue-valued voxels farther than ``growth_bone_gap_mm`` from bone, so that the
    cortex against the skull stays in; holes filled
    in-plane; then CSF (baseline < ``csf_hu``) and large vessels (peak enhancement > ``vessel_hu``
    over baseline, 3-frame running mean against noise, dilated by one pixel in-plane) removed,
    and small fragments (< 0.1 mL) dropped.

    Parameters
    ----------
    frames:
        ``[T, Z, Y, X]`` HU, aligned.
    spacing_mm:
        (slice, row, column) spacing in mm.
    n_baseline:
        Frames before contrast arrival, ``1 <= n_baseline < T``.

    Returns
    -------
    np.ndarray
        bool ``[Z, Y, X]``.

    Raises
    ------
    InputError
        No brain of at least ``MIN_BRAIN_ML`` found.
    """
    frames = _series(frames)
    n_baseline = _n_baseline(n_baseline, frames.shape[0])
    spacing = _spacing(spacing_mm)
    baseline = frames[:n_baseline].mean(axis=0, dtype=np.float64).astype(np.float32)
    # Bone from the in-plane 3 x 3 median (robust to noise, no spread); the smoothing then
    # averages the other voxels only, so that bone does not lift the cortex beside it.
    bone = ndimage.median_filter(baseline, size=(1, 3, 3), mode="nearest") >= TISSUE_HU[1]
    sigma = (0.0, smooth_mm / spacing[1], smooth_mm / spacing[2])
    soft = (~bone).astype(np.float32)
    weight = ndimage.gaussian_filter(soft, sigma, mode="nearest")
    smooth = ndimage.gaussian_filter(baseline * soft, sigma, mode="nearest") / np.maximum(weight, 1e-3)
    smooth[bone] = baseline[bone]
    if bone.any():
        from_bone = ndimage.distance_transform_edt(~bone, sampling=spacing)
    else:
        from_bone = np.full(bone.shape, np.inf)
    far_from_bone = from_bone > bone_margin_mm
    candidate = (smooth > TISSUE_HU[0]) & (smooth < TISSUE_HU[1]) & far_from_bone
    labels, n = ndimage.label(candidate)
    if n == 0:
        raise InputError("no brain found: no voxels in the parenchyma window 0-80 HU")
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    brain = labels == int(sizes.argmax())
    tissue = (smooth > TISSUE_HU[0]) & (smooth < TISSUE_HU[1]) & (from_bone > growth_bone_gap_mm)
    near = ndimage.distance_transform_edt(~brain, sampling=spacing) <= bone_margin_mm + 0.5 * float(spacing[1:].max())
    brain |= near & tissue
    for z in range(brain.shape[0]):
        brain[z] = ndimage.binary_fill_holes(brain[z])

    running = ndimage.uniform_filter1d(frames, 3, axis=0, mode="nearest")
    peak = running.max(axis=0) - baseline
    vessels = ndimage.binary_dilation(peak > vessel_hu, structure=_in_plane_cross())
    brain &= (smooth >= csf_hu) & ~vessels & ~bone

    voxel_ml = float(np.prod(spacing)) / 1000.0
    labels, n = ndimage.label(brain)
    if n:
        sizes = np.bincount(labels.ravel()) * voxel_ml
        sizes[0] = 0.0
        brain = (sizes >= 0.1)[labels]
    volume = float(brain.sum()) * voxel_ml
    if volume < MIN_BRAIN_ML:
        raise InputError(f"no brain found: the parenchyma mask holds {volume:.1f} mL, fewer than {MIN_BRAIN_ML:.0f} mL")
    return brain


def denoise(
    frames: np.ndarray,
    spacing_mm: Sequence[float],
    mask: np.ndarray,
    sigma_mm: float = 2.0,
) -> np.ndarray:
    """Smooth each frame in-plane with a Gaussian restricted to ``mask`` (normalised convolution).

    Inside the mask, a voxel becomes the Gaussian-weighted mean of the *masked* voxels around it:
    ``G * (x m) / G * m``. The edges that matter for perfusion are those of the mask (bone, CSF,
    the large vessels with their hundreds of HU of enhancement), and none of them bleeds into the
    tissue; within the parenchyma the plain Gaussian averages noise down by about
    ``1 / (2 sqrt(pi) sigma_px)``. Chosen over bilateral or anisotropic diffusion for speed and
    predictability: it is linear, so the deconvolution's CBV and CBF stay unbiased on average, at
    the cost of blurring grey/white borders by ``sigma_mm``. Smoothing is in-plane only, since CT
    perfusion slices are 5 mm or more apart. Outside the mask the input is returned unchanged.

    Parameters
    ----------
    frames:
        ``[T, Z, Y, X]`` or a single ``[Z, Y, X]`` volume (e.g. concentration, HU).
    spacing_mm:
        (slice, row, column) spacing in mm.
    mask:
        bool ``[Z, Y, X]`` (``brain_mask_ct``).
    sigma_mm:
        Gaussian standard deviation in mm, >= 0 (0 returns a copy).

    Returns
    -------
    np.ndarray
        float32, same shape as ``frames``.
    """
    data = np.asarray(frames)
    if data.ndim not in (3, 4):
        raise ValueError(f"frames must be [T, Z, Y, X] or [Z, Y, X], got shape {data.shape}")
    mask = np.asarray(mask)
    if mask.dtype != bool or mask.shape != data.shape[-3:]:
        raise ValueError(f"mask must be bool with shape {data.shape[-3:]}, got {mask.dtype} {mask.shape}")
    if sigma_mm < 0:
        raise ValueError(f"sigma_mm must be >= 0, got {sigma_mm}")
    spacing = _spacing(spacing_mm)
    series = data.reshape((-1, *data.shape[-3:])).astype(np.float32)
    out = series.copy()
    if sigma_mm == 0 or not mask.any():
        return out.reshape(data.shape)
    sigma = (0.0, sigma_mm / spacing[1], sigma_mm / spacing[2])
    weight = mask.astype(np.float32)
    norm = ndimage.gaussian_filter(weight, sigma, mode="constant")
    inside = mask & (norm > 1e-6)
    for t in range(series.shape[0]):
        smoothed = ndimage.gaussian_filter(series[t] * weight, sigma, mode="constant")
        out[t][inside] = smoothed[inside] / norm[inside]
    return out.reshape(data.shape)


WORKING_PIXEL_MM = 0.9
"""Finer in-plane pixels are block-averaged to about this size before the analysis: the denoising
smooths over 2-3 mm anyway, so the finer grid carries no more information, only 4x the work."""


def working_factor(spacing_mm: Sequence[float], target_mm: float = WORKING_PIXEL_MM) -> int:
    """The in-plane block size (1, 2, 3...) that brings the pixels closest to ``target_mm``
    without going below the acquired pixel."""
    spacing = _spacing(spacing_mm)
    return max(1, int(round(target_mm / float(max(spacing[1], spacing[2])))))


def block_average(data: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor x factor`` in-plane blocks of ``[..., Y, X]`` (edges cropped to a
    multiple of ``factor``), float32. ``factor`` 1 returns the input as float32 (no copy if it is)."""
    if factor == 1:
        return np.asarray(data).astype(np.float32, copy=False)
    data = np.asarray(data)
    y, x = data.shape[-2] // factor, data.shape[-1] // factor
    out = np.zeros((*data.shape[:-2], y, x), dtype=np.float32)
    for i in range(factor):  # strided sums: no temporary of the full-size array
        for j in range(factor):
            out += data[..., i : y * factor : factor, j : x * factor : factor]
    out *= np.float32(1.0 / factor**2)
    return out


def block_expand(data: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of ``block_average`` for maps and masks: each value repeated over its block,
    padded with the edge values to the original in-plane ``shape``."""
    if factor == 1:
        return data
    out = np.repeat(np.repeat(data, factor, axis=-2), factor, axis=-1)
    pad = [(0, 0)] * (out.ndim - 2) + [(0, shape[0] - out.shape[-2]), (0, shape[1] - out.shape[-1])]
    return np.pad(out, pad, mode="edge") if any(p[1] for p in pad) else out


def denoise_values(values: np.ndarray, mask: np.ndarray, spacing_mm: Sequence[float], sigma_mm: float) -> np.ndarray:
    """``values`` of the voxels of ``mask`` (in its order), smoothed in-plane over the mask as by
    ``denoise``; float64, for per-voxel fields such as the bias corrections."""
    volume = np.zeros(mask.shape, dtype=np.float32)
    volume[mask] = values
    return denoise(volume, spacing_mm, mask, sigma_mm)[mask].astype(np.float64)


def median_within(volume: np.ndarray, region: np.ndarray, spacing_mm: Sequence[float], radius_mm: float) -> np.ndarray:
    """In-plane median of ``volume`` over a disc of ``radius_mm`` around each voxel of ``region``,
    counting only ``region``'s voxels; outside ``region`` the volume is returned unchanged.

    For a decision by threshold on a noisy map (the core's rCBF): a region whose true value lies
    just below the threshold reads, voxel by voxel, above it for a share of its voxels that
    grows with the noise; the median keeps the region's level and its edges (a step narrower
    than the disc stays where it is), where a mean would spread the edge. ``(Z, Y, X)`` in, float32 out.
    """
    data = np.asarray(volume)
    mask = np.asarray(region, dtype=bool)
    if data.ndim != 3 or mask.shape != data.shape:
        raise ValueError(f"volume {data.shape} and region {mask.shape} must be one [Z, Y, X] shape")
    spacing = _spacing(spacing_mm)
    if not (np.isfinite(radius_mm) and radius_mm >= 0):
        raise ValueError(f"radius_mm must be non-negative, got {radius_mm}")
    out = data.astype(np.float32, copy=True)
    ry, rx = int(radius_mm // spacing[1]), int(radius_mm // spacing[2])
    if not mask.any() or (ry == 0 and rx == 0):
        return out
    offsets = [(dy, dx) for dy in range(-ry, ry + 1) for dx in range(-rx, rx + 1)
               if (dy * spacing[1]) ** 2 + (dx * spacing[2]) ** 2 <= radius_mm ** 2 + 1e-9]
    padded = np.pad(np.where(mask, out, np.nan), ((0, 0), (ry, ry), (rx, rx)), constant_values=np.nan)
    z, y, x = np.nonzero(mask)
    samples = np.empty((z.size, len(offsets)), dtype=np.float32)
    for k, (dy, dx) in enumerate(offsets):
        samples[:, k] = padded[z, y + ry + dy, x + rx + dx]
    out[mask] = np.nanmedian(samples, axis=1)  # the centre is in the region: never all NaN
    return out


def denoise_tips(
    concentration: np.ndarray,
    spacing_mm: Sequence[float],
    mask: np.ndarray,
    sigma_mm: float = 3.0,
    *,
    noise: float | None = None,
    n_features: int = 6,
    guide_sigma_mm: float = 1.5,
) -> np.ndarray:
    """Edge-preserving in-plane smoothing of the curves: a bilateral filter on time-intensity
    profile similarity (TIPS, Mendrik et al. 2011), restricted to ``mask``.

    A neighbour's curve is averaged in with the weight ``g_spatial(distance) * exp(-max(z - 1, 0))``,
    where ``z`` is the squared distance between the two voxels' time profiles over its expected
    value for pure noise: neighbours whose curves differ no more than noise explains (the same
    tissue) are averaged like a Gaussian of ``sigma_mm``; neighbours with another bolus arrival
    or another flow (the border of the hypoperfused region or of the core, grey against white
    matter at low noise) fall out. So the smoothing can be wider than a plain Gaussian's without
    blurring the lesion borders that the volumes depend on.

    The profiles are compared on their first ``n_features`` principal components (over the
    mask's curves; the bolus shapes live in a few dimensions, the noise in all of them), smoothed
    by ``guide_sigma_mm`` against the noise; the filter is applied as two 1-D passes (rows, then
    columns). ``noise`` is the voxel noise SD in the curves' units (estimated from their second
    differences when None). Outside the mask the input is returned unchanged.

    Parameters and return as ``denoise``: ``[T, Z, Y, X]`` in, float32 of the same shape out.
    """
    data = np.asarray(concentration)
    if data.ndim != 4:
        raise ValueError(f"concentration must be [T, Z, Y, X], got shape {data.shape}")
    mask = np.asarray(mask)
    if mask.dtype != bool or mask.shape != data.shape[1:]:
        raise ValueError(f"mask must be bool with shape {data.shape[1:]}, got {mask.dtype} {mask.shape}")
    if sigma_mm < 0 or guide_sigma_mm < 0:
        raise ValueError(f"sigma_mm and guide_sigma_mm must be >= 0, got {sigma_mm}, {guide_sigma_mm}")
    spacing = _spacing(spacing_mm)
    out = data.astype(np.float32)  # always a copy
    if sigma_mm == 0 or not mask.any():
        return out
    zs, ys, xs = (np.flatnonzero(mask.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
    box = (slice(zs[0], zs[-1] + 1), slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
    inside = mask[box]
    block = out[(slice(None), *box)]  # a view: filtered in place
    curves = block[:, inside]  # (T, N)
    if noise is None:
        second = curves[2:] - 2.0 * curves[1:-1] + curves[:-2]
        noise = 1.4826 * float(np.median(np.abs(second[:, :: max(1, curves.shape[1] // 50000)]))) / np.sqrt(6.0)
    sample = curves[:, :: max(1, curves.shape[1] // 20000)].astype(np.float64)
    mean = sample.mean(axis=1)
    with single_threaded_lapack():
        basis = np.linalg.svd(sample - mean[:, None], full_matrices=False)[0][:, : min(n_features, sample.shape[0])]
    features = np.zeros((basis.shape[1], *inside.shape), dtype=np.float32)
    features[:, inside] = (basis.T.astype(np.float32) @ (curves - mean[:, None].astype(np.float32)))
    weight = inside.astype(np.float32)
    guide_sigma = (0.0, 0.0, guide_sigma_mm / spacing[1], guide_sigma_mm / spacing[2])
    norm = ndimage.gaussian_filter(weight, guide_sigma[1:], mode="constant")
    guide = ndimage.gaussian_filter(features * weight, guide_sigma, mode="constant") / np.maximum(norm, 1e-6)
    # Noise variance of one guide feature: the voxel variance times the sum of the squared
    # (normalised) kernel weights, ~ 1 / (4 pi sigma_row sigma_col) for a 2-D Gaussian.
    g_var = noise**2 / (4.0 * np.pi * max(guide_sigma[2], 0.5) * max(guide_sigma[3], 0.5))
    expected = 2.0 * guide.shape[0] * max(g_var, 1e-12)
    expected = np.float32(expected)
    # Same-tissue distances scatter around 1 (chi-square over the features): only distances
    # beyond three standard deviations of that scatter count against a neighbour.
    allowed = np.float32(1.0 + 3.0 * np.sqrt(2.0 / guide.shape[0]))

    def filter_slices(part: slice) -> None:
        """Both 1-D passes over slices ``part`` (slices are independent: the filter is in-plane)."""
        data, g, w_in = block[:, part], guide[:, part], weight[part]
        for axis, step in ((1, spacing[1]), (2, spacing[2])):  # rows, columns of [Z, Y, X]
            sigma_px = sigma_mm / step
            radius = max(1, int(np.ceil(1.5 * sigma_px)))
            total = np.zeros(w_in.shape, dtype=np.float32)
            result = np.zeros_like(data)
            scratch = np.empty_like(data)
            for shift in range(-radius, radius + 1):
                here, there = _shifted_pair(w_in.shape, axis, shift)
                spatial = np.float32(np.exp(-0.5 * (shift / sigma_px) ** 2))
                distance = np.square(g[(slice(None), *here)] - g[(slice(None), *there)]).sum(axis=0)
                w = spatial * w_in[there] * w_in[here] * np.exp(-np.maximum(distance / expected - allowed, 0.0))
                total[here] += w
                np.multiply(data[(slice(None), *there)], w[None], out=scratch[(slice(None), *here)])
                result[(slice(None), *here)] += scratch[(slice(None), *here)]
            keep = w_in > 0
            data[:, keep] = result[:, keep] / np.maximum(total[keep], 1e-12)

    n_slices = inside.shape[0]
    parts = [slice(k, min(k + 2, n_slices)) for k in range(0, n_slices, 2)]
    with ThreadPoolExecutor(max_workers=min(2, len(parts))) as pool:  # numpy releases the GIL
        list(pool.map(filter_slices, parts))
    return out


def _shifted_pair(shape: tuple[int, ...], axis: int, shift: int) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Index tuples (here, there) with ``there = here + shift`` along ``axis``, both in bounds."""
    n = shape[axis]
    here = [slice(None)] * len(shape)
    there = [slice(None)] * len(shape)
    here[axis] = slice(max(0, -shift), n - max(0, shift))
    there[axis] = slice(max(0, shift), n - max(0, -shift))
    return tuple(here), tuple(there)


# --- quality checks: a flag string, or None when the study passes ---


def truncated_bolus(mean_tissue_curve: Sequence[float] | np.ndarray, n_baseline: int = 1, fraction: float = TRUNCATION_FRACTION) -> str | None:
    """Flag a bolus the acquisition stopped before it washed out of the tissue.

    ``mean_tissue_curve`` is ``(T,)``: the mean over the brain mask of the series (HU) or of the
    concentration; its baseline (mean of the first ``n_baseline`` values) is subtracted. The
    bolus is truncated when the last value is above ``fraction`` of the peak (CBV and CBF are
    then underestimated, since the deconvolution sees only part of the passage).
    """
    curve = np.asarray(mean_tissue_curve, dtype=np.float64)
    if curve.ndim != 1 or curve.size < 2:
        raise ValueError(f"mean_tissue_curve must be a curve of at least 2 values, got shape {curve.shape}")
    n_baseline = _n_baseline(n_baseline, curve.size)
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    enhancement = curve - curve[:n_baseline].mean()
    peak = float(enhancement.max())
    if peak <= 0:
        return None
    last = float(enhancement[-1])
    if last > fraction * peak:
        return f"truncated bolus: tissue enhancement at the last frame is {100 * last / peak:.0f}% of its peak"
    return None


def too_few_time_points(n_frames: int, minimum: int = MIN_TIME_POINTS) -> str | None:
    """Flag a series with fewer than ``minimum`` frames."""
    if n_frames < minimum:
        return f"too few time points: {n_frames} frames, at least {minimum} needed"
    return None


def coverage_mm(n_slices: int, spacing_mm: float | Sequence[float]) -> float:
    """Craniocaudal coverage of a stack in mm: slices times slice spacing.

    ``spacing_mm`` is the slice spacing, or the (slice, row, column) spacing.
    """
    if n_slices < 1:
        raise ValueError(f"n_slices must be at least 1, got {n_slices}")
    step = float(spacing_mm) if np.isscalar(spacing_mm) else float(_spacing(spacing_mm)[0])  # type: ignore[arg-type]
    if step <= 0:
        raise ValueError(f"slice spacing must be positive, got {step}")
    return n_slices * step


def insufficient_coverage(n_slices: int, spacing_mm: float | Sequence[float], minimum_mm: float = MIN_COVERAGE_MM) -> str | None:
    """Flag a stack covering less than ``minimum_mm`` craniocaudally."""
    covered = coverage_mm(n_slices, spacing_mm)
    if covered < minimum_mm:
        return f"insufficient coverage: {covered:.0f} mm, at least {minimum_mm:.0f} mm needed"
    return None


def excessive_motion(
    max_displacement_mm: float,
    similarity: Sequence[float] | np.ndarray | None = None,
    limit_mm: float = EXCESSIVE_MOTION_MM,
    min_similarity: float = MIN_SIMILARITY,
) -> str | None:
    """Flag motion the correction cannot be trusted with.

    ``max_displacement_mm`` and ``similarity`` come from ``MotionResult`` (``service.perfusion
    .motion``): the head moved more than ``limit_mm``, or a frame correlates with the reference
    less than ``min_similarity`` after correction.
    """
    if max_displacement_mm > limit_mm:
        return f"excessive motion: the head moved up to {max_displacement_mm:.1f} mm (limit {limit_mm:g} mm)"
    if similarity is not None:
        values = np.asarray(similarity, dtype=np.float64)
        bad = np.flatnonzero(values < min_similarity)
        if bad.size:
            return f"excessive motion: {bad.size} frame(s) did not register (first: frame {int(bad[0])})"
    return None


def _series(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or min(frames.shape) < 1:
        raise ValueError(f"frames must be a non-empty [T, Z, Y, X] array, got shape {frames.shape}")
    return frames.astype(np.float32, copy=False)


def _n_baseline(n_baseline: int, n_frames: int) -> int:
    n = int(n_baseline)
    if n != n_baseline or not 1 <= n < n_frames:
        raise ValueError(f"n_baseline must be an integer in 1..{n_frames - 1}, got {n_baseline}")
    return n


def _spacing(spacing_mm: Sequence[float]) -> np.ndarray:
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    if spacing.shape != (3,) or not np.all(spacing > 0):
        raise ValueError(f"spacing_mm must be three positive numbers, got {spacing_mm!r}")
    return spacing


def _in_plane_cross() -> np.ndarray:
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    return structure


TTP_SMOOTHING_MM = 2.0
"""In-plane Gaussian (inside the brain) over the curves before their peak is taken: at clinical noise
a single voxel's peak jumps by frames."""


def time_to_peak(frames: np.ndarray, times_s: Sequence[float] | np.ndarray, brain: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
    """Time to peak (s after the first frame) of each brain voxel's curve, 0 outside ``brain``.

    The curves are smoothed in-plane inside the brain (``TTP_SMOOTHING_MM``) and over three frames
    in time; the peak is placed between frames by a parabola through the highest frame and its
    neighbours. ``frames`` are aligned (motion-corrected) HU ``[T, Z, Y, X]``.
    """
    frames = np.asarray(frames)
    times = np.asarray(times_s, dtype=np.float64)
    brain = np.asarray(brain, dtype=bool)
    if frames.ndim != 4 or times.shape != (frames.shape[0],) or brain.shape != frames.shape[1:]:
        raise ValueError(f"frames {frames.shape}, times {times.shape} and brain {brain.shape} do not fit together")
    ttp = np.zeros(brain.shape, dtype=np.float32)
    if not brain.any():
        return ttp
    curves = denoise(frames, spacing_mm, brain, TTP_SMOOTHING_MM)[:, brain]  # (T, N)
    curves = ndimage.uniform_filter1d(curves, 3, axis=0, mode="nearest")
    peak = np.argmax(curves, axis=0)
    inner = np.clip(peak, 1, len(times) - 2)
    columns = np.arange(curves.shape[1])
    before, at, after = curves[inner - 1, columns], curves[inner, columns], curves[inner + 1, columns]
    bend = before - 2.0 * at + after
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.where(bend < 0, 0.5 * (before - after) / bend, 0.0)
    shift = np.where(peak == inner, np.clip(shift, -0.5, 0.5), 0.0)
    step = np.where(shift >= 0, times[np.minimum(inner + 1, len(times) - 1)] - times[inner], times[inner] - times[inner - 1])
    ttp[brain] = (times[peak] - times[0] + shift * step).astype(np.float32)
    return ttp
