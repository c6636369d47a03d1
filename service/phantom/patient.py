"""One synthetic stroke patient: the random draws, the truth on a scan grid, and the acquisitions.

Every random component draws from its own stream seeded by (patient seed, component), so a
patient is reproducible from its seed alone and a change to one component leaves the others be.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from service.imaging.geometry import Geometry
from service.phantom.anatomy import TISSUES, HeadModel, Pose, head_model, label_map, mni_to_voxel, resample_fractions
from service.phantom.clinical import Clinical, draw_clinical
from service.phantom.families import Design, Variation, draw_design
from service.phantom.geometric import geometric_head_model
from service.phantom.haemodynamics import Bolus, GammaVariate, recirculating, tissue_curves, venous_outflow
from service.phantom.lesion import Lesion, LesionPlan, build_lesion

_STREAMS = {"pose": 1, "lesion": 2, "haemodynamics": 3, "ct": 4, "mr": 5, "clinical": 6, "field": 7, "design": 8}

# Baseline CT attenuation (HU) and MR signals per tissue channel, in TISSUES order:
# gm, wm, csf, skull, scalp, artery, vein; air fills the rest.
_CT_HU = np.array([38.0, 29.0, 6.0, 1100.0, 20.0, 42.0, 42.0])
_AIR_HU = -1000.0
_T2STAR_S0 = np.array([900.0, 750.0, 1300.0, 40.0, 300.0, 800.0, 800.0])  # DSC-PWI baseline
_T2_S0 = np.array([1000.0, 850.0, 1800.0, 20.0, 150.0, 200.0, 200.0])  # DWI b = 0
_ADC = np.array([850.0, 720.0, 3000.0, 1000.0, 1000.0, 1500.0, 1500.0])  # 1e-6 mm2/s
_FLAIR = np.array([800.0, 650.0, 80.0, 20.0, 300.0, 100.0, 100.0])


@dataclass(frozen=True)
class PhantomOptions:
    """Acquisition choices; ``None`` means drawn per patient from the documented range."""

    ct_matrix: int = 256
    ct_slices: int = 16
    ct_frames: int = 40
    ct_duration_s: float | None = None  # 45-60 s
    noise_hu: float | None = None  # 5-20 HU
    motion_mm: float = 0.0
    truncated_bolus: bool = False
    residue: str = "exponential"
    mr_matrix: int = 128
    mr_slices: int = 20
    mr_frames: int = 50
    mr_tr_s: float = 1.5
    mr_snr: float | None = None  # 25-45 at grey matter
    b_value: float = 1000.0
    variation: Variation | None = None  # a phantom family's ranges (service.phantom.families); None: the ICBM phantom


@dataclass(frozen=True)
class Haemodynamics:
    """Per-patient normal-tissue values."""

    cbf_gm: float  # mL/100 g/min
    cbf_wm: float
    mtt_gm: float  # s
    mtt_wm: float
    delay_normal: float  # s, bolus delay of normal tissue after the AIF


@dataclass(frozen=True)
class Patient:
    seed: int
    pose: Pose
    lesion_plan: LesionPlan
    lesion: Lesion
    haemodynamics: Haemodynamics
    clinical: Clinical
    options: PhantomOptions
    design: Design = Design()

    @property
    def patient_id(self) -> str:
        return f"SGPH{self.seed:08d}"


@dataclass
class Truth:
    """Ground truth on one scan grid (float maps are 0 where there is no parenchyma)."""

    geometry: Geometry
    fractions: np.ndarray  # (len(TISSUES), z, y, x)
    severity: np.ndarray  # lesion field at voxel centres
    cbf: np.ndarray  # mL/100 g/min
    cbv: np.ndarray  # mL/100 g
    mtt: np.ndarray  # s
    tmax: np.ndarray  # s (= bolus delay)
    brain: np.ndarray  # bool: parenchyma fraction >= 0.5
    masks: dict[str, np.ndarray]  # core, penumbra, hypoperfused, oligaemia, final_* (bool)
    cbf_reference: float = 0.0  # mL/100 g/min: contralateral normal-tissue mean; core is CBF < 30 % of it
    ttp: np.ndarray | None = None  # s from the first frame; set by the perfusion acquisition

    @property
    def labels(self) -> np.ndarray:
        return label_map(self.fractions)

    @property
    def parenchyma(self) -> np.ndarray:
        return self.fractions[TISSUES.index("gm")] + self.fractions[TISSUES.index("wm")]

    def fraction(self, tissue: str) -> np.ndarray:
        return self.fractions[TISSUES.index(tissue)]

    def volumes_ml(self) -> dict[str, float]:
        v = self.geometry.voxel_volume_ml
        return {name: round(float(mask.sum()) * v, 2) for name, mask in self.masks.items()}


@dataclass
class PerfusionSeries:
    """A 4D acquisition streamed frame by frame, with what produced it."""

    geometry: Geometry
    times: np.ndarray  # s after the first frame
    aif: Bolus
    vof: Bolus
    truth: Truth
    frames: Iterator[np.ndarray] = field(repr=False)  # each (z, y, x) float32 in output units
    motion: list[dict[str, list[float]]] = field(default_factory=list)
    noise_sigma: float = 0.0
    echo_time_s: float | None = None


def make_patient(seed: int, options: PhantomOptions | None = None) -> Patient:
    """Draw everything that defines patient ``seed`` (pose, stroke, physiology, clinical record)."""
    options = options or PhantomOptions()
    rng = {name: np.random.default_rng([seed, s]) for name, s in _STREAMS.items()}
    design = draw_design(options.variation, rng["design"])
    plan = LesionPlan.random(rng["lesion"])
    lesion = build_lesion(head_of(design), plan, rng["lesion"])
    h = rng["haemodynamics"]
    haemodynamics = Haemodynamics(
        cbf_gm=float(h.uniform(50, 70)),
        cbf_wm=float(h.uniform(20, 30)),
        mtt_gm=float(h.uniform(3.5, 4.5)),
        mtt_wm=float(h.uniform(4.2, 5.0)),
        delay_normal=float(h.uniform(0.0, 1.5)),
    )
    return Patient(
        seed=seed,
        pose=Pose.random(rng["pose"]),
        lesion_plan=plan,
        lesion=lesion,
        haemodynamics=haemodynamics,
        clinical=draw_clinical(rng["clinical"], lesion.volumes_ml, plan.side),
        options=options,
        design=design,
    )


def lesion_plan(seed: int) -> LesionPlan:
    """Patient ``seed``'s stroke plan (side, place, zone volumes) without building its lesion."""
    return LesionPlan.random(np.random.default_rng([seed, _STREAMS["lesion"]]))


