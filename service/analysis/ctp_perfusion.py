"""CT perfusion: a 4D series in, core, penumbra, volumes, mismatch and QC flags out, as Findings.

Stages: load and check the series; average 512-matrix frames to ~0.9 mm pixels; correct head
motion (fail beyond 1 mm of displacement); find the baseline, mask the brain, convert to
concentration; select the AIF (fail on a truncated bolus) and the VOF (partial-volume scaling);
denoise inside the brain with the edge-preserving TIPS filter; deconvolve every brain voxel with
oSVD and correct SVD's biases (late Tmax, low fast flow) with a calibration on the study's own
AIF; take vessels (CBV above 8 mL/100 g) out of the brain; put the grey/white matter structure
that the denoising smoothed away back into CBF and CBV from the temporal mean image; read the
CBF of delayed tissue (Tmax > 6 s), which SVD reads high at low flow, as the geometric mean of two
estimates: SVD's through the low-flow calibration (service.perfusion.low_flow) at the frames'
noise, and the model-free CBV over the MTT of the best fit among gamma and box residues
(deconvolution.fit_residue: the central volume theorem holds for any transit-time distribution), which read near-threshold cores high and low by turns on
the tuning families; threshold
(core rCBF < 30 % of the contralateral normal tissue within Tmax > 6 s, hypoperfusion Tmax > 6 s),
remove specks, summarise with the DEFUSE 3 verdict; masks back on the acquired grid.

Each stage is a function (``resample_stage`` ... ``threshold_stage``) from and to small frozen
dataclasses (PreparedSeries, BrainTissue, ArterialInput, PerfusionMaps, ReferencedMaps, Lesions),
so that one can be swapped or a learned stage slotted in; ``analyse_ctp_series`` calls them in
order and times each.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TypeVar
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage

from service.analysis.ctp_model import CtpModelRequest, ModelCorePenumbra, ModelInputs, model_inputs, run_ctp_model
from service.config import setting_default
from service.findings import Analysis, CoreMethod, Findings, Segment, SegmentKind
from service.errors import InputError, ModelError
from service.imaging.classify import classify
from service.imaging.geometry import Geometry
from service.imaging.perfusion_series import load_ctp
from service.imaging.volumes import group_series
from service.perfusion import anatomy, ctp, low_flow, thresholds
from service.perfusion.aif import FLAG_TRUNCATED, partial_volume_scale, select_aif, select_vof
from service.perfusion.deconvolution import (
    K_H, MODEL_MTT_S, RESIDUE_SHAPES, RHO, apply_bias, bias_of, calibrate_bias, deconvolve, choose_residue_shape, fit_residue, mean_transit_time, perfusion_parameters,
    resample_uniform,
)
from service.perfusion.motion import correct_motion


Stage = TypeVar("Stage")

CORRECTABLE_MOTION_MM = 1.0
"""Head displacement between frames up to which correcting it leaves the volumes as they were."""


class DelayedFlow(StrEnum):
    """Which estimate is the CBF of delayed tissue (Tmax > 6 s), where SVD reads low flows high."""

    SVD = "svd"  # the deconvolution's, through the low-flow correction when on
    MODEL = "model"  # the amplitude of the best residue-model fit (deconvolution.fit_residue)
    MODEL_CBV = "model-cbv"  # the model-free CBV over the fit's MTT
    BLEND = "blend"  # the geometric mean of SVD after the low-flow correction and MODEL_CBV


@dataclass(frozen=True)
class CtpParameters:
    criteria: thresholds.Defuse3Criteria = thresholds.Defuse3Criteria()  # the target-mismatch verdict's profile
    core_rcbf: float = setting_default("core_rcbf_threshold")
    tmax_threshold_s: float = setting_default("tmax_threshold_s")
    min_lesion_ml: float = setting_default("min_lesion_ml")
    method: str = "osvd"
    bias_correction: bool = True  # correct SVD's late Tmax and low peak flow (deconvolution.BiasCorrection)
    # oSVD's thresholds: below 0.1 the residues of CT voxels carry noise even after denoising
    # (measured on the phantom at 5-20 HU), and the bias correction takes care of the smoothing.
    osvd_thresholds: tuple[float, ...] = (0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.65)
    # In-plane Gaussian over the brain of the Tmax bias field: the bias varies slowly, its per-voxel
    # estimate with the noise. (Measured on the phantom at 10 HU: 8 mm beat 4 mm and a 5-8 mm
    # median filter; calibrating on curves with the residual noise added did not raise the Dice.)
    bias_smoothing_mm: float = 8.0
    bias_split: bool = True  # correct the bias separately inside and outside Tmax > 6 s
    # Low flows of delayed tissue (Tmax > 6 s) read high at clinical noise: invert the measured
    # rCBF through the calibration of service.perfusion.low_flow (tuning families, frame noise).
    low_flow_correction: bool = True
    # The brain mask grows back towards the skull up to this distance from bone (ctp.brain_mask_ct).
    brain_bone_gap_mm: float = ctp.GROWTH_BONE_GAP_MM
    denoising: str = "tips"  # "tips" (edge-preserving, time-intensity profile similarity) or "gaussian"
    # TIPS's spatial width. Measured on phantom patients 101-103: 5 mm raised core and penumbra
    # Dice over 3 mm at 5 and 10 HU (e.g. core 0.70 -> 0.78 on 102 at 10 HU) with CBF correlation
    # unchanged; 7 mm gained a little more there but lost penumbra Dice on one patient at 20 HU.
    denoising_sigma_mm: float = 5.0
    # Voxels above this CBV (mL/100 g) are vessels: normal grey matter is 4-6, a voxel partly
    # filled by a small artery takes its share of the AIF's area (a tenth of a voxel: ~7 more).
    vessel_cbv: float = setting_default("vessel_cbv_threshold")
    # Grey/white matter structure of CBF and CBV finer than 3 mm from the temporal mean of the
    # frames (service.perfusion.anatomy); the denoising has smoothed it away.
    anatomy_detail: bool = setting_default("ctp_anatomy_detail")
    # In-plane median of the CBF of delayed tissue (Tmax > 6 s) that the core threshold reads
    # (ctp.median_within), over a disc of this radius; 0: the voxel's own CBF. The maps keep theirs.
    core_median_mm: float = 0.0
    delayed_flow: DelayedFlow = DelayedFlow.BLEND  # the CBF of delayed tissue (Tmax > 6 s)
    # Residue shapes (gamma shape k; inf: box) the model fit of delayed tissue chooses among
    # (deconvolution.fit_residue); (1.0,): the exponential only, whose MTT reads a narrower
    # transit-time distribution short and so its flow high.
    residue_shapes: tuple[float, ...] = RESIDUE_SHAPES
    # The shape is chosen once for the study on the mean curves of in-plane patches of this many
    # working pixels a side (plus the slice) within delayed tissue: one voxel is too noisy.
    shape_patch_px: int = 4


def ctp_series(paths: Sequence[Path | str | Dataset]) -> list[str] | None:
    """File names of the study's CT perfusion series (the largest if several), or None."""
    candidates = [s for s in group_series(paths, headers_only=True).values() if classify(s) == "ctp"]
    if not candidates:
        return None
    return [ds.filename for ds in max(candidates, key=len)]


