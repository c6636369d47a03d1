"""Diffusion-weighted MRI -> ADC, brain mask and ischaemic core: pure functions over numpy arrays.

Arrays follow the house contract ``[slice, row, column]``. ADC is in 1e-6 mm2/s (the unit
scanners store ADC series in: normal grey matter about 800, CSF about 3000); b-values are in
s/mm2. Connectivity and morphology are 3D across slices unless a function says "in-plane":
clinical DWI has thick slices (5-6 mm), so erosions and fills act within each slice.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

ADC_MAX = 5000.0
"""Upper clip of computed ADC (1e-6 mm2/s); free water at body temperature is about 3000."""


class CoreMask(NamedTuple):
    """A core mask (bool ``[slice, row, column]``) and its volume in mL."""

    mask: np.ndarray
    volume_ml: float


def adc_map(
    b0: np.ndarray,
    b_high: np.ndarray,
    b_value: float,
    *,
    b_low: float = 0.0,
    min_signal: float | None = None,
) -> np.ndarray:
    """Apparent diffusion coefficient from two diffusion weightings, in 1e-6 mm2/s.

    ``ADC = ln(S_low / S_high) / (b_value - b_low) * 1e6``, mono-exponential.

    Parameters
    ----------
    b0, b_high:
        Signal at ``b_low`` (usually 0) and at ``b_value``, same shape, any real dtype.
    b_value, b_low:
        The two b-values in s/mm2; ``b_value > b_low``.
    min_signal:
        Voxels whose ``b0`` signal is at or below this are background and get ADC 0. Default:
        5 % of the 99th percentile of ``b0`` (air and bone; noise there gives meaningless ADC).

    Returns
    -------
    float32 array shaped like ``b0``: ADC in [0, ``ADC_MAX``], 0 in background. A high-b signal
    of zero (or below) in a foreground voxel gives ``ADC_MAX``; a high-b signal above the low-b
    signal (noise) gives 0.
    """
    b0 = np.asarray(b0, dtype=np.float64)
    b_high = np.asarray(b_high, dtype=np.float64)
    if b0.shape != b_high.shape:
        raise ValueError(f"b0 and b_high must have one shape, got {b0.shape} and {b_high.shape}")
    delta_b = float(b_value) - float(b_low)
    if delta_b <= 0:
        raise ValueError(f"b_value ({b_value}) must exceed b_low ({b_low})")
    if min_signal is None:
        finite = b0[np.isfinite(b0)]
        min_signal = 0.05 * float(np.percentile(finite, 99)) if finite.size else 0.0
    foreground = np.isfinite(b0) & (b0 > min_signal)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(foreground, b0 / np.where(b_high > 0, b_high, np.nan), np.nan)
        adc = np.log(ratio) / delta_b * 1e6
    adc = np.where(foreground & ~(b_high > 0), ADC_MAX, adc)  # no signal left at high b: free water
    adc = np.where(foreground, np.nan_to_num(adc, nan=0.0, posinf=ADC_MAX, neginf=0.0), 0.0)
    return np.clip(adc, 0.0, ADC_MAX).astype(np.float32)


def brain_mask_mr(
    image: np.ndarray,
    *,
    threshold: float | None = None,
    erosion_mm: float = 2.0,
    pixel_mm: float | tuple[float, float] = 1.8,
) -> np.ndarray:
    """Intracranial mask from a b = 0 (T2-weighted) image: brain and the CSF inside the skull.

    Steps: ``image > threshold`` (Otsu over the whole volume by default: separates brain and CSF
    from air, bone and the darker scalp); the largest 3D connected component; holes filled in
    3D (dark vessels, not the skull base, which touches the array border); then an in-plane
    erosion of ``erosion_mm`` that drops the partial-volume rim where the CSF meets the skull.

    Parameters
    ----------
    image:
        ``[slice, row, column]`` signal, any real dtype.
    threshold:
        Signal threshold; None for Otsu's.
    erosion_mm, pixel_mm:
        In-plane erosion depth and the pixel size (row, column spacing) in mm. 0 turns it off.

    Returns
    -------
    bool array shaped like ``image``; all False if nothing is above the threshold.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"image must be [slice, row, column], got shape {image.shape}")
    finite = np.isfinite(image)
    if not finite.any():
        return np.zeros(image.shape, dtype=bool)
    if threshold is None:
        values = image[finite]
        threshold = float(threshold_otsu(values)) if values.min() < values.max() else float(values.min())
    mask = ndimage.binary_fill_holes(_largest_component(finite & (image > threshold)))
    return _erode_in_plane(mask, erosion_mm, pixel_mm)