def head_of(design: Design) -> HeadModel:
    """The head model a patient's design asks for."""
    if design.anatomy == "geometric":
        return geometric_head_model(design.cortex_mm, design.artery_radius_mm)
    return head_model(design.artery_radius_mm)


CORE_RCBF = 0.30
"""Core: CBF below this fraction of the contralateral normal-tissue mean (the clinical CT definition)."""
DEEP_CORE_RCBF_OWN = 0.15
"""CBF at the centre of the core, relative to the voxel's own healthy CBF."""
PENUMBRA_RCBF_OWN = 0.62
"""CBF at the outer border of the hypoperfused zone, relative to the voxel's own healthy CBF."""


def axial_geometry(matrix: int, fov_mm: float, slices: int, thickness: float, spacing: float, centre_z: float) -> Geometry:
    """Axial slab centred on the head: rows run posterior, columns run left (LPS)."""
    pixel = fov_mm / matrix
    first = -fov_mm / 2 + pixel / 2
    return Geometry(
        shape=(slices, matrix, matrix),
        spacing=(spacing, pixel, pixel),
        origin=(first, first + 17.0, centre_z - (slices - 1) / 2 * spacing),  # brain centre is MNI y = -17
        slice_thickness=thickness,
    )


def truth_on_grid(patient: Patient, geometry: Geometry) -> Truth:
    """Tissue fractions, perfusion truth and zone masks of ``patient`` sampled on ``geometry``."""
    model = head_of(patient.design)
    fractions = resample_fractions(model, geometry, patient.pose)
    centres = geometry.voxel_centres()[0]
    coords = mni_to_voxel(patient.pose.lps_to_mni(centres), np.linalg.inv(model.affine))
    lesion = patient.lesion
    severity = ndimage.map_coordinates(lesion.field, coords, order=1, mode="constant", cval=-1000.0)

    h = patient.haemodynamics
    gm, wm = fractions[TISSUES.index("gm")], fractions[TISSUES.index("wm")]
    rng = np.random.default_rng([patient.seed, _STREAMS["field"], *geometry.shape])
    sigma_vox = [max(6.0 / s, 0.5) for s in geometry.spacing]
    texture = ndimage.gaussian_filter(rng.standard_normal(geometry.shape), sigma_vox)
    texture = 1.0 + 0.08 * texture / max(texture.std(), 1e-9)
    cbf_healthy = (gm * h.cbf_gm + wm * h.cbf_wm) * texture
    cbv_healthy = (gm * h.cbf_gm * h.mtt_gm + wm * h.cbf_wm * h.mtt_wm) / 60.0 * texture

    t = lesion.thresholds
    knots = np.array([t["oligaemia"], t["hypoperfused"], t["core"], t["core"] + 4.0])
    knots = np.maximum.accumulate(knots + np.arange(4) * 1e-4)  # strictly increasing
    # MTT follows the severity as the ratio of the classic relative CBV and CBF profiles
    # (1 -> 1.8 -> 2.5 -> 2.3 x normal); CBV = CBF x MTT follows from the CBF below.
    r_mtt = np.interp(severity, knots, [1.0, 1.12, 0.75, 0.35]) / np.interp(severity, knots, [1.0, 0.62, 0.30, 0.15])
    # CBF: the clinical CT core is CBF < 30 % of the *contralateral normal-tissue mean*, not of the
    # voxel's own healthy value, so the zones are drawn against that reference: oligaemia falls
    # from the healthy value to 62 % of it; the penumbra from there to exactly 30 % of the
    # reference at the core border (never below it); the core from 30 % of the reference down
    # (geometrically) to 15 % of its own healthy value. Grey and white matter meet at the border.
    # The reference, as a reader measures it on this scan: the mean healthy CBF of the brain
    # voxels of the other hemisphere in the field of view (a CT slab covers 80 mm, not the whole
    # hemisphere). The zone masks do not depend on it, so CT and MR truth keep the same zones.
    x_mni = patient.pose.lps_to_mni(centres)[..., 0]
    other = (x_mni > 0) if lesion.side == "left" else (x_mni < 0)
    contralateral = ((gm + wm) >= 0.5) & other
    cbf_reference = float(cbf_healthy[contralateral].mean()) if contralateral.any() else float(cbf_healthy.max())
    ref = CORE_RCBF * cbf_reference
    own = np.clip(cbf_healthy, 1e-6, None)
    u_olig = np.clip((severity - knots[0]) / (knots[1] - knots[0]), 0.0, 1.0)
    u_pen = np.clip((severity - knots[1]) / (knots[2] - knots[1]), 0.0, 1.0)
    u_core = np.clip((severity - knots[2]) / (knots[3] - knots[2]), 0.0, 1.0)
    oligaemic = own * (1.0 - (1.0 - PENUMBRA_RCBF_OWN) * u_olig)
    border = np.maximum(PENUMBRA_RCBF_OWN * own, ref)
    penumbral = border + (ref - border) * u_pen
    design = patient.design
    if design.core_rcbf is None:
        deep = np.minimum(DEEP_CORE_RCBF_OWN * own, 0.999 * ref)
    else:  # the family's deepest core CBF, relative to the reference
        deep = np.full_like(own, min(design.core_rcbf, 0.999 * CORE_RCBF) / CORE_RCBF * ref)
    core_cbf = ref * (deep / ref) ** np.maximum(u_core, 1e-3)  # strictly below the reference
    in_core, in_penumbra = severity > t["core"], (severity > t["hypoperfused"]) & (severity <= t["core"])
    cbf_ischaemic = np.where(in_core, core_cbf, np.where(in_penumbra, penumbral, oligaemic))
    # Tmax crosses 6 s exactly at the hypoperfusion border; a 0.02 s step there keeps
    # "Tmax > 6 s" identical to the zone after rounding to float32.
    delay = np.where(
        severity > t["hypoperfused"],
        np.interp(severity, knots[1:], [6.01, 9.0, 12.0]),
        np.interp(severity, knots[:2], [h.delay_normal, 5.99]),
    )
    if design.zones == "uniform":
        # One value per zone (as phantoms built from labelled regions have): the core at its
        # relative CBF, the penumbra at its own, each with one Tmax; MTT 2.3 and 1.8 x normal grey.
        cbf_ischaemic = np.where(in_core, deep, np.where(in_penumbra, max(design.penumbra_rcbf, CORE_RCBF + 0.02) * cbf_reference, oligaemic))
        delay = np.where(in_core, design.core_tmax_s, np.where(in_penumbra, design.penumbra_tmax_s, delay))
        healthy_mtt = np.maximum(60.0 * cbv_healthy / own, 1e-3)
        r_mtt = np.where(in_core, 2.3 * h.mtt_gm / healthy_mtt, np.where(in_penumbra, 1.8 * h.mtt_gm / healthy_mtt, r_mtt))

    perfused = (gm + wm) > 1e-3
    mtt_healthy = 60.0 * cbv_healthy / own
    cbf = np.where(perfused, cbf_ischaemic, 0.0).astype(np.float32)
    mtt = np.where(perfused, mtt_healthy * r_mtt, 0.0).astype(np.float32)
    cbv = (cbf * mtt / 60.0).astype(np.float32)
    tmax = np.where(perfused, delay, 0.0).astype(np.float32)

    brain = (gm + wm) >= 0.5
    zone = {name: brain & (severity > t[name]) for name in t}
    masks = {
        "core": zone["core"],
        "penumbra": zone["hypoperfused"] & ~zone["core"],
        "hypoperfused": zone["hypoperfused"],
        "oligaemia": zone["oligaemia"] & ~zone["hypoperfused"],
        "final_reperfused": zone["final_reperfused"],
        "final_not_reperfused": zone["final_not_reperfused"],
    }
    return Truth(geometry, fractions, severity.astype(np.float32), cbf, cbv, mtt, tmax, brain, masks, cbf_reference=cbf_reference)