@dataclass
class CtpResult:
    """Everything the CT perfusion analysis of one series produces, before it becomes Findings.

    Maps are float32 ``(Z, Y, X)`` (0 outside ``brain``): ``cbf`` mL/100 g/min, ``cbv`` mL/100 g,
    ``mtt``, ``tmax`` and ``ttp`` (time to peak after the first frame) s; masks bool of the same shape.
    """

    maps: dict[str, np.ndarray]
    brain: np.ndarray
    core: np.ndarray
    hypoperfused: np.ndarray
    summary: thresholds.PerfusionSummary
    reference_cbf: float
    aif_scale: float
    frame_noise_hu: float  # voxel noise of the analysed frames (low_flow.frame_noise_hu)
    qc_flags: list[str]
    timings_s: dict[str, float]

    @property
    def penumbra(self) -> np.ndarray:
        return self.hypoperfused & ~self.core


def analyse_ctp(
    paths: Sequence[Path | str], *, study_uid: str | None, version: int, parameters: CtpParameters = CtpParameters(),
    model: CtpModelRequest | None = None, core_method: CoreMethod = CoreMethod.THRESHOLD,
) -> Findings:
    """Analyse the study's CT perfusion series; InputError when it cannot be analysed.

    With ``model``, the learned model's core and penumbra are added beside the threshold ones, and
    with ``core_method`` MODEL the measurements and verdict are the model's. A model that cannot
    run leaves the threshold results, with a QC flag saying why.
    """
    clock = time.perf_counter()
    # Read every file once, pixels included (the headers alone and then the pixels costs a
    # second pass over the files); Datasets already in memory pass through.
    candidates = [s for s in group_series(paths).values() if classify(s) == "ctp"]
    if not candidates:
        raise InputError("no CT perfusion series in the study")
    series = load_ctp(max(candidates, key=len))
    source = list(series.headers[0])
    study = str(source[0].StudyInstanceUID)
    if study_uid is not None and study != study_uid:
        raise InputError(f"the CT perfusion series belongs to study {study}, not {study_uid}")
    loaded = time.perf_counter() - clock
    result = analyse_ctp_series(series.frames, series.times_s, series.geometry, parameters)
    summary = result.summary
    segments = [
        Segment(SegmentKind.CORE, "Ischemic core", result.core, summary.core_ml),
        Segment(SegmentKind.PENUMBRA, "Penumbra", result.penumbra, summary.penumbra_ml),
    ]
    measurements, flags, models = summary.measurements(), list(result.qc_flags), []
    timings = {"load": loaded, **result.timings_s}
    inputs = model_inputs(series.frames, result.maps, result.brain)  # the MIP serves every CT model
    if model is not None:
        clock = time.perf_counter()
        ran = _model_stage(model, inputs, series.geometry, parameters, flags)
        timings["model"] = time.perf_counter() - clock
        if ran is not None:
            segments += ran.segments
            models.append(ran.identity)
            if core_method is CoreMethod.MODEL:
                measurements = ran.summary.measurements()
    if core_method is CoreMethod.MODEL and not models:
        flags.append("core and penumbra by the threshold method: the model did not run")
        core_method = CoreMethod.THRESHOLD
    return Findings(
        study_uid=study,
        version=version,
        analysis=Analysis.CT_PERFUSION,
        geometry=series.geometry,
        source_images=source,
        segments=segments,
        measurements=measurements,
        qc_flags=flags,
        parameters={"core_rcbf": parameters.core_rcbf, "tmax_threshold_s": parameters.tmax_threshold_s,
                    "min_lesion_ml": parameters.min_lesion_ml, "vessel_cbv": parameters.vessel_cbv,
                    "aif_partial_volume_scale": result.aif_scale,
                    "reference_cbf": result.reference_cbf, "max_core_ml": parameters.criteria.max_core_ml,
                    "min_mismatch_ratio": parameters.criteria.min_ratio,
                    "min_mismatch_ml": parameters.criteria.min_mismatch_ml},
        maps=result.maps,
        models=models,
        core_method=core_method,
        timings_s=timings,
        brain=result.brain,
        mip=inputs.mip,
    )