def head_mask_from_adc(
    adc: np.ndarray,
    *,
    floor: float = 100.0,
    erosion_mm: float = 12.0,
    pixel_mm: float | tuple[float, float] = 1.8,
) -> np.ndarray:
    """Rough intracranial mask from an ADC map alone, for studies without a b = 0 image.

    ADC does not separate brain from scalp by intensity, so this takes the head (ADC above
    ``floor``, the largest component, holes filled per slice) and erodes it in-plane by the
    usual scalp and skull thickness, ``erosion_mm``. Cruder than ``brain_mask_mr``: cortex at
    a thin-skulled vertex may be cut, thick scalp kept. Returns a bool array shaped like ``adc``.
    """
    adc = np.asarray(adc, dtype=np.float32)
    if adc.ndim != 3:
        raise ValueError(f"adc must be [slice, row, column], got shape {adc.shape}")
    head = _largest_component(np.isfinite(adc) & (adc > floor))
    head = np.stack([ndimage.binary_fill_holes(s) for s in head])
    return _erode_in_plane(head, erosion_mm, pixel_mm)


def core_mask(
    adc: np.ndarray,
    brain: np.ndarray,
    threshold: float,
    *,
    voxel_ml: float,
    min_volume_ml: float,
    floor: float = 100.0,
    connectivity: int = 1,
) -> CoreMask:
    """Ischaemic core: ``floor < ADC < threshold`` inside ``brain``, small clusters removed.

    Parameters
    ----------
    adc:
        ``[slice, row, column]`` ADC in 1e-6 mm2/s.
    brain:
        bool mask of the same shape; voxels outside are never core.
    threshold:
        Core threshold in 1e-6 mm2/s (620 is the usual one, as in DEFUSE 3).
    voxel_ml:
        Volume of one voxel in mL (``Geometry.voxel_volume_ml``).
    min_volume_ml:
        Connected components smaller than this (mL) are dropped as noise.
    floor:
        ADC at or below this is background or noise (ADC maps are 0 outside the head), not core.
    connectivity:
        3D neighbourhood for the components: 1 = faces (6 neighbours, the default), 2 = edges
        (18), 3 = corners (26). With noisy single-average DWI, 26-connectivity chains isolated
        noise voxels in normal white matter into clusters large enough to survive.

    Returns
    -------
    ``CoreMask(mask, volume_ml)``: bool mask shaped like ``adc`` and its volume in mL.
    """
    adc = np.asarray(adc)
    brain = np.asarray(brain, dtype=bool)
    if adc.shape != brain.shape or adc.ndim != 3:
        raise ValueError(f"adc and brain must be one [slice, row, column] shape, got {adc.shape} and {brain.shape}")
    if voxel_ml <= 0:
        raise ValueError(f"voxel_ml must be positive, got {voxel_ml}")
    if connectivity not in (1, 2, 3):
        raise ValueError(f"connectivity must be 1, 2 or 3, got {connectivity}")
    candidate = brain & np.isfinite(adc) & (adc > floor) & (adc < threshold)
    structure = ndimage.generate_binary_structure(3, connectivity)
    labels, count = ndimage.label(candidate, structure=structure)
    if count == 0:
        return CoreMask(candidate, 0.0)
    sizes_ml = np.bincount(labels.ravel())[1:] * voxel_ml
    keep = np.zeros(count + 1, dtype=bool)
    keep[1:] = sizes_ml >= min_volume_ml
    mask = keep[labels]
    return CoreMask(mask, float(mask.sum()) * voxel_ml)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest face-connected component of ``mask`` (``mask`` itself when it is empty)."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _erode_in_plane(mask: np.ndarray, depth_mm: float, pixel_mm: float | tuple[float, float]) -> np.ndarray:
    """Erode each slice by ``depth_mm`` (Euclidean, in mm); the mask stays bool."""
    if depth_mm <= 0:
        return mask
    spacing = (pixel_mm, pixel_mm) if np.isscalar(pixel_mm) else tuple(pixel_mm)  # type: ignore[arg-type]
    out = np.zeros_like(mask)
    for k, plane in enumerate(mask):
        if plane.any():
            padded = np.pad(plane, 1)  # the array border counts as outside
            inside = ndimage.distance_transform_edt(padded, sampling=spacing)[1:-1, 1:-1]
            out[k] = inside > depth_mm
    return out
