"""From perfusion maps to the clinical decision: core, hypoperfusion, volumes and DEFUSE 3 mismatch.

Arrays follow the house contract ``[slice, row, column]`` (``(Z, Y, X)``); maps are float
(``cbf`` mL/100 g/min, ``cbv`` mL/100 g, ``tmax`` s), masks bool of the same shape. Volumes are in
mL (``voxel_ml`` is one voxel's volume, ``Geometry.voxel_volume_ml``). Connectivity is 3D with
faces only (6-connectivity), so two blobs touching at an edge or a corner are two blobs.

Which voxels count as brain is the caller's choice, through the ``brain`` mask: CSF, bone and
large vessels belong outside it (``exclude_vessels`` helps with the vessels on a CBV map).

Definitions (RAPID / DEFUSE 3 conventions)
    core (CT)           CBF < ``ratio`` (0.30) x the contralateral normal-tissue CBF
    hypoperfused        Tmax > 6 s
    penumbra            hypoperfused and not core (a volume of voxels)
    mismatch volume     hypoperfused volume - core volume (a difference of volumes; equals the
                        penumbra when the core lies inside the hypoperfused region)
    mismatch ratio      hypoperfused volume / core volume
    HIR                 volume(Tmax > 10 s) / volume(Tmax > 6 s), hypoperfusion intensity ratio
    target mismatch     core < 70 mL, mismatch ratio >= 1.8 and mismatch volume >= 15 mL
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from service.config import setting_default
from service.errors import InputError
from service.findings import Measurement

FACES = ndimage.generate_binary_structure(3, 1)
"""3D face connectivity (6-neighbourhood)."""

HYPOPERFUSION_TMAX_S: float = setting_default("tmax_threshold_s")
"""Tmax above which tissue is hypoperfused (s)."""
SEVERE_TMAX_S = 10.0
"""Tmax above which hypoperfusion is severe, the numerator of the HIR (s)."""
CORE_RCBF: float = setting_default("core_rcbf_threshold")
"""Relative CBF below which CT perfusion calls tissue core."""


@dataclass(frozen=True)
class Defuse3Criteria:
    """The DEFUSE 3 target-mismatch profile (Albers 2018), volumes in mL.

    A patient has the profile when ``core_ml < max_core_ml`` (strict), ``hypoperfused / core >=
    min_ratio`` (a core of 0 mL meets any ratio) and ``hypoperfused - core >= min_mismatch_ml``.
    """

    max_core_ml: float = setting_default("target_max_core_ml")
    min_ratio: float = setting_default("target_min_mismatch_ratio")
    min_mismatch_ml: float = setting_default("target_min_mismatch_ml")

    def __post_init__(self) -> None:
        if not (self.max_core_ml > 0 and self.min_ratio > 0 and self.min_mismatch_ml >= 0):
            raise ValueError(f"criteria must be positive (mismatch non-negative), got {self}")

    def unmet(self, core_ml: float, hypoperfused_ml: float) -> tuple[str, ...]:
        """The criteria that ``core_ml`` and ``hypoperfused_ml`` fail, as readable phrases
        (empty when the profile is met)."""
        core, hypo = float(core_ml), float(hypoperfused_ml)
        if not (np.isfinite(core) and np.isfinite(hypo) and core >= 0 and hypo >= 0):
            raise ValueError(
                f"volumes must be finite and non-negative, got core {core_ml}, hypoperfused {hypoperfused_ml}"
            )
        failed = []
        if not core < self.max_core_ml:
            failed.append(f"core {core:.1f} mL is not below {self.max_core_ml:g} mL")
        if core > 0 and not hypo / core >= self.min_ratio:
            failed.append(f"mismatch ratio {hypo / core:.2f} is below {self.min_ratio:g}")
        if not hypo - core >= self.min_mismatch_ml:
            failed.append(f"mismatch {hypo - core:.1f} mL is below {self.min_mismatch_ml:g} mL")
        return tuple(failed)

    def is_target(self, core_ml: float, hypoperfused_ml: float) -> bool:
        """Whether the volumes meet the target-mismatch profile."""
        return not self.unmet(core_ml, hypoperfused_ml)


@dataclass(frozen=True)
class ContralateralReference:
    """The CBF of normal tissue in the unaffected hemisphere.

    Attributes
    ----------
    cbf:
        Mean (or median) CBF of the reference voxels, mL/100 g/min.
    n_voxels:
        Number of reference voxels.
    affected:
        ``"hemisphere"`` when the hemisphere mask's True side is the affected one,
        ``"other"`` when its False side is, ``"undecided"`` when neither has more Tmax > 6 s
        volume (then both hemispheres' normal tissue is the reference). With ``midline_column``,
        the mask's True side is the columns below the midline.
    reference:
        bool ``(Z, Y, X)``: the voxels averaged.
    """

    cbf: float
    n_voxels: int
    affected: Literal["hemisphere", "other", "undecided"]
    reference: np.ndarray


@dataclass(frozen=True)
class PerfusionSummary:
    """Volumes and the treatment-selection verdict of one study; JSON-safe through ``as_dict``.

    Volumes in mL. ``mismatch_ratio`` is ``hypoperfused_ml / core_ml``, or None when the core is
    0 mL (the ratio is infinite, or undefined if there is no hypoperfusion either; JSON has no
    infinity). ``hypoperfusion_intensity_ratio`` is None when there is no Tmax > 6 s tissue.
    ``unmet_criteria`` lists the DEFUSE 3 criteria not met (empty when ``target_mismatch``).
    """

    core_ml: float
    hypoperfused_ml: float
    penumbra_ml: float
    mismatch_ml: float
    mismatch_ratio: float | None
    hypoperfusion_intensity_ratio: float | None
    target_mismatch: bool
    unmet_criteria: tuple[str, ...]
    criteria: Defuse3Criteria

    def measurements(self) -> dict[Measurement, float]:
        """The Findings measurements; ratios that are undefined (no core, no hypoperfusion) are
        left out."""
        values = {
            Measurement.CORE_VOLUME: self.core_ml,
            Measurement.PENUMBRA_VOLUME: self.penumbra_ml,
            Measurement.HYPOPERFUSED_VOLUME: self.hypoperfused_ml,
            Measurement.MISMATCH_VOLUME: self.mismatch_ml,
            Measurement.TARGET_MISMATCH: float(self.target_mismatch),
        }
        if self.mismatch_ratio is not None:
            values[Measurement.MISMATCH_RATIO] = self.mismatch_ratio
        if self.hypoperfusion_intensity_ratio is not None:
            values[Measurement.HYPOPERFUSION_INTENSITY_RATIO] = self.hypoperfusion_intensity_ratio
        return values

    def as_dict(self) -> dict[str, object]:
        """Plain Python values only (floats, bools, None, lists, dicts)."""
        out = asdict(self)
        out["unmet_criteria"] = list(self.unmet_criteria)
        return out


def hemisphere_from_midline(shape: tuple[int, int, int], midline_column: float) -> np.ndarray:
    """bool ``shape``: True on the columns below ``midline_column`` (a column index, may be
    fractional). With the phantom's and most axial CT geometries (rows along +x, LPS) the low
    columns are the patient's right."""
    if len(shape) != 3:
        raise ValueError(f"shape must be [slice, row, column], got {shape}")
    if not (np.isfinite(midline_column) and 0 < midline_column < shape[2]):
        raise ValueError(f"midline_column must lie inside the {shape[2]} columns, got {midline_column}")
    columns = np.arange(shape[2]) < midline_column
    return np.broadcast_to(columns, shape).copy()


def midline_column(brain: np.ndarray) -> float:
    """The brain's mean column index: a rough midline for a head that is not much rotated.

    Raises ``InputError`` when the brain mask is empty."""
    region = _mask(brain, "brain")
    if not region.any():
        raise InputError("the brain mask is empty")
    return float(np.argwhere(region)[:, 2].mean())


def contralateral_reference(
    cbf: np.ndarray,
    brain: np.ndarray,
    tmax: np.ndarray,
    *,
    hemisphere: np.ndarray | None = None,
    midline: float | None = None,
    normal_tmax: float = 4.0,
    side_tmax: float = HYPOPERFUSION_TMAX_S,
    statistic: Literal["mean", "median"] = "mean",
) -> ContralateralReference:
    """Mean CBF of normal tissue (Tmax <= ``normal_tmax`` s) in the unaffected hemisphere.

    The affected hemisphere is the one with more brain at Tmax > ``side_tmax`` s. Give the
    hemispheres either as ``hemisphere`` (bool ``(Z, Y, X)``, True on one side) or as a
    ``midline`` column index (default: ``midline_column(brain)``).

    Parameters
    ----------
    cbf:
        ``(Z, Y, X)`` CBF, mL/100 g/min.
    brain:
        ``(Z, Y, X)`` bool, parenchyma without CSF and large vessels.
    tmax:
        ``(Z, Y, X)`` Tmax, s.

    Raises
    ------
    ValueError: shapes differ, or both or a bad hemisphere given.
    InputError: the brain mask is empty, or no normal tissue to average.
    """
    cbf_map, brain_mask = _map(cbf, "cbf"), _mask(brain, "brain")
    tmax_map = _map(tmax, "tmax")
    _same_shape(cbf=cbf_map, brain=brain_mask, tmax=tmax_map)
    if statistic not in ("mean", "median"):
        raise ValueError(f"statistic must be 'mean' or 'median', got {statistic!r}")
    if hemisphere is not None and midline is not None:
        raise ValueError("give hemisphere or midline, not both")
    if hemisphere is None:
        side = hemisphere_from_midline(brain_mask.shape, midline_column(brain_mask) if midline is None else midline)
    else:
        side = _mask(hemisphere, "hemisphere")
        _same_shape(brain=brain_mask, hemisphere=side)
    slow = brain_mask & (tmax_map > side_tmax)
    in_side, in_other = int((slow & side).sum()), int((slow & ~side).sum())
    if in_side > in_other:
        affected, unaffected = "hemisphere", ~side
    elif in_other > in_side:
        affected, unaffected = "other", side
    else:
        affected, unaffected = "undecided", np.ones_like(side)
    reference = brain_mask & unaffected & (tmax_map <= normal_tmax) & np.isfinite(cbf_map)
    if not reference.any():
        raise InputError(f"no normal tissue (Tmax <= {normal_tmax:g} s) in the unaffected hemisphere to take as reference")
    values = cbf_map[reference]
    value = float(values.mean() if statistic == "mean" else np.median(values))
    return ContralateralReference(value, int(reference.sum()), affected, reference)


def core_mask_ct(
    cbf: np.ndarray,
    reference: float | ContralateralReference,
    brain: np.ndarray,
    ratio: float = CORE_RCBF,
) -> np.ndarray:
    """bool ``(Z, Y, X)``: brain where CBF < ``ratio`` x the reference CBF (mL/100 g/min)."""
    cbf_map, brain_mask = _map(cbf, "cbf"), _mask(brain, "brain")
    _same_shape(cbf=cbf_map, brain=brain_mask)
    value = reference.cbf if isinstance(reference, ContralateralReference) else float(reference)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"reference CBF must be positive, got {value}")
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    return brain_mask & (cbf_map < ratio * value)