def _model_stage(request: CtpModelRequest, inputs: ModelInputs, geometry: Geometry, parameters: CtpParameters,
                 flags: list[str]) -> ModelCorePenumbra | None:
    """The learned model's core and penumbra, its note appended to ``flags``; None (and a flag
    saying why) when the model cannot run on this study."""
    try:
        ran = run_ctp_model(request, inputs, geometry, min_lesion_ml=parameters.min_lesion_ml,
                            tmax_threshold_s=parameters.tmax_threshold_s, criteria=parameters.criteria)
    except (ModelError, InputError) as error:
        flags.append(f"CT perfusion model not run: {error}")
        return None
    flags.append(ran.note)
    return ran


@dataclass(frozen=True)
class PreparedSeries:
    """The frames as analysed: ``[T, Z, Y, X]`` HU on the working grid (~0.9 mm pixels), aligned
    once motion is corrected; ``acquired`` and ``factor`` take the results back to the acquired grid."""

    frames: np.ndarray
    times: np.ndarray
    geometry: Geometry
    acquired: Geometry
    factor: int
    flags: tuple[str, ...]


@dataclass(frozen=True)
class BrainTissue:
    """The brain mask, the concentration series ``[T, Z, Y, X]`` (enhancement, HU) and where the
    vessels are searched for (the brain and just around it, no bone)."""

    n_baseline: int
    brain: np.ndarray
    concentration: np.ndarray
    vessel_search: np.ndarray


