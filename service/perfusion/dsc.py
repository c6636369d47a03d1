"""DSC-MRI perfusion preprocessing: baseline, brain mask, concentration and quality checks.

Pure functions over numpy arrays in the house contract: a series is ``[time, slice, row,
column]`` float signal, times in seconds after the first frame, spacing ``(slice, row, column)``
in mm. The deconvolution (``service.perfusion.deconvolution``), the AIF selection
(``service.perfusion.aif``) and the thresholds (``service.perfusion.thresholds``) are shared
with CT perfusion; what differs is here.

In a T2*-weighted (gradient-echo EPI) acquisition the bolus *darkens* the tissue, and the
change of the transverse relaxation rate is proportional to the contrast agent concentration:
``dR2*(t) = -ln(S(t) / S0) / TE`` (1/s), with ``S0`` the pre-bolus signal.

Studies that cannot be analysed raise ``service.errors.InputError`` with a readable reason;
wrong arguments raise ``ValueError``. The quality checks return a short flag string or None.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from service.errors import InputError
from service.perfusion.diffusion import brain_mask_mr

ARRIVAL_FRACTION = 0.10
"""The bolus has arrived once the mean brain signal has dropped by this fraction of its largest drop."""
MIN_BASELINE_FRAMES = 2
"""Fewer pre-bolus frames leave S0 too noisy (and the bolus was probably already arriving)."""
CSF_SIGNAL_RATIO = 1.2
"""Baseline signal above this multiple of the brain's median is CSF (bright on T2*): no perfusion."""
MIN_SIGNAL_FRACTION = 1e-3
"""Signal is clipped to this fraction of S0 before the logarithm (noise at the bolus peak can reach 0)."""
LOW_AIF_PEAK_PER_S = 10.0
"""QC: an arterial dR2* peak below this (1/s) suggests partial volume or a poor bolus."""
MIN_TIME_POINTS = 20
"""Fewer frames cannot sample the first pass and its return to baseline."""
MIN_SIGNAL_DROP = 0.02
"""QC: a mean brain signal drop below this fraction means no bolus reached the brain."""


def mean_signal(frames: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``(T,)`` mean signal of each frame, over ``mask`` (bool ``[Z, Y, X]``) or over the voxels
    brighter than the first frame's mean (the head)."""
    data = _series(frames)
    if mask is None:
        first = data[0]
        mask = first > first.mean()
    elif mask.shape != data.shape[1:] or mask.dtype != bool:
        raise ValueError(f"mask must be bool with shape {data.shape[1:]}, got {mask.dtype} {mask.shape}")
    if not mask.any():
        raise InputError("DSC perfusion: no signal (every frame is empty)")
    return data[:, mask].mean(axis=1).astype(np.float64)


def baseline_frames(curve: Sequence[float] | np.ndarray, fraction: float = ARRIVAL_FRACTION) -> int:
    """Number of pre-bolus frames of a DSC series, from its ``(T,)`` mean brain signal.

    S0 is first estimated as the median of the first three frames; the bolus arrives at the first
    frame whose signal has dropped by ``fraction`` of the largest drop; the baseline is every
    frame before the one preceding arrival (that frame may already carry a little contrast).
    Raises InputError when fewer than ``MIN_BASELINE_FRAMES`` frames precede the bolus, or the
    signal never drops (no bolus).
    """
    signal = np.asarray(curve, dtype=np.float64)
    if signal.ndim != 1 or signal.size < 4:
        raise ValueError(f"curve must be 1-D with at least 4 values, got shape {signal.shape}")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    s0 = float(np.median(signal[:3]))
    if not s0 > 0:
        raise InputError("DSC perfusion: the first frames carry no signal")
    drop = s0 - signal
    largest = float(drop.max())
    if largest <= MIN_SIGNAL_DROP * s0:
        raise InputError(
            f"DSC perfusion: no bolus passage: the mean brain signal never drops more than "
            f"{100 * largest / s0:.1f}% below its baseline"
        )
    arrival = int(np.argmax(drop >= fraction * largest))
    n_baseline = arrival - 1
    if n_baseline < MIN_BASELINE_FRAMES:
        raise InputError(
            f"DSC perfusion: the bolus arrives at frame {arrival + 1}: at least {MIN_BASELINE_FRAMES} frames "
            "before it are needed for the baseline signal S0"
        )
    return n_baseline


def brain_mask_dsc(
    baseline: np.ndarray, pixel_mm: float | tuple[float, float], csf_ratio: float = CSF_SIGNAL_RATIO
) -> np.ndarray:
    """bool ``[Z, Y, X]``: brain parenchyma from the pre-bolus mean image.

    The intracranial mask (Otsu threshold, largest component, holes filled, rim eroded:
    ``diffusion.brain_mask_mr``) without the CSF, which is brighter than parenchyma on
    T2*-weighted images: voxels above ``csf_ratio`` times the mask's median signal go, and the
    specks left by noise are removed with a 2D opening.
    """
    image = np.asarray(baseline, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"baseline must be [slice, row, column], got shape {image.shape}")
    if not csf_ratio > 1:
        raise ValueError(f"csf_ratio must be above 1, got {csf_ratio}")
    head = brain_mask_mr(image, pixel_mm=pixel_mm)
    if not head.any():
        raise InputError("DSC perfusion: no brain found (the intracranial mask is empty)")
    brain = head & (image <= csf_ratio * float(np.median(image[head])))
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_opening(brain, in_plane) & brain


def concentration_dsc(frames: np.ndarray, n_baseline: int, echo_time_s: float) -> np.ndarray:
    """float32 ``[T, Z, Y, X]`` dR2* (1/s): ``-ln(S(t) / S0) / TE``, S0 the mean of the first
    ``n_baseline`` frames. Voxels without baseline signal get 0; signal is clipped to
    ``MIN_SIGNAL_FRACTION`` of S0 before the logarithm."""
    data = _series(frames)
    if not 1 <= n_baseline < data.shape[0]:
        raise ValueError(f"n_baseline must be in [1, {data.shape[0]}), got {n_baseline}")
    if not (np.isfinite(echo_time_s) and echo_time_s > 0):
        raise ValueError(f"echo_time_s must be positive, got {echo_time_s}")
    s0 = data[:n_baseline].mean(axis=0)
    valid = s0 > 0
    safe_s0 = np.where(valid, s0, 1.0).astype(np.float32)
    ratio = np.maximum(data / safe_s0, MIN_SIGNAL_FRACTION)
    out = (-np.log(ratio) / np.float32(echo_time_s)).astype(np.float32)
    out[:, ~valid] = 0.0
    return out


def too_few_time_points(n_frames: int, minimum: int = MIN_TIME_POINTS) -> str | None:
    """Flag a DSC series with fewer than ``minimum`` frames."""
    if n_frames < minimum:
        return f"too few time points: {n_frames} DSC frames, at least {minimum} needed"
    return None


def _series(frames: np.ndarray) -> np.ndarray:
    data = np.asarray(frames, dtype=np.float32)
    if data.ndim != 4:
        raise ValueError(f"frames must be [T, Z, Y, X], got shape {data.shape}")
    return data