def ct_geometry(patient: Patient) -> Geometry:
    o = patient.options
    rng = np.random.default_rng([patient.seed, _STREAMS["ct"], 0])
    d = patient.design
    slices = d.ct_slices or o.ct_slices
    return axial_geometry(o.ct_matrix, 240.0, slices, d.slice_mm, d.slice_mm, centre_z=30.0 + rng.uniform(-6, 6))


def mr_geometry(patient: Patient) -> Geometry:
    o = patient.options
    return axial_geometry(o.mr_matrix, 230.0, o.mr_slices, 5.0, 6.0, centre_z=25.0)


def ct_perfusion(patient: Patient, truth: Truth | None = None) -> PerfusionSeries:
    """The CT perfusion acquisition: frames in HU (float, before quantisation)."""
    o = patient.options
    geometry = ct_geometry(patient)
    truth = truth or truth_on_grid(patient, geometry)
    rng = np.random.default_rng([patient.seed, _STREAMS["ct"], 1])
    aif, vof, times, noise = _ct_bolus(o, patient.design, rng)
    hu = _CT_HU.copy()
    hu[TISSUES.index("wm")] = hu[TISSUES.index("gm")] - patient.design.gm_wm_contrast_hu
    baseline = _mix(truth.fractions, hu, _AIR_HU) - 2.0 * truth.masks["core"]
    series = PerfusionSeries(geometry, times, aif, vof, truth, iter(()), noise_sigma=float(noise))
    contrast = _contrast(patient, truth, times, aif, vof)
    series.frames = _frames(baseline, contrast, times, noise, _motion(patient, o, series), rng, rician=False)
    return series