@dataclass(frozen=True)
class ArterialInput:
    """The AIF (HU, on the frames' times) scaled for partial volume by the VOF, and its QC flags."""

    curve: np.ndarray
    scale: float
    flags: tuple[str, ...]


@dataclass(frozen=True)
class PerfusionMaps:
    """CBF, CBV, MTT and Tmax ``(Z, Y, X)`` float32 on the working grid, 0 outside ``brain`` (the
    tissue, vessels taken out)."""

    maps: dict[str, np.ndarray]
    brain: np.ndarray
    model_cbf: np.ndarray | None = None  # DelayedFlow.BLEND: the model's CBF, kept beside the map's


@dataclass(frozen=True)
class ReferencedMaps:
    """The maps with the CBF of delayed tissue corrected at low flow, against the contralateral
    reference and at the frames' noise (HU)."""

    perfusion: PerfusionMaps
    reference: thresholds.ContralateralReference
    noise_hu: float
    core_cbf: np.ndarray | None = None  # the CBF the core threshold reads; None: the map's


@dataclass(frozen=True)
class Lesions:
    """Core and hypoperfused masks (working grid) and their summary."""

    core: np.ndarray
    hypoperfused: np.ndarray
    summary: thresholds.PerfusionSummary


def analyse_ctp_series(
    frames: np.ndarray, times_s: Sequence[float] | np.ndarray, geometry: Geometry, parameters: CtpParameters = CtpParameters()
) -> CtpResult:
    """The analysis of one loaded CT perfusion series ``[T, Z, Y, X]`` HU (see the module docstring).

    Raises InputError when the series cannot be analysed (too much motion, truncated bolus, no AIF...).
    """
    timings: dict[str, float] = {}

    def timed(stage: str, run: Callable[..., Stage], *args: object) -> Stage:
        started = time.perf_counter()
        out = run(*args)
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - started
        return out

    prepared = timed("resample", resample_stage, frames, times_s, geometry)
    prepared = timed("motion", motion_stage, prepared)
    tissue = timed("mask", mask_stage, prepared, parameters)
    arterial = timed("aif", arterial_stage, prepared, tissue)
    perfusion = timed("deconvolution", deconvolution_stage, prepared, tissue, arterial, parameters)
    if parameters.anatomy_detail:
        perfusion = timed("anatomy", anatomy_stage, prepared, perfusion, parameters)
    referenced = timed("low flow" if parameters.low_flow_correction else "thresholds",
                       low_flow_stage, prepared, perfusion, parameters)
    if parameters.core_median_mm > 0:
        referenced = timed("regularise", regularise_stage, prepared, referenced, parameters)
    lesions = timed("thresholds", threshold_stage, prepared, referenced, parameters)
    maps = dict(referenced.perfusion.maps)
    maps["ttp"] = timed("ttp", ctp.time_to_peak, prepared.frames, prepared.times, referenced.perfusion.brain, prepared.geometry.spacing)
    brain, core, hypoperfused = referenced.perfusion.brain, lesions.core, lesions.hypoperfused
    if prepared.factor > 1:
        in_plane = prepared.acquired.shape[1:]
        maps = {name: ctp.block_expand(volume, prepared.factor, in_plane) for name, volume in maps.items()}
        brain, core, hypoperfused = (ctp.block_expand(mask, prepared.factor, in_plane) for mask in (brain, core, hypoperfused))
    flags = [*prepared.flags, *arterial.flags]
    return CtpResult(maps, brain, core, hypoperfused, lesions.summary, referenced.reference.cbf, arterial.scale,
                     referenced.noise_hu, flags, timings)


