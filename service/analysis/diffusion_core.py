"""MRI diffusion core: a study's DWI (and ADC) series in, the ischaemic core as Findings out.

Stages (each timed in ``Findings.timings_s``):

- load: read the instances, find the DWI and ADC series (``imaging.classify``), stack them
  (``imaging.volumes``);
- adc: the forwarded ADC series when there is one on the DWI grid, else ADC computed from the
  DWI b = 0 and highest b-value (>= 500 s/mm2) images;
- mask: the intracranial mask from the b = 0 image (from the ADC alone when there is none);
- core: ADC below the threshold inside the mask, small clusters removed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

from service.findings import Analysis, Findings, MapName, Measurement, Segment, SegmentKind
from service.errors import InputError
from service.imaging.classify import DEFAULT_RULES, ClassifyRules, classify
from service.imaging.volumes import (
    PIXEL_KEYWORDS,
    Source,
    Volume,
    group_series,
    load_diffusion,
    load_volume,
    read_dataset,
)
from service.perfusion.diffusion import adc_map as compute_adc
from service.perfusion.diffusion import brain_mask_mr, core_mask, head_mask_from_adc

ANALYSIS = Analysis.MRI_DIFFUSION_CORE
MIN_HIGH_B = 500.0  # s/mm2: the highest b-value must reach this to compute ADC
MAX_LOW_B = 100.0  # s/mm2: the lowest b-value must be at most this ("b = 0")
FEW_BRAIN_ML = 500.0  # an intracranial mask smaller than this is flagged
PLAUSIBLE_MEDIAN_ADC = (400.0, 1600.0)  # 1e-6 mm2/s, median ADC inside the mask

SeriesInput = Mapping[str, Sequence[Source]] | Sequence[Source]
"""Either {"dwi": [...], "adc": [...]} (paths or Datasets; other keys are ignored) or all the
instances of the study (paths or Datasets), which are then grouped into series and classified."""


@dataclass
class _Inputs:
    dwi: list[list[Dataset]] = field(default_factory=list)
    adc: list[list[Dataset]] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)  # kinds of every series seen, for messages


def analyse_diffusion_core(
    source: SeriesInput,
    *,
    study_uid: str | None = None,
    version: int = 1,
    adc_threshold: float,
    min_lesion_ml: float,
    rules: ClassifyRules = DEFAULT_RULES,
) -> Findings:
    """Ischaemic core (ADC < ``adc_threshold`` 1e-6 mm2/s) of one MRI study, as Findings.

    ``study_uid`` None means the one study the instances belong to. The Findings hold one
    Segment "core" on the grid of the series the ADC came from (the ADC series, or the DWI
    high-b images), whose headers are ``source_images``. Raises InputError when the study has
    no usable diffusion data (no DWI or ADC series; a DWI with only one b-value and no ADC;
    a highest b-value below 500) or its series are not regular stacks.
    """
    if adc_threshold <= 0:
        raise InputError(f"adc_threshold must be positive, got {adc_threshold}")
    if min_lesion_ml < 0:
        raise InputError(f"min_lesion_ml must not be negative, got {min_lesion_ml}")
    timings: dict[str, float] = {}
    flags: list[str] = []

    started = time.perf_counter()
    inputs = _collect(source, rules)
    if not inputs.dwi and not inputs.adc:
        found = ", ".join(sorted(set(inputs.kinds))) or "nothing"
        raise InputError(f"no DWI or ADC series in the study (found: {found})")
    study_uid = _check_study(inputs, study_uid)
    diffusion = _choose_dwi(inputs.dwi, flags)
    adc_volume = _choose_adc(inputs.adc, diffusion, flags)
    timings["load"] = time.perf_counter() - started

    started = time.perf_counter()
    b_low_volume: Volume | None = None
    if diffusion:
        b_low = min(diffusion)
        b_low_volume = diffusion[b_low] if b_low <= MAX_LOW_B else None
    if adc_volume is not None:
        grid = adc_volume
        adc = _adc_in_micro_units(adc_volume.pixels, flags)
    else:
        b_low, b_high = _usable_b_values(diffusion)
        grid = diffusion[b_high]
        adc = compute_adc(diffusion[b_low].pixels, diffusion[b_high].pixels, b_high, b_low=b_low)
        if b_high < 800:
            flags.append(f"low b-value ({b_high:g} s/mm2): the ADC threshold assumes b = 1000")
    timings["adc"] = time.perf_counter() - started

    started = time.perf_counter()
    geometry = grid.geometry
    pixel_mm = geometry.spacing[1:]
    if b_low_volume is not None and _same_grid(b_low_volume, grid):
        brain = brain_mask_mr(b_low_volume.pixels, pixel_mm=pixel_mm)
    else:
        brain = head_mask_from_adc(adc, pixel_mm=pixel_mm)
        flags.append("brain mask from the ADC alone (no b = 0 image on the ADC grid): approximate")
    brain_ml = float(brain.sum()) * geometry.voxel_volume_ml
    if not brain.any():
        raise InputError(f"series {grid.series_uid}: no brain found (the intracranial mask is empty)")
    if brain_ml < FEW_BRAIN_ML:
        flags.append(f"few brain voxels: intracranial mask {brain_ml:.0f} mL")
    median = float(np.median(adc[brain]))
    if not PLAUSIBLE_MEDIAN_ADC[0] <= median <= PLAUSIBLE_MEDIAN_ADC[1]:
        flags.append(f"implausible ADC: median {median:.0f} x 1e-6 mm2/s inside the intracranial mask")
    timings["mask"] = time.perf_counter() - started

    started = time.perf_counter()
    core = core_mask(adc, brain, adc_threshold, voxel_ml=geometry.voxel_volume_ml, min_volume_ml=min_lesion_ml)
    timings["core"] = time.perf_counter() - started

    dwi = None
    if diffusion and max(diffusion) >= MIN_HIGH_B and _same_grid(diffusion[max(diffusion)], grid):
        dwi = np.where(brain, diffusion[max(diffusion)].pixels, 0.0).astype(np.float32)
    return Findings(
        study_uid=study_uid,
        version=version,
        analysis=ANALYSIS,
        geometry=geometry,
        source_images=list(grid.headers),
        segments=[Segment(key=SegmentKind.CORE, label="Ischemic core", mask=core.mask, volume_ml=core.volume_ml)],
        measurements={Measurement.CORE_VOLUME: core.volume_ml},
        qc_flags=flags,
        parameters={"adc_threshold": float(adc_threshold), "min_lesion_ml": float(min_lesion_ml)},
        maps={MapName.ADC: np.where(brain, adc, 0.0).astype(np.float32)},
        timings_s=timings,
        dwi=dwi,
    )


def _collect(source: SeriesInput, rules: ClassifyRules) -> _Inputs:
    """The DWI and ADC series (lists of Datasets, with pixel data) of ``source``."""
    inputs = _Inputs()
    if isinstance(source, Mapping):
        for kind in ("dwi", "adc"):
            for series in group_series(source.get(kind) or []).values():
                getattr(inputs, kind).append(series)
                inputs.kinds.append(kind)
        return inputs
    if isinstance(source, str | bytes):
        raise InputError("expected a list of instances (paths or Datasets), got one string")
    for series in group_series(source, headers_only=True).values():
        kind = classify(series, rules)
        inputs.kinds.append(kind)
        if kind in ("dwi", "adc"):
            getattr(inputs, kind).append([_with_pixels(ds) for ds in series])
    return inputs


def _with_pixels(ds: Dataset) -> Dataset:
    """``ds`` itself if it has pixel data, else re-read in full from its file."""
    if any(k in ds for k in PIXEL_KEYWORDS):
        return ds
    filename = getattr(ds, "filename", None)
    if isinstance(filename, str) and filename:
        return read_dataset(filename)
    return ds  # a Dataset given without pixel data: load_volume says so


def _check_study(inputs: _Inputs, study_uid: str | None) -> str:
    found = {str(ds.get("StudyInstanceUID", "")) for series in inputs.dwi + inputs.adc for ds in series}
    if study_uid is None:
        if len(found) != 1:
            raise InputError(f"the DWI/ADC instances belong to {len(found)} studies; analyse one study at a time")
        return found.pop()
    stray = found - {study_uid}
    if stray:
        raise InputError(f"instances of study {sorted(stray)[0]} mixed into study {study_uid}")
    return study_uid


def _usable_b_values(diffusion: dict[float, Volume] | None) -> tuple[float, float]:
    """(lowest, highest) b-value of a DWI that can give ADC; InputError saying why not."""
    if not diffusion:
        raise InputError("no DWI series and no usable ADC series")
    b_values = sorted(diffusion)
    listed = ", ".join(f"{b:g}" for b in b_values)
    need = f"need b=0 and b>={MIN_HIGH_B:g}, or an ADC series"
    if len(b_values) == 1:
        raise InputError(f"DWI has only one b-value ({listed}); {need}")
    if b_values[-1] < MIN_HIGH_B:
        raise InputError(f"DWI highest b-value is {b_values[-1]:g} (b-values {listed}); {need}")
    if b_values[0] > MAX_LOW_B:
        raise InputError(f"DWI has no b=0 image (b-values {listed}); {need}")
    return b_values[0], b_values[-1]


def _choose_dwi(candidates: list[list[Dataset]], flags: list[str]) -> dict[float, Volume] | None:
    """The DWI to use, {b: Volume}: one that can give ADC if any, the highest b, most b-values.

    A b = 0 missing from the chosen series is taken from another DWI series on the same grid
    (vendors that send b = 0 and b = 1000 as separate series).
    """
    if not candidates:
        return None
    loaded = [load_diffusion(series) for series in candidates]

    def rank(d: dict[float, Volume]) -> tuple:
        number = d[max(d)].headers[0].get("SeriesNumber")
        return (_can_give_adc(d), max(d), len(d), int(number) if number not in (None, "") else -1)

    chosen = dict(max(loaded, key=rank))
    if len(loaded) > 1:
        flags.append(f"{len(loaded)} DWI series; used series {chosen[max(chosen)].series_uid}")
    if min(chosen) > MAX_LOW_B:
        for other in loaded:
            low = min(other)
            if low <= MAX_LOW_B and _same_grid(other[low], chosen[max(chosen)]):
                chosen[low] = other[low]
                flags.append(f"b={low:g} images from series {other[low].series_uid}")
                break
    return dict(sorted(chosen.items()))


def _choose_adc(
    candidates: list[list[Dataset]], diffusion: dict[float, Volume] | None, flags: list[str]
) -> Volume | None:
    """The ADC series to use: one on the DWI grid if any, else the highest SeriesNumber.

    With a DWI that can give ADC itself, an unloadable ADC series, or one on another grid, is
    set aside with a flag; without one, its problem is the study's.
    """
    if not candidates:
        return None
    dwi_usable = _can_give_adc(diffusion)
    volumes: list[Volume] = []
    for series in candidates:
        try:
            volumes.append(load_volume(series))
        except InputError as error:
            if not dwi_usable:
                raise
            flags.append(f"ADC series not used: {error}")
    if not volumes:
        return None
    if diffusion:
        reference = diffusion[max(diffusion)]
        on_grid = [v for v in volumes if _same_grid(v, reference)]
        if on_grid:
            volumes = on_grid
        elif dwi_usable:
            flags.append("ADC series on a different grid from the DWI; ADC computed from the DWI")
            return None

    def number(v: Volume) -> int:
        value = v.headers[0].get("SeriesNumber")
        return int(value) if value not in (None, "") else -1

    chosen = max(volumes, key=number)
    if len(volumes) > 1:
        flags.append(f"{len(volumes)} ADC series; used series {chosen.series_uid}")
    return chosen


def _adc_in_micro_units(pixels: np.ndarray, flags: list[str]) -> np.ndarray:
    """ADC series values in 1e-6 mm2/s; series stored in mm2/s or 1e-3 mm2/s are rescaled."""
    positive = pixels[pixels > 0]
    median = float(np.median(positive)) if positive.size else 0.0
    if 0.0 < median < 0.01:
        flags.append("ADC series values looked like mm2/s; scaled by 1e6")
        return (pixels * 1e6).astype(np.float32)
    if 0.01 <= median < 10.0:
        flags.append("ADC series values looked like 1e-3 mm2/s; scaled by 1000")
        return (pixels * 1e3).astype(np.float32)
    return pixels.astype(np.float32, copy=False)


def _can_give_adc(diffusion: dict[float, Volume] | None) -> bool:
    """Whether a DWI has a b = 0 (<= MAX_LOW_B) and a high (>= MIN_HIGH_B) b-value."""
    return bool(diffusion) and len(diffusion) > 1 and max(diffusion) >= MIN_HIGH_B and min(diffusion) <= MAX_LOW_B


def _same_grid(a: Volume, b: Volume) -> bool:
    return a.geometry.shape == b.geometry.shape and np.allclose(a.geometry.affine, b.geometry.affine, atol=1e-2)