def hypoperfused_mask(tmax: np.ndarray, brain: np.ndarray, threshold: float = HYPOPERFUSION_TMAX_S) -> np.ndarray:
    """bool ``(Z, Y, X)``: brain where Tmax > ``threshold`` s (strictly)."""
    tmax_map, brain_mask = _map(tmax, "tmax"), _mask(brain, "brain")
    _same_shape(tmax=tmax_map, brain=brain_mask)
    if not (np.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be a positive number of seconds, got {threshold}")
    return brain_mask & (tmax_map > threshold)


def exclude_vessels(mask: np.ndarray, cbv: np.ndarray, limit: float) -> np.ndarray:
    """``mask`` without the voxels whose CBV exceeds ``limit`` mL/100 g (large vessels: normal
    grey matter is 4-6 mL/100 g, a voxel full of blood about 100 / rho * k_H; 8-10 is a usual
    cut)."""
    region, cbv_map = _mask(mask, "mask"), _map(cbv, "cbv")
    _same_shape(mask=region, cbv=cbv_map)
    if not (np.isfinite(limit) and limit > 0):
        raise ValueError(f"limit must be positive mL/100 g, got {limit}")
    return region & ~(cbv_map > limit)


def remove_specks(mask: np.ndarray, min_ml: float, voxel_ml: float) -> np.ndarray:
    """``mask`` without its face-connected 3D components smaller than ``min_ml`` mL."""
    region = _mask(mask, "mask")
    if region.ndim != 3:
        raise ValueError(f"mask must be [slice, row, column], got shape {region.shape}")
    _check_voxel(voxel_ml)
    if not (np.isfinite(min_ml) and min_ml >= 0):
        raise ValueError(f"min_ml must be non-negative, got {min_ml}")
    labels, count = ndimage.label(region, structure=FACES)
    if count == 0:
        return region.copy()
    sizes = np.bincount(labels.ravel(), minlength=count + 1) * voxel_ml
    keep = sizes >= min_ml
    keep[0] = False
    return keep[labels]


def volume_ml(mask: np.ndarray, voxel_ml: float) -> float:
    """Volume of a bool mask, mL."""
    _check_voxel(voxel_ml)
    return float(np.count_nonzero(_mask(mask, "mask"))) * float(voxel_ml)


def volumes(masks: dict[str, np.ndarray], voxel_ml: float) -> dict[str, float]:
    """Volume of each named bool mask, mL."""
    return {name: volume_ml(mask, voxel_ml) for name, mask in masks.items()}


def summarise(
    core: np.ndarray,
    hypoperfused: np.ndarray,
    tmax: np.ndarray,
    brain: np.ndarray,
    voxel_ml: float,
    criteria: Defuse3Criteria = Defuse3Criteria(),
    *,
    severe_tmax: float = SEVERE_TMAX_S,
    hypoperfusion_tmax: float = HYPOPERFUSION_TMAX_S,
) -> PerfusionSummary:
    """Volumes, ratios and the DEFUSE 3 verdict from final core and hypoperfusion masks.

    ``core`` and ``hypoperfused`` are the masks as reported (after any speck removal); the HIR is
    read from ``tmax`` within ``brain``: ``volume(Tmax > severe_tmax) / volume(Tmax >
    hypoperfusion_tmax)``. All arrays ``(Z, Y, X)``; ``voxel_ml`` mL.
    """
    core_m, hypo_m = _mask(core, "core"), _mask(hypoperfused, "hypoperfused")
    tmax_map, brain_mask = _map(tmax, "tmax"), _mask(brain, "brain")
    _same_shape(core=core_m, hypoperfused=hypo_m, tmax=tmax_map, brain=brain_mask)
    _check_voxel(voxel_ml)
    if not 0 < hypoperfusion_tmax < severe_tmax:
        raise ValueError(f"need 0 < hypoperfusion_tmax < severe_tmax, got {hypoperfusion_tmax} and {severe_tmax}")
    core_ml = volume_ml(core_m, voxel_ml)
    hypo_ml = volume_ml(hypo_m, voxel_ml)
    penumbra_ml = volume_ml(hypo_m & ~core_m, voxel_ml)
    slow = int(np.count_nonzero(brain_mask & (tmax_map > hypoperfusion_tmax)))
    severe = int(np.count_nonzero(brain_mask & (tmax_map > severe_tmax)))
    unmet = criteria.unmet(core_ml, hypo_ml)
    return PerfusionSummary(
        core_ml=core_ml,
        hypoperfused_ml=hypo_ml,
        penumbra_ml=penumbra_ml,
        mismatch_ml=hypo_ml - core_ml,
        mismatch_ratio=hypo_ml / core_ml if core_ml > 0 else None,
        hypoperfusion_intensity_ratio=severe / slow if slow else None,
        target_mismatch=not unmet,
        unmet_criteria=unmet,
        criteria=criteria,
    )


def _map(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 3:
        raise ValueError(f"{name} must be [slice, row, column], got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"{name} must be a real-valued map, got dtype {array.dtype}")
    return array


def _mask(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype != bool:
        raise ValueError(f"{name} must be a bool mask, got dtype {array.dtype}")
    return array


def _same_shape(**arrays: np.ndarray) -> None:
    shapes = {name: a.shape for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"arrays must share one shape, got {shapes}")


def _check_voxel(voxel_ml: float) -> None:
    if not (np.isfinite(voxel_ml) and voxel_ml > 0):
        raise ValueError(f"voxel_ml must be positive, got {voxel_ml}")