def resample_stage(frames: np.ndarray, times_s: Sequence[float] | np.ndarray, geometry: Geometry) -> PreparedSeries:
    """Full-size (512 x 512) acquisitions averaged to ~0.9 mm pixels; the coverage and sampling checked."""
    times = np.asarray(times_s, dtype=np.float64)
    flags = [f for f in (ctp.too_few_time_points(len(times)), ctp.insufficient_coverage(geometry.shape[0], geometry.spacing)) if f]
    factor = ctp.working_factor(geometry.spacing)
    working = geometry
    if factor > 1:
        frames = ctp.block_average(frames, factor)
        working = _working_geometry(geometry, factor, frames.shape[1:])
    return PreparedSeries(frames, times, working, geometry, factor, tuple(flags))


def motion_stage(prepared: PreparedSeries) -> PreparedSeries:
    """Head motion corrected; InputError beyond what correcting can undo."""
    geometry = prepared.geometry
    motion = correct_motion(prepared.frames, geometry.spacing)
    # Registration itself is accurate to well under 1 mm (tests/unit/test_ctp_preprocessing.py),
    # but a head moving across thick slices changes their partial volumes, which resampling cannot
    # undo: on phantom patient 2 at 10 HU (5 mm slices), motion up to 0.9 mm left the core about
    # as without motion (21.0 vs 21.9 mL, Dice 0.84 vs 0.85), 1.2 mm shrank it to 16.6 mL (Dice
    # 0.70) and 1.7 mm to 15.1 mL (0.58). Beyond 1 mm the answer would be wrong, so the study fails
    # with the reason; a flag alone would leave a wrong core on the radiologist's screen.
    limit = min(CORRECTABLE_MOTION_MM, 0.5 * geometry.spacing[0])
    moved = ctp.excessive_motion(motion.max_displacement_mm, motion.similarity, limit_mm=limit)
    if moved:
        raise InputError(f"cannot analyse: {moved}; motion between frames across {geometry.spacing[0]:g} mm slices "
                         "cannot be corrected without blurring the perfusion maps (core underestimated); "
                         "read the source images or repeat the perfusion scan")
    flags = prepared.flags
    if motion.max_displacement_mm > 0.5:
        flags += (f"motion corrected (up to {motion.max_displacement_mm:.1f} mm)",)
    return replace(prepared, frames=motion.frames, flags=flags)


def mask_stage(prepared: PreparedSeries, parameters: CtpParameters) -> BrainTissue:
    """Baseline, brain mask, concentration, and where to look for the AIF and VOF."""
    frames, geometry = prepared.frames, prepared.geometry
    n_baseline = ctp.baseline_frames(frames, prepared.times)
    brain = ctp.brain_mask_ct(frames, geometry.spacing, n_baseline, growth_bone_gap_mm=parameters.brain_bone_gap_mm)
    concentration = ctp.concentration_ct(frames, n_baseline)
    baseline = frames[:n_baseline].mean(axis=0)
    # Vessels were taken out of the brain mask; look for them in and just around it (the venous
    # sinuses lie between brain and skull), avoiding bone.
    reach = max(1, round(8.0 / min(geometry.spacing[1:])))
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    search = ndimage.binary_dilation(brain, in_plane, iterations=reach) & (baseline > -50) & (baseline < 150)
    return BrainTissue(n_baseline, brain, concentration, search)