def ct_bolus(patient: Patient) -> tuple[Bolus, Bolus, np.ndarray, float]:
    """The CT acquisition's AIF, VOF, frame times (s) and noise (HU), without drawing the images."""
    return _ct_bolus(patient.options, patient.design, np.random.default_rng([patient.seed, _STREAMS["ct"], 1]))


def _ct_bolus(o: PhantomOptions, design: Design, rng: np.random.Generator) -> tuple[Bolus, Bolus, np.ndarray, float]:
    if o.truncated_bolus:  # late injection, short scan: the curves never come back down
        arrival, duration = rng.uniform(16, 20), rng.uniform(30, 34)
    else:
        arrival, duration = rng.uniform(4, 10), o.ct_duration_s or rng.uniform(45, 60)
        duration = design.duration_s or duration
    time_to_peak = rng.uniform(5, 8)
    aif: Bolus = GammaVariate(arrival, design.aif_time_to_peak_s or time_to_peak, rng.uniform(2.5, 4.5), rng.uniform(250, 600))
    lag, widening = rng.uniform(4, 7), rng.uniform(1.2, 1.5)
    vof: Bolus = venous_outflow(aif, lag=lag, widening=widening)
    noise = o.noise_hu if o.noise_hu is not None else rng.uniform(5, 20)
    if design.recirculation > 0:
        aif, vof = recirculating(aif, design.recirculation), recirculating(vof, design.recirculation)
    if design.frame_interval_s:
        times = np.arange(0.0, duration + 1e-6, design.frame_interval_s)
    else:
        times = np.linspace(0.0, duration, o.ct_frames)
    return aif, vof, times, float(noise)


