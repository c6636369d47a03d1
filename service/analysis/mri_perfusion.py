"""MRI perfusion-diffusion mismatch: a DSC-PWI series and the diffusion core in, Findings out.

Stages (each timed in ``Findings.timings_s``, prefixed ``dsc_``):

- load: the DSC series as a 4D signal array (``imaging.perfusion_series.load_dsc``);
- mask: the pre-bolus baseline, the parenchyma mask (CSF out) (``perfusion.dsc``);
- concentration: dR2* = -ln(S/S0)/TE, denoised in-plane inside the brain;
- aif: automatic AIF and VOF, the AIF scaled for partial volume by the VOF;
- deconvolution: oSVD of every brain voxel (``perfusion.deconvolution``) -> CBF, CBV, MTT, Tmax;
- mismatch: Tmax > threshold (hypoperfused) on the diffusion grid, the ADC core from the
  diffusion Findings, penumbra = hypoperfused minus core, volumes, ratio, HIR and the DEFUSE 3
  verdict (``perfusion.thresholds.summarise``).

The segments are drawn on the diffusion grid (the core's), so the SEG references one series; a
DSC series on another grid is resampled onto it (trilinear for Tmax, nearest for the mask).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage

from service.findings import Analysis, Findings, Segment, SegmentKind
from service.errors import InputError
from service.imaging.geometry import Geometry
from service.imaging.perfusion_series import load_dsc
from service.imaging.volumes import Source
from service.perfusion import dsc, thresholds
from service.perfusion.aif import partial_volume_scale, select_aif, select_vof
from service.perfusion.ctp import denoise, denoise_values, time_to_peak, truncated_bolus
from service.perfusion.deconvolution import (
    apply_bias,
    bias_of,
    calibrate_bias,
    deconvolve,
    perfusion_parameters,
    resample_uniform,
)

ANALYSIS = Analysis.MRI_MISMATCH
GRID_TOLERANCE_MM = 0.01


@dataclass(frozen=True)
class MriPerfusionParameters:
    """Thresholds of the MRI mismatch (the ADC core threshold belongs to the diffusion core);
    the thresholds come from the settings (``AnalysisParameters``)."""

    tmax_threshold_s: float
    min_lesion_ml: float
    criteria: thresholds.Defuse3Criteria
    method: str = "osvd"
    denoise_sigma_mm: float = 2.0
    bias_correction: bool = True  # SVD's late Tmax and low peak flow, calibrated on this study's AIF
    bias_smoothing_mm: float = 8.0  # the bias varies slowly across tissue; its per-voxel estimate is noisy


@dataclass
class DscMaps:
    """Perfusion maps of one DSC series on its own grid; float32 ``[slice, row, column]``.

    ``cbf`` mL/100 g/min and ``cbv`` mL/100 g are relative (DSC is not calibrated), ``mtt`` and
    ``tmax`` and ``ttp`` (time to peak of the contrast after the first frame) in s; all 0 outside
    ``brain`` (bool, parenchyma without CSF).
    """

    geometry: Geometry
    cbf: np.ndarray
    cbv: np.ndarray
    mtt: np.ndarray
    tmax: np.ndarray
    ttp: np.ndarray
    brain: np.ndarray
    series_uid: str
    qc_flags: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    aif_scale: float = 1.0


def dsc_maps(series: Sequence[Source], parameters: MriPerfusionParameters) -> DscMaps:
    """Perfusion maps of a DSC-PWI series (file paths or Datasets with pixel data).

    Raises InputError when the series cannot be analysed (not dynamic, no echo time, no bolus,
    no arterial input found...), with the reason.
    """
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[f"dsc_{stage}"] = now - clock
        clock = now

    volume = load_dsc(series)
    geometry, times = volume.geometry, np.asarray(volume.times_s, dtype=np.float64)
    flags = [f for f in (dsc.too_few_time_points(volume.n_frames),) if f]
    lap("load")

    n_baseline = dsc.baseline_frames(dsc.mean_signal(volume.frames))
    baseline = volume.frames[:n_baseline].mean(axis=0)
    brain = dsc.brain_mask_dsc(baseline, pixel_mm=tuple(geometry.spacing[1:]))
    if not brain.any():
        raise InputError(f"series {volume.series_uids[0]}: no brain parenchyma found in the DSC perfusion")
    # Arteries lie in and around the parenchyma mask (and in the CSF spaces it leaves out).
    reach = max(1, round(6.0 / min(geometry.spacing[1:])))
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    search = ndimage.binary_dilation(brain, in_plane, iterations=reach) & (baseline > 0)
    lap("mask")

    concentration = dsc.concentration_dsc(volume.frames, n_baseline, float(volume.echo_time_s))
    truncation = truncated_bolus(concentration[:, brain].mean(axis=1), n_baseline)
    if truncation:
        flags.append(truncation)
    lap("concentration")

    aif = select_aif(concentration, times, search, low_peak=dsc.LOW_AIF_PEAK_PER_S)
    flags += list(aif.qc_flags)
    try:
        vof = select_vof(concentration, times, search, aif=aif)
        scale = partial_volume_scale(aif.curve, vof.curve, times)
        flags += [f for f in vof.qc_flags if f not in flags]
    except InputError as error:
        scale = 1.0
        flags.append(f"{error}: AIF not scaled for partial volume")
    lap("aif")

    smooth = denoise(concentration, geometry.spacing, brain, sigma_mm=parameters.denoise_sigma_mm)
    grid, curves = resample_uniform(times, np.concatenate([(aif.curve * scale)[:, None], smooth[:, brain]], axis=1))
    dt = float(grid[1] - grid[0])
    fit = deconvolve(curves[:, 1:], curves[:, 0], dt, parameters.method)
    if parameters.bias_correction:
        ratio, late = bias_of(fit, calibrate_bias(curves[:, 0], dt, parameters.method))
        log_ratio = denoise_values(np.log(ratio), brain, geometry.spacing, parameters.bias_smoothing_mm)
        fit = apply_bias(fit, np.exp(log_ratio), denoise_values(late, brain, geometry.spacing, parameters.bias_smoothing_mm))
    perfusion = perfusion_parameters(fit, curves[:, 1:], curves[:, 0], dt)
    maps = {name: np.zeros(geometry.shape, dtype=np.float32) for name in ("cbf", "cbv", "mtt", "tmax")}
    for name, values in maps.items():
        values[brain] = getattr(perfusion, name)
    lap("deconvolution")
    maps["ttp"] = time_to_peak(concentration, times, brain, geometry.spacing)
    lap("ttp")

    return DscMaps(
        geometry=geometry, brain=brain, series_uid=volume.series_uids[0], qc_flags=flags, timings_s=timings,
        aif_scale=float(scale), **maps,
    )


def add_mismatch(core: Findings, maps: DscMaps, parameters: MriPerfusionParameters) -> Findings:
    """The diffusion ``core`` Findings extended by the perfusion: segments core and penumbra,
    volumes, mismatch volume and ratio, HIR, the DEFUSE 3 verdict and the DSC QC flags.

    Core voxels are hypoperfused by definition (a core outside the Tmax lesion is reported as
    core all the same: the diffusion restriction is the stronger evidence), so the hypoperfused
    volume reported is that of ``core | Tmax lesion``.
    """
    started = time.perf_counter()
    core_segment = core.segment(SegmentKind.CORE)
    if core_segment is None:
        raise ValueError("the diffusion Findings have no core segment")
    target = core.geometry
    flags = list(maps.qc_flags)
    quantitative = {name: getattr(maps, name) for name in ("cbf", "cbv", "mtt", "ttp", "tmax")}
    brain = maps.brain
    if not _same_grid(maps.geometry, target):
        quantitative = {name: _onto_grid(values, maps.geometry, target, order=1) for name, values in quantitative.items()}
        brain = _onto_grid(maps.brain.astype(np.float32), maps.geometry, target, order=0) > 0.5
        flags.append("DSC perfusion resampled onto the diffusion grid")
    tmax = quantitative["tmax"]
    voxel_ml = target.voxel_volume_ml
    core_mask = np.asarray(core_segment.mask, dtype=bool)
    slow = thresholds.remove_specks(
        thresholds.hypoperfused_mask(tmax, brain, parameters.tmax_threshold_s), parameters.min_lesion_ml, voxel_ml
    )
    hypoperfused = slow | core_mask
    summary = thresholds.summarise(
        core_mask, hypoperfused, tmax, brain, voxel_ml, parameters.criteria,
        hypoperfusion_tmax=parameters.tmax_threshold_s,
    )
    penumbra = hypoperfused & ~core_mask
    outside = float(np.count_nonzero(core_mask & ~slow)) * voxel_ml
    if summary.core_ml > 0 and outside > 0.5 * summary.core_ml:
        flags.append(f"diffusion core largely outside the Tmax lesion ({outside:.1f} of {summary.core_ml:.1f} mL)")

    measurements = summary.measurements()
    segments = [Segment(SegmentKind.CORE, core_segment.label, core_mask, summary.core_ml)]
    if penumbra.any():
        segments.append(Segment(SegmentKind.PENUMBRA, "Penumbra", penumbra, summary.penumbra_ml))
    criteria = parameters.criteria
    timings = {**core.timings_s, **maps.timings_s, "mismatch": time.perf_counter() - started}
    return replace(
        core,
        analysis=ANALYSIS,
        segments=segments,
        measurements=measurements,
        qc_flags=[*core.qc_flags, *flags],
        maps={**core.maps, **quantitative},
        parameters={
            **core.parameters,
            "tmax_threshold_s": parameters.tmax_threshold_s,
            "max_core_ml": criteria.max_core_ml,
            "min_mismatch_ratio": criteria.min_ratio,
            "min_mismatch_ml": criteria.min_mismatch_ml,
            "aif_partial_volume_scale": maps.aif_scale,
        },
        timings_s=timings,
    )


def _same_grid(a: Geometry, b: Geometry) -> bool:
    return tuple(a.shape) == tuple(b.shape) and np.allclose(a.affine, b.affine, atol=GRID_TOLERANCE_MM)


def _onto_grid(values: np.ndarray, source: Geometry, target: Geometry, order: int) -> np.ndarray:
    """``values`` on ``source`` sampled at the voxel centres of ``target`` (0 outside)."""
    to_source = np.linalg.inv(source.affine) @ target.affine
    return ndimage.affine_transform(
        np.asarray(values, dtype=np.float32), to_source[:3, :3], offset=to_source[:3, 3],
        output_shape=tuple(target.shape), order=order, mode="constant", cval=0.0,
    )