def arterial_stage(prepared: PreparedSeries, tissue: BrainTissue) -> ArterialInput:
    """The AIF scaled by the VOF; InputError on a truncated bolus."""
    concentration, times = tissue.concentration, prepared.times
    aif = select_aif(concentration, times, tissue.vessel_search)
    # A bolus the scan stopped before it washed out cannot be deconvolved: CBV and CBF read low
    # and Tmax is cut off, so core and penumbra would be silently wrong. Fail with the reason.
    truncation = ctp.truncated_bolus(concentration[:, tissue.brain].mean(axis=1), tissue.n_baseline)
    if truncation or FLAG_TRUNCATED in aif.qc_flags:
        reasons = [r for r in (truncation, FLAG_TRUNCATED if FLAG_TRUNCATED in aif.qc_flags else None) if r]
        raise InputError(f"cannot analyse: {'; '.join(reasons)} (the scan ended before the contrast washed out; "
                         "CBF, CBV and Tmax would be wrong)")
    flags = list(aif.qc_flags)
    try:
        vof = select_vof(concentration, times, tissue.vessel_search, aif=aif)
        scale = partial_volume_scale(aif.curve, vof.curve, times)
    except InputError as error:
        # Core and penumbra are relative to the contralateral tissue, which the scale cancels out
        # of; absolute CBF and CBV read high. Refusing the study would lose the relative maps too.
        scale = 1.0
        flags.append(f"{error}: AIF not scaled for partial volume, absolute CBF and CBV read high")
    return ArterialInput(np.asarray(aif.curve), scale, tuple(flags))


def deconvolution_stage(prepared: PreparedSeries, tissue: BrainTissue, arterial_input: ArterialInput,
                        parameters: CtpParameters) -> PerfusionMaps:
    """Denoise inside the brain, deconvolve, correct SVD's biases, take the vessels out."""
    geometry, times, brain = prepared.geometry, prepared.times, tissue.brain
    if parameters.denoising == "tips":
        smooth = ctp.denoise_tips(tissue.concentration, geometry.spacing, brain, parameters.denoising_sigma_mm)
    else:
        smooth = ctp.denoise(tissue.concentration, geometry.spacing, brain)
    curves, arterial = smooth[:, brain], (arterial_input.curve * arterial_input.scale).astype(np.float64)
    del smooth
    steps = np.diff(times)
    uniform = np.ptp(steps) <= 1e-3 * np.median(steps)
    if uniform:  # no resampling, no float64 copy
        dt = float(np.median(steps))
    else:
        grid, resampled = resample_uniform(times, np.concatenate([arterial[:, None], curves], axis=1))
        dt, arterial, curves = float(grid[1] - grid[0]), resampled[:, 0], resampled[:, 1:].astype(np.float32)
    levels = {"thresholds": parameters.osvd_thresholds} if parameters.method == "osvd" else {}
    fit = deconvolve(curves, arterial, dt, parameters.method, **levels)
    if parameters.bias_correction:
        ratio, late = bias_of(fit, calibrate_bias(arterial, dt, parameters.method, **levels))
        # The bias varies slowly across tissue, its per-voxel estimate with the noise; it jumps
        # with the MTT at the border of the hypoperfusion. So the Tmax bias is smoothed on each
        # side of that border, and the flow factor is one per side, its median: its per-voxel
        # estimate carries the noise of the threshold oSVD picks, and smoothed over 8 mm that
        # noise still made patches of CBF 10-20 % high or low (phantom at 10 HU: CBF correlation
        # in normal tissue 0.75 smoothed, 0.80 with one factor), while the true factor differs
        # by about 10 % between grey and white matter.
        log_ratio, late = np.log(ratio), late.copy()
        if parameters.bias_split:
            slow = np.zeros(brain.shape, dtype=bool)
            slow[brain] = fit.tmax_s - late > parameters.tmax_threshold_s
            parts = [brain & slow, brain & ~slow]
        else:
            parts = [brain]
        for part in parts:
            inside = part[brain]
            if inside.any():
                log_ratio[inside] = np.median(log_ratio[inside])
                late[inside] = ctp.denoise_values(late[inside], part, geometry.spacing, parameters.bias_smoothing_mm)
        fit = apply_bias(fit, np.exp(log_ratio), late)
    perfusion = perfusion_parameters(fit, curves, arterial, dt)
    model_cbf = None
    if parameters.delayed_flow is not DelayedFlow.SVD:
        slow = perfusion.tmax > parameters.tmax_threshold_s
        shape_k = 1.0
        if len(parameters.residue_shapes) > 1:
            slow_voxels = np.zeros(brain.shape, dtype=bool)
            slow_voxels[brain] = slow
            # Patches of the concentration before the denoising, which mixes neighbours' delays
            # into each curve: the mix looked dispersed (gamma k 2) on our exponential phantom at 10 HU.
            pooled = patch_means(tissue.concentration[:, slow_voxels], np.argwhere(slow_voxels), parameters.shape_patch_px)
            if not uniform:  # onto the grid the curves were resampled to
                pooled = resample_uniform(times, pooled)[1]
            if pooled.shape[1]:
                shape_k = choose_residue_shape(pooled, arterial, dt, shapes=parameters.residue_shapes)
        elif parameters.residue_shapes:
            shape_k = parameters.residue_shapes[0]
        model = fit_residue(curves[:, slow], arterial, dt, shapes=(shape_k,), mtts=MODEL_MTT_S)
        if parameters.delayed_flow is DelayedFlow.MODEL:
            flow = K_H / RHO * 6000.0 * model.flow_scaled
        else:
            flow = 60.0 * perfusion.cbv[slow] / model.mtt_s
        cbf = perfusion.cbf.copy()
        cbf[slow] = flow
        if parameters.delayed_flow is DelayedFlow.BLEND:
            model_cbf = np.zeros(geometry.shape, dtype=np.float32)
            model_cbf[brain] = cbf
        else:
            perfusion = replace(perfusion, cbf=cbf, mtt=mean_transit_time(cbf, perfusion.cbv))
    maps = {name: np.zeros(geometry.shape, dtype=np.float32) for name in ("cbf", "cbv", "mtt", "tmax")}
    for name, volume in maps.items():
        volume[brain] = getattr(perfusion, name)
    # Small vessels, below the enhancement that took the large ones out of the brain mask, show
    # as CBV and CBF far above any tissue's (on the phantom at 10 HU, 0.01-0.1 % of the voxels
    # held the outliers that lowered the normal-tissue CBF correlation from 0.75 to 0.69).
    tissue_only = thresholds.exclude_vessels(brain, maps["cbv"], parameters.vessel_cbv)
    for volume in maps.values():
        volume[brain & ~tissue_only] = 0.0
    return PerfusionMaps(maps, tissue_only, model_cbf)