def mr_perfusion(patient: Patient, truth: Truth | None = None) -> PerfusionSeries:
    """The DSC-PWI acquisition: S(t) = S0 exp(-TE dR2*(t)) with Rician noise."""
    o = patient.options
    geometry = mr_geometry(patient)
    truth = truth or truth_on_grid(patient, geometry)
    rng = np.random.default_rng([patient.seed, _STREAMS["mr"], 1])
    echo_time = 0.030
    aif = GammaVariate(rng.uniform(8, 16), rng.uniform(5, 8), rng.uniform(2.5, 4.5), rng.uniform(120, 220))
    vof = venous_outflow(aif, lag=rng.uniform(4, 7), widening=rng.uniform(1.2, 1.5))
    times = np.arange(o.mr_frames) * o.mr_tr_s
    s0 = _mix(truth.fractions, _T2STAR_S0, 0.0)
    snr = o.mr_snr or rng.uniform(25, 45)
    sigma = _T2STAR_S0[0] / snr
    series = PerfusionSeries(geometry, times, aif, vof, truth, iter(()), noise_sigma=float(sigma), echo_time_s=echo_time)
    contrast = _contrast(patient, truth, times, aif, vof)

    def signal() -> Iterator[np.ndarray]:
        for d_r2 in contrast:
            yield s0 * np.exp(-echo_time * d_r2)

    series.frames = _frames(None, signal(), times, sigma, [], rng, rician=True)
    return series


def _contrast(patient: Patient, truth: Truth, times: np.ndarray, aif: GammaVariate, vof: GammaVariate) -> Iterator[np.ndarray]:
    """Noise-free contrast per frame: tissue by the indicator-dilution model, plus the vessels.

    Also sets ``truth.ttp``.
    """
    tissue = np.flatnonzero(truth.cbf.ravel() > 0)
    curves, ttp = tissue_curves(
        times, aif, truth.cbf.ravel()[tissue], truth.mtt.ravel()[tissue], truth.tmax.ravel()[tissue],
        residue=patient.options.residue,
    )
    ttp_map = np.zeros(truth.cbf.size, dtype=np.float32)
    ttp_map[tissue] = ttp
    truth.ttp = ttp_map.reshape(truth.cbf.shape)
    artery, vein = truth.fraction("artery"), truth.fraction("vein")
    a, v = aif(times), vof(times)

    def frames() -> Iterator[np.ndarray]:
        for k in range(len(times)):
            frame = artery * np.float32(a[k]) + vein * np.float32(v[k])
            frame.ravel()[tissue] += curves[k]
            yield frame

    return frames()


def _frames(
    baseline: np.ndarray | None,
    contrast: Iterator[np.ndarray],
    times: np.ndarray,
    sigma: float,
    motion: list[np.ndarray],
    rng: np.random.Generator,
    rician: bool,
) -> Iterator[np.ndarray]:
    for k, image in enumerate(contrast):
        if baseline is not None:
            image = baseline + image
        if motion:
            image = ndimage.affine_transform(image, motion[k][:3, :3], motion[k][:3, 3], order=1, mode="nearest")
        noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma)
        if rician:
            other = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma)
            image = np.sqrt((image + noise) ** 2 + other**2)
        else:
            image = image + noise
        yield image.astype(np.float32)


