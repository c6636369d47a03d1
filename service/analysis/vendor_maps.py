"""Forwarded vendor perfusion maps (CBF, Tmax, ...) in, core, penumbra and mismatch out, as Findings.

Used when a study carries parametric maps a scanner or a commercial package computed but no raw
perfusion series. The thresholds are those of CT perfusion: core rCBF < 30 % of the
contralateral normal tissue, hypoperfusion Tmax > 6 s; the maps' own values are trusted (units
as the vendor stored them: CBF in mL/100 g/min or any relative unit, Tmax in seconds).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from service.findings import Analysis, Findings, Segment, SegmentKind
from service.errors import InputError
from service.imaging.perfusion_series import load_vendor_maps
from service.imaging.volumes import Source
from service.perfusion import thresholds

ANALYSIS = Analysis.VENDOR_MAPS
PLAUSIBLE_TMAX_S = (0.0, 60.0)
"""Tmax values outside this range (s) are not seconds: the map is refused."""


@dataclass(frozen=True)
class MapParameters:
    """Thresholds applied to vendor maps, from the settings (``AnalysisParameters``)."""

    core_rcbf: float
    tmax_threshold_s: float
    min_lesion_ml: float
    vessel_cbv: float  # mL/100 g: above it a voxel is a vessel, not tissue (grey matter is 4-6)
    criteria: thresholds.Defuse3Criteria


def analyse_vendor_maps(
    series: Mapping[str, Sequence[Source]] | Sequence[Source],
    *,
    study_uid: str | None,
    version: int,
    parameters: MapParameters,
) -> Findings:
    """Core and penumbra from vendor maps; InputError when CBF or Tmax is missing or implausible.

    ``series`` as for ``load_vendor_maps`` (instances with pixel data, or their file paths).
    The segments are drawn on the CBF map's grid, whose headers are ``source_images``.
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    maps = load_vendor_maps(series)
    missing = [name.upper() for name in ("cbf", "tmax") if name not in maps]
    if missing:
        found = ", ".join(name.upper() for name in maps)
        raise InputError(
            f"vendor perfusion maps without {' and '.join(missing)} (found {found}): core and hypoperfusion "
            "need CBF and Tmax"
        )
    cbf_volume = maps["cbf"]
    cbf = cbf_volume.pixels.astype(np.float32)
    tmax = maps["tmax"].pixels.astype(np.float32)
    timings["load"] = time.perf_counter() - started

    started = time.perf_counter()
    flags: list[str] = []
    brain = np.isfinite(cbf) & np.isfinite(tmax) & ((cbf > 0) | (tmax > 0))
    if "cbv" in maps:
        cbv = maps["cbv"].pixels
        vessels = brain & (cbv > parameters.vessel_cbv)
        if vessels.any():
            brain &= ~vessels
    if not brain.any():
        raise InputError("vendor perfusion maps: CBF and Tmax are 0 everywhere (no brain)")
    in_brain = tmax[brain]
    if in_brain.min() < PLAUSIBLE_TMAX_S[0] or np.percentile(in_brain, 99) > PLAUSIBLE_TMAX_S[1]:
        raise InputError(
            f"vendor Tmax map values {in_brain.min():.1f} to {in_brain.max():.1f} are not plausible seconds "
            f"(expected {PLAUSIBLE_TMAX_S[0]:g}-{PLAUSIBLE_TMAX_S[1]:g} s)"
        )
    geometry = cbf_volume.geometry
    voxel_ml = geometry.voxel_volume_ml
    reference = thresholds.contralateral_reference(cbf, brain, tmax)
    if reference.affected == "undecided":
        flags.append("affected hemisphere undecided: CBF reference from both hemispheres")
    hypoperfused = thresholds.remove_specks(
        thresholds.hypoperfused_mask(tmax, brain, parameters.tmax_threshold_s), parameters.min_lesion_ml, voxel_ml
    )
    core = thresholds.remove_specks(
        thresholds.core_mask_ct(cbf, reference, brain, parameters.core_rcbf), parameters.min_lesion_ml, voxel_ml
    )
    core &= hypoperfused  # low flow with a normal Tmax is CSF or noise, not core
    summary = thresholds.summarise(
        core, hypoperfused, tmax, brain, voxel_ml, parameters.criteria, hypoperfusion_tmax=parameters.tmax_threshold_s
    )
    penumbra = hypoperfused & ~core
    timings["thresholds"] = time.perf_counter() - started

    headers = list(cbf_volume.headers)
    study = str(headers[0].StudyInstanceUID)
    if study_uid is not None and study != study_uid:
        raise InputError(f"the vendor maps belong to study {study}, not {study_uid}")
    measurements = summary.measurements()
    segments = [Segment(SegmentKind.CORE, "Ischemic core", core, summary.core_ml)]
    if penumbra.any():
        segments.append(Segment(SegmentKind.PENUMBRA, "Penumbra", penumbra, summary.penumbra_ml))
    criteria = parameters.criteria
    return Findings(
        study_uid=study,
        version=version,
        analysis=ANALYSIS,
        geometry=geometry,
        source_images=headers,
        segments=segments,
        measurements=measurements,
        qc_flags=flags,
        maps={name: volume.pixels.astype(np.float32) for name, volume in maps.items()},
        parameters={
            "core_rcbf": parameters.core_rcbf, "tmax_threshold_s": parameters.tmax_threshold_s,
            "min_lesion_ml": parameters.min_lesion_ml, "reference_cbf": reference.cbf,
            "max_core_ml": criteria.max_core_ml, "min_mismatch_ratio": criteria.min_ratio,
            "min_mismatch_ml": criteria.min_mismatch_ml,
        },
        timings_s=timings,
    )