def patch_means(curves: np.ndarray, coordinates: np.ndarray, patch_px: int, min_voxels: int = 8) -> np.ndarray:
    """Mean curves ``(n_time, n_patches)`` of the voxels ``curves`` ``(n_time, n)`` at
    ``coordinates`` ``(n, 3)`` (z, y, x) grouped by slice and ``patch_px`` square in-plane patches;
    patches of fewer than ``min_voxels`` voxels left out."""
    if not curves.shape[1]:
        return np.zeros((curves.shape[0], 0))
    keys = np.column_stack([coordinates[:, 0], coordinates[:, 1] // patch_px, coordinates[:, 2] // patch_px])
    _, label, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    label = label.ravel()
    sums = np.stack([np.bincount(label, weights=row, minlength=counts.size) for row in curves])
    full = counts >= min_voxels
    return sums[:, full] / counts[full]


def anatomy_stage(prepared: PreparedSeries, perfusion: PerfusionMaps, parameters: CtpParameters) -> PerfusionMaps:
    """The grey/white structure of CBF and CBV that the denoising smoothed away, back from the
    temporal mean image (separately in and outside delayed tissue)."""
    maps, brain, spacing = dict(perfusion.maps), perfusion.brain, prepared.geometry.spacing
    guide = anatomy.temporal_mean_guide(prepared.frames, brain, spacing)
    delayed = brain & (maps["tmax"] > parameters.tmax_threshold_s)
    (maps["cbf"], maps["cbv"]), _ = anatomy.restore_detail([maps["cbf"], maps["cbv"]], guide, [brain & ~delayed, delayed], spacing)
    maps["mtt"] = mean_transit_time(maps["cbf"], maps["cbv"]).astype(np.float32)
    return PerfusionMaps(maps, brain, perfusion.model_cbf)


def low_flow_stage(prepared: PreparedSeries, perfusion: PerfusionMaps, parameters: CtpParameters) -> ReferencedMaps:
    """The contralateral reference, and the CBF of delayed tissue through the low-flow calibration
    at the frames' noise (when ``parameters.low_flow_correction``)."""
    maps, brain = dict(perfusion.maps), perfusion.brain
    reference = thresholds.contralateral_reference(maps["cbf"], brain, maps["tmax"])
    noise_hu = low_flow.frame_noise_hu(prepared.frames, brain)
    if parameters.low_flow_correction:
        delayed = brain & (maps["tmax"] > parameters.tmax_threshold_s)
        cbf = maps["cbf"].copy()
        rcbf = low_flow.unbiased_rcbf(cbf[delayed] / reference.cbf, noise_hu, _low_flow_calibration())
        cbf[delayed] = np.clip(rcbf, 0.0, None) * reference.cbf
        if perfusion.model_cbf is not None:
            # The geometric mean of the two estimates; where the model found no flow (CBV <= 0 in
            # the noise) the corrected SVD's stands alone.
            both = delayed & (perfusion.model_cbf > 0)
            cbf[both] = np.sqrt(cbf[both] * perfusion.model_cbf[both])
        maps["cbf"] = cbf
        maps["mtt"] = mean_transit_time(maps["cbf"], maps["cbv"]).astype(np.float32)
    return ReferencedMaps(PerfusionMaps(maps, brain), reference, noise_hu)


def regularise_stage(prepared: PreparedSeries, referenced: ReferencedMaps, parameters: CtpParameters) -> ReferencedMaps:
    """The CBF the core threshold reads: the in-plane median over ``core_median_mm`` within
    delayed tissue, so that a core a little below the threshold is not read above it voxel by
    voxel through the noise."""
    maps, brain = referenced.perfusion.maps, referenced.perfusion.brain
    delayed = brain & (maps["tmax"] > parameters.tmax_threshold_s)
    smoothed = ctp.median_within(maps["cbf"], delayed, prepared.geometry.spacing, parameters.core_median_mm)
    return replace(referenced, core_cbf=smoothed)


def threshold_stage(prepared: PreparedSeries, referenced: ReferencedMaps, parameters: CtpParameters) -> Lesions:
    """Core (rCBF below ``core_rcbf`` within Tmax above ``tmax_threshold_s``) and hypoperfusion,
    specks removed, and the DEFUSE 3 summary."""
    maps, brain = referenced.perfusion.maps, referenced.perfusion.brain
    voxel_ml = prepared.geometry.voxel_volume_ml
    core = thresholds.remove_specks(
        thresholds.core_mask_ct(maps["cbf"] if referenced.core_cbf is None else referenced.core_cbf, referenced.reference, brain,
                                parameters.core_rcbf), parameters.min_lesion_ml, voxel_ml
    )
    hypoperfused = thresholds.remove_specks(
        thresholds.hypoperfused_mask(maps["tmax"], brain, parameters.tmax_threshold_s), parameters.min_lesion_ml, voxel_ml
    )
    core &= hypoperfused  # core is hypoperfused tissue; low flow with a normal Tmax is CSF or noise
    summary = thresholds.summarise(core, hypoperfused, maps["tmax"], brain, voxel_ml, parameters.criteria,
                                   hypoperfusion_tmax=parameters.tmax_threshold_s)
    return Lesions(core, hypoperfused, summary)


@functools.cache
def _low_flow_calibration() -> low_flow.LowFlowCalibration:
    return low_flow.load_calibration()


def _working_geometry(geometry: Geometry, factor: int, shape: tuple[int, ...]) -> Geometry:
    """The grid of ``factor x factor`` in-plane blocks of ``geometry`` (centre of the first block as origin)."""
    _, rows, columns = geometry.spacing
    shift = (factor - 1) / 2.0
    origin = (np.asarray(geometry.origin) + shift * columns * np.asarray(geometry.row_direction)
              + shift * rows * np.asarray(geometry.column_direction))
    return replace(geometry, shape=tuple(int(n) for n in shape), spacing=(geometry.spacing[0], rows * factor, columns * factor),
                   origin=tuple(float(v) for v in origin))