def _motion(patient: Patient, options: PhantomOptions, series: PerfusionSeries) -> list[np.ndarray]:
    """Per-frame rigid head motion (up to ``motion_mm``) as voxel-space resampling matrices.

    The first frame is the reference the truth is drawn in. The motion is recorded on ``series``.
    """
    if options.motion_mm <= 0:
        return []
    rng = np.random.default_rng([patient.seed, _STREAMS["ct"], 2])
    to_lps = series.geometry.affine
    centre = to_lps @ np.r_[(np.asarray(series.geometry.shape) - 1) / 2, 1]
    matrices = []
    for k in range(len(series.times)):
        if k == 0:
            shift, angles = np.zeros(3), np.zeros(3)
        else:
            shift = np.clip(rng.normal(0, options.motion_mm / 2, 3), -options.motion_mm, options.motion_mm)
            angles = np.clip(rng.normal(0, options.motion_mm / 2, 3), -options.motion_mm, options.motion_mm)
        rigid = np.eye(4)
        rigid[:3, :3] = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
        rigid[:3, 3] = centre[:3] - rigid[:3, :3] @ centre[:3] + shift
        # Moving the head by `rigid` means sampling the reference image at rigid^-1 of each voxel.
        matrices.append(np.linalg.inv(to_lps) @ np.linalg.inv(rigid) @ to_lps)
        series.motion.append({"translation_mm": shift.round(3).tolist(), "rotation_deg": angles.round(3).tolist()})
    return matrices


def _mix(fractions: np.ndarray, per_tissue: np.ndarray, rest: float) -> np.ndarray:
    """Partial-volume mixture of per-tissue values; ``rest`` fills what the tissues leave."""
    total = np.tensordot(per_tissue.astype(np.float32), fractions, axes=1)
    return (total + rest * np.clip(1.0 - fractions.sum(axis=0), 0.0, 1.0)).astype(np.float32)


def diffusion(patient: Patient, truth: Truth) -> dict[str, np.ndarray]:
    """DWI b = 0 and b = b_value, the scanner's ADC map (from the noisy images) and the true ADC.

    The true ADC is the signal-weighted apparent ADC of the voxel's tissue mix; in the core it is
    set to 420-600e-6 mm2/s (CSF there is taken as effaced), so core iff ADC < 620 in the brain.
    """
    o = patient.options
    rng = np.random.default_rng([patient.seed, _STREAMS["mr"], 2])
    b = o.b_value * 1e-6  # per (1e-6 mm2/s)
    s0 = _mix(truth.fractions, _T2_S0, 0.0)
    s_b = np.tensordot((_T2_S0 * np.exp(-b * _ADC)).astype(np.float32), truth.fractions, axes=1)
    adc = np.where(s0 > 1.0, -np.log(np.maximum(s_b, 1e-6) / np.maximum(s0, 1e-6)) / b, 0.0)
    t = patient.lesion.thresholds
    core_adc = np.interp(truth.severity, [t["core"], t["core"] + 4.0], [600.0, 420.0])
    core = truth.masks["core"]
    adc = np.where(core, core_adc, adc).astype(np.float32)
    s0 = np.where(core, s0 * 1.05, s0)  # slight T2 prolongation
    s_b = s0 * np.exp(-b * adc)
    snr = o.mr_snr or rng.uniform(25, 45)
    sigma = _T2_S0[0] / snr

    def rician(image: np.ndarray) -> np.ndarray:
        n1, n2 = rng.standard_normal((2, *image.shape), dtype=np.float32) * np.float32(sigma)
        return np.sqrt((image + n1) ** 2 + n2**2).astype(np.float32)

    b0, b1000 = rician(s0), rician(s_b)
    with np.errstate(divide="ignore", invalid="ignore"):
        measured = np.log(b0 / np.maximum(b1000, 1e-3)) / b
    measured = np.where(b0 > 3 * sigma, np.clip(measured, 0, 4000), 0.0).astype(np.float32)
    hours = patient.clinical.onset_to_imaging_min / 60.0
    flair = _mix(truth.fractions, _FLAIR, 0.0) * (1.0 + 0.25 * np.clip((hours - 3.0) / 3.0, 0, 1) * core)
    return {"b0": b0, "b1000": b1000, "adc": measured, "adc_true": adc, "flair": rician(flair), "noise_sigma": np.float32(sigma)}
