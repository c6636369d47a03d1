"""CT perfusion: a 4D series in, core, penumbra, volumes, mismatch and QC flags out, as Findings.

Stages: load and check the series, correct head motion, find the baseline, mask the brain,
convert to concentration, denoise inside the brain, select the AIF and VOF (partial-volume
scaling), deconvolve every brain voxel with oSVD, threshold (core rCBF < 30 % of contralateral
normal tissue, hypoperfusion Tmax > 6 s), remove specks, summarise with the DEFUSE 3 verdict.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage

from service.analysis.findings import Findings, Segment
from service.errors import InputError
from service.imaging.classify import classify
from service.imaging.perfusion_series import load_ctp
from service.imaging.volumes import group_series
from service.perfusion import ctp, thresholds
from service.perfusion.aif import partial_volume_scale, select_aif, select_vof
from service.perfusion.deconvolution import deconvolve, perfusion_parameters, resample_uniform
from service.perfusion.motion import correct_motion


@dataclass(frozen=True)
class CtpParameters:
    core_rcbf: float = 0.30
    tmax_threshold_s: float = 6.0
    min_lesion_ml: float = 0.3
    method: str = "osvd"


def ctp_series(paths: Sequence[Path | str | Dataset]) -> list[str] | None:
    """File names of the study's CT perfusion series (the largest if several), or None."""
    candidates = [s for s in group_series(paths, headers_only=True).values() if classify(s) == "ctp"]
    if not candidates:
        return None
    return [ds.filename for ds in max(candidates, key=len)]


def analyse_ctp(
    paths: Sequence[Path | str], *, study_uid: str | None, version: int, parameters: CtpParameters = CtpParameters()
) -> Findings:
    """Analyse the study's CT perfusion series; InputError when it cannot be analysed."""
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = now - clock
        clock = now

    files = ctp_series(paths)
    if files is None:
        raise InputError("no CT perfusion series in the study")
    series = load_ctp(files)
    geometry, times = series.geometry, np.asarray(series.times_s, dtype=np.float64)
    flags = [f for f in (ctp.too_few_time_points(len(times)), ctp.insufficient_coverage(geometry.shape[0], geometry.spacing)) if f]
    lap("load")

    motion = correct_motion(series.frames, geometry.spacing)
    moved = ctp.excessive_motion(motion.max_displacement_mm, motion.similarity)
    if moved:
        raise InputError(f"cannot analyse: {moved}")
    if motion.max_displacement_mm > 2.0:
        flags.append(f"motion corrected (up to {motion.max_displacement_mm:.1f} mm)")
    frames = motion.frames
    lap("motion")

    n_baseline = ctp.baseline_frames(frames, times)
    brain = ctp.brain_mask_ct(frames, geometry.spacing, n_baseline)
    concentration = ctp.concentration_ct(frames, n_baseline)
    baseline = frames[:n_baseline].mean(axis=0)
    # Vessels were taken out of the brain mask; look for them in and just around it (the venous
    # sinuses lie between brain and skull), avoiding bone.
    reach = max(1, round(8.0 / min(geometry.spacing[1:])))
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    search = ndimage.binary_dilation(brain, in_plane, iterations=reach) & (baseline > -50) & (baseline < 150)
    lap("mask")

    aif = select_aif(concentration, times, search)
    vof = select_vof(concentration, times, search, aif=aif)
    scale = partial_volume_scale(aif.curve, vof.curve, times)
    flags += aif.qc_flags
    truncation = ctp.truncated_bolus(concentration[:, brain].mean(axis=1), n_baseline)
    if truncation:
        flags.append(truncation)
    lap("aif")

    smooth = ctp.denoise(concentration, geometry.spacing, brain)
    grid, curves = resample_uniform(times, np.concatenate([(aif.curve * scale)[:, None], smooth[:, brain]], axis=1))
    dt = float(grid[1] - grid[0])
    fit = deconvolve(curves[:, 1:], curves[:, 0], dt, parameters.method)
    perfusion = perfusion_parameters(fit, curves[:, 1:], curves[:, 0], dt)
    maps = {name: np.zeros(geometry.shape, dtype=np.float32) for name in ("cbf", "cbv", "mtt", "tmax")}
    for name, volume in maps.items():
        volume[brain] = getattr(perfusion, name)
    lap("deconvolution")

    voxel_ml = geometry.voxel_volume_ml
    reference = thresholds.contralateral_reference(maps["cbf"], brain, maps["tmax"])
    core = thresholds.remove_specks(
        thresholds.core_mask_ct(maps["cbf"], reference, brain, parameters.core_rcbf), parameters.min_lesion_ml, voxel_ml
    )
    hypoperfused = thresholds.remove_specks(
        thresholds.hypoperfused_mask(maps["tmax"], brain, parameters.tmax_threshold_s), parameters.min_lesion_ml, voxel_ml
    )
    core &= hypoperfused  # core is hypoperfused tissue; low flow with a normal Tmax is CSF or noise
    summary = thresholds.summarise(core, hypoperfused, maps["tmax"], brain, voxel_ml)
    penumbra = hypoperfused & ~core
    lap("thresholds")

    measurements = {
        "core_volume_ml": summary.core_ml,
        "penumbra_volume_ml": summary.penumbra_ml,
        "hypoperfused_volume_ml": summary.hypoperfused_ml,
        "mismatch_volume_ml": summary.mismatch_ml,
        "target_mismatch": float(summary.target_mismatch),
    }
    if summary.mismatch_ratio is not None:
        measurements["mismatch_ratio"] = summary.mismatch_ratio
    if summary.hypoperfusion_intensity_ratio is not None:
        measurements["hypoperfusion_intensity_ratio"] = summary.hypoperfusion_intensity_ratio
    source = list(series.headers[0])
    study = str(source[0].StudyInstanceUID)
    if study_uid is not None and study != study_uid:
        raise InputError(f"the CT perfusion series belongs to study {study}, not {study_uid}")
    return Findings(
        study_uid=study,
        version=version,
        analysis="ct-perfusion",
        geometry=geometry,
        source_images=source,
        segments=[
            Segment("core", "Ischemic core", core, summary.core_ml),
            Segment("penumbra", "Penumbra", penumbra, summary.penumbra_ml),
        ],
        measurements=measurements,
        qc_flags=flags,
        parameters={"core_rcbf": parameters.core_rcbf, "tmax_threshold_s": parameters.tmax_threshold_s,
                    "min_lesion_ml": parameters.min_lesion_ml, "aif_partial_volume_scale": scale,
                    "reference_cbf": reference.cbf},
        timings_s=timings,
    )
