"""Write synthetic patients to disk: DICOM studies, ground truth, and ISLES-style NIfTI folders.

Layout of one patient (``SGPH<seed>``) under the output folder::

    SGPH00000007/dicom/CT/<series>/IM00001.dcm ...   CT perfusion and vendor-style maps
    SGPH00000007/dicom/MR/<series>/IM00001.dcm ...   DWI (b0, b1000), ADC, DSC-PWI, FLAIR
    SGPH00000007/truth/ct/*.nii.gz, truth/mr/*.nii.gz  maps, masks, tissue labels
    SGPH00000007/truth/ct_perfusion.json, mr_perfusion.json   AIF, VOF, times, noise, motion
    SGPH00000007/truth/clinical.json                    the EHR record and 90-day mRS
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np

from service.phantom.clinical import roc_auc
from service.phantom.dicom_writer import (
    SeriesSpec,
    StudyIdentity,
    ct_extra,
    frames_with_times,
    mr_extra,
    write_series,
)
from service.phantom.haemodynamics import FLOW_SCALE, K_H, RHO
from service.phantom.patient import (
    Patient,
    PerfusionSeries,
    PhantomOptions,
    Truth,
    ct_geometry,
    ct_perfusion,
    diffusion,
    make_patient,
    mr_geometry,
    mr_perfusion,
    truth_on_grid,
)
from service.phantom.truth_files import MAP_UNITS, write_json, write_nifti

KINDS = ("ctp", "mri", "maps", "all")

# Vendor-style parametric maps: (key, description, stored unit per count).
_MAP_SERIES = (
    ("cbf", "CBF mL/100g/min", 0.1),
    ("cbv", "CBV mL/100g", 0.01),
    ("mtt", "MTT s", 0.01),
    ("ttp", "TTP s", 0.01),
    ("tmax", "Tmax s", 0.01),
)


def write_patient(
    seed: int, kind: str, out: Path, options: PhantomOptions | None = None, isles: Path | None = None
) -> dict:
    """Generate patient ``seed`` and write the studies ``kind`` asks for; return a summary.

    With ``isles``, the images, truth maps and masks also go to an ISLES-style NIfTI tree there.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    started = time.perf_counter()
    patient = make_patient(seed, options)
    root = out / patient.patient_id
    summary: dict = {"patient_id": patient.patient_id, "seed": seed, "kind": kind}
    if kind in ("ctp", "maps", "all"):
        summary["ct"] = _write_ct(patient, root, with_ctp=kind != "maps", with_maps=kind != "ctp", isles=isles)
    if kind in ("mri", "all"):
        summary["mr"] = _write_mr(patient, root, isles=isles)
    clinical = patient.clinical.as_dict()
    write_json(
        root / "truth" / "clinical.json",
        {**clinical, "whole_brain_volumes_ml": patient.lesion.volumes_ml, "lesion_plan": asdict(patient.lesion_plan)},
    )
    summary["clinical"] = clinical
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return summary


def _identity(patient: Patient, modality: str) -> StudyIdentity:
    return StudyIdentity.for_patient(patient.seed, modality, patient.clinical.age, patient.clinical.sex)


def _write_truth(truth: Truth, folder: Path, extra: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    g = truth.geometry
    maps = {"cbf": truth.cbf, "cbv": truth.cbv, "mtt": truth.mtt, "tmax": truth.tmax, "ttp": truth.ttp}
    for name, volume in {**maps, **(extra or {})}.items():
        if volume is not None:
            write_nifti(folder / f"{name}.nii.gz", volume.astype(np.float32), g)
    for name, mask in truth.masks.items():
        write_nifti(folder / f"{name}.nii.gz", mask, g)
    write_nifti(folder / "brain.nii.gz", truth.brain, g)
    write_nifti(folder / "tissue_labels.nii.gz", truth.labels, g)
    write_nifti(folder / "artery_fraction.nii.gz", truth.fraction("artery"), g)
    write_nifti(folder / "vein_fraction.nii.gz", truth.fraction("vein"), g)
    return truth.volumes_ml()


def _curves_record(series: PerfusionSeries, units: str, residue: str) -> dict:
    return {
        "units": units,
        "times_s": series.times,
        "aif": {**series.aif.as_dict(), "values": series.aif(series.times)},
        "vof": {**series.vof.as_dict(), "values": series.vof(series.times)},
        "residue": residue,
        "model": "C(t) = rho/kH * CBF/6000 * (AIF conv R)(t - Tmax); CBV = CBF*MTT/60",
        "rho_g_per_ml": RHO,
        "k_h": K_H,
        "flow_scale": FLOW_SCALE,
        "noise_sigma": series.noise_sigma,
        "echo_time_s": series.echo_time_s,
        "motion": series.motion,
        "core_definition": "CBF < 0.3 x cbf_reference (contralateral normal-tissue mean in the field of view)",
        "cbf_reference": series.truth.cbf_reference,
    }


def _keep(frames: Iterator[np.ndarray], store: list[np.ndarray] | None) -> Iterator[np.ndarray]:
    for frame in frames:
        if store is not None:
            store.append(frame)
        yield frame


def _write_ct(patient: Patient, root: Path, with_ctp: bool, with_maps: bool, isles: Path | None) -> dict:
    o = patient.options
    geometry = ct_geometry(patient)
    truth = truth_on_grid(patient, geometry)
    series = ct_perfusion(patient, truth)  # computes the curves and truth.ttp; frames are lazy
    identity = _identity(patient, "CT")
    dicom = root / "dicom" / "CT"
    result: dict = {"study_instance_uid": identity.study_uid, "geometry": asdict(geometry)}
    kept: list[np.ndarray] | None = [] if isles is not None and with_ctp else None
    if with_ctp:
        # one acquisition per time point (AcquisitionNumber), as scanners that announce the series' size write it
        counts = {"NumberOfTemporalPositions": len(series.times), "ImagesInAcquisition": geometry.shape[0]}
        spec = SeriesSpec("ctp", 1, "CT PERFUSION 5mm", ("ORIGINAL", "PRIMARY", "AXIAL"), {**ct_extra(), **counts})
        frames = frames_with_times(_keep(series.frames, kept), series.times)
        paths = write_series(dicom / "ctp", identity, spec, geometry, frames, intercept=-1024.0, bits_stored=12)
        result["ctp_instances"] = len(paths)
    if with_maps:
        for number, (key, description, slope) in enumerate(_MAP_SERIES, start=2):
            extra = {**ct_extra(contrast=True), "RescaleType": "US", "ImageComments": f"{key.upper()} in {MAP_UNITS[key]}"}
            extra.update(WindowCenter=_window(key)[0], WindowWidth=_window(key)[1])
            spec = SeriesSpec(key, number, description, ("DERIVED", "SECONDARY", "PERFUSION", key.upper()), extra)
            write_series(dicom / key, identity, spec, geometry, [(getattr(truth, key), {})], slope=slope)
        result["map_series"] = [key for key, _, _ in _MAP_SERIES]
    write_json(root / "truth" / "ct_perfusion.json", _curves_record(series, "HU", o.residue))
    result["truth_volumes_ml"] = _write_truth(truth, root / "truth" / "ct")
    if isles is not None:
        _isles_ct(isles, patient, truth, kept)
    return result


def _window(key: str) -> tuple[float, float]:
    return {"cbf": (40, 80), "cbv": (3, 6), "mtt": (8, 16), "ttp": (25, 50), "tmax": (6, 12)}[key]


def _write_mr(patient: Patient, root: Path, isles: Path | None) -> dict:
    o = patient.options
    geometry = mr_geometry(patient)
    truth = truth_on_grid(patient, geometry)
    identity = _identity(patient, "MR")
    dicom = root / "dicom" / "MR"
    dwi = diffusion(patient, truth)
    result: dict = {"study_instance_uid": identity.study_uid, "geometry": asdict(geometry)}

    def b_volume(image: np.ndarray, b: float) -> tuple[np.ndarray, dict[str, object]]:
        return image, {"DiffusionBValue": b, "SequenceName": f"ep_b{b:g}t"}

    spec = SeriesSpec("dwi", 1, "DWI TRACE b0 b1000", ("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"), mr_extra("DWI", 5000.0, 90.0))
    write_series(dicom / "dwi", identity, spec, geometry, [b_volume(dwi["b0"], 0.0), b_volume(dwi["b1000"], o.b_value)])
    spec = SeriesSpec("adc", 2, "ADC (10^-6 mm2/s)", ("DERIVED", "PRIMARY", "DIFFUSION", "ADC"), mr_extra("DWI", 5000.0, 90.0))
    write_series(dicom / "adc", identity, spec, geometry, [(dwi["adc"], {})])
    spec = SeriesSpec("flair", 3, "FLAIR AX", ("ORIGINAL", "PRIMARY", "OTHER", "NONE"), mr_extra("FLAIR", 9000.0, 100.0))
    write_series(dicom / "flair", identity, spec, geometry, [(dwi["flair"], {})])

    pwi = mr_perfusion(patient, truth)
    kept: list[np.ndarray] | None = [] if isles is not None else None
    extra = {**mr_extra("DSC", o.mr_tr_s * 1000, (pwi.echo_time_s or 0) * 1000, contrast=True), "NumberOfTemporalPositions": o.mr_frames}

    def timed() -> Iterator[tuple[np.ndarray, dict[str, object]]]:
        for k, frame in enumerate(_keep(pwi.frames, kept)):
            yield frame, {"_seconds": float(pwi.times[k]), "TemporalPositionIdentifier": k + 1}

    spec = SeriesSpec("pwi", 4, "PERFUSION DSC", ("ORIGINAL", "PRIMARY", "PERFUSION", "NONE"), extra)
    write_series(dicom / "pwi", identity, spec, geometry, timed())
    write_json(root / "truth" / "mr_perfusion.json", _curves_record(pwi, "dR2* (1/s)", o.residue))
    result["truth_volumes_ml"] = _write_truth(truth, root / "truth" / "mr", {"adc": dwi["adc_true"]})
    if isles is not None:
        _isles_mr(isles, patient, truth, dwi, kept)
    return result


def _isles_name(isles: Path, patient: Patient, part: str, name: str, derivative: bool = False) -> Path:
    sub = f"sub-{patient.patient_id}"
    folder = isles / ("derivatives" if derivative else "rawdata") / sub / "ses-01" / part
    return folder / f"{sub}_ses-01_{name}.nii.gz"


def _isles_ct(isles: Path, patient: Patient, truth: Truth, frames: list[np.ndarray] | None) -> None:
    g = truth.geometry
    if frames:
        write_nifti(_isles_name(isles, patient, "ct", "ctp"), np.rint(np.stack(frames)).astype(np.int16), g)
    for key in ("cbf", "cbv", "mtt", "ttp", "tmax"):
        write_nifti(_isles_name(isles, patient, "ct", key), getattr(truth, key), g)
    for name in ("core", "penumbra", "final_reperfused", "final_not_reperfused"):
        write_nifti(_isles_name(isles, patient, "ct", f"{name}_msk", derivative=True), truth.masks[name], g)


def _isles_mr(isles: Path, patient: Patient, truth: Truth, dwi: dict, frames: list[np.ndarray] | None) -> None:
    g = truth.geometry
    write_nifti(_isles_name(isles, patient, "dwi", "dwi"), dwi["b1000"], g)
    write_nifti(_isles_name(isles, patient, "dwi", "adc"), dwi["adc"], g)
    write_nifti(_isles_name(isles, patient, "anat", "flair"), dwi["flair"], g)
    if frames:
        write_nifti(_isles_name(isles, patient, "perf", "dsc"), np.stack(frames), g)
    for key in ("cbf", "cbv", "mtt", "ttp", "tmax"):
        write_nifti(_isles_name(isles, patient, "perf", key), getattr(truth, key), g)
    for name in ("core", "penumbra", "final_reperfused", "final_not_reperfused"):
        write_nifti(_isles_name(isles, patient, "dwi", f"{name}_msk", derivative=True), truth.masks[name], g)


def write_cohort(
    first_seed: int,
    count: int,
    kind: str,
    out: Path,
    options: PhantomOptions | None = None,
    isles: Path | None = None,
    on_patient: Callable[[dict], None] | None = None,
) -> dict:
    """Write patients ``first_seed`` .. ``first_seed + count - 1`` and a cohort table.

    Patient ``s`` is the same whether written alone or in a cohort. Returns the cohort record,
    including the AUC of the true outcome probability for mRS 3-6 (which knows reperfusion and
    sICH) and the admission ceiling (the best any outcome model fed at admission can reach).
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    patients = []
    for seed in range(first_seed, first_seed + count):
        summary = write_patient(seed, kind, out, options, isles)
        patients.append(summary)
        if on_patient is not None:
            on_patient(summary)
    clinical = [p["clinical"] for p in patients]
    poor = np.array([c["mrs_90d"] >= 3 for c in clinical])
    record = {
        "first_seed": first_seed,
        "count": count,
        "kind": kind,
        "poor_outcome_fraction": float(poor.mean()),
        "best_auc_mrs_3_6": roc_auc(np.array([c["p_poor_outcome"] for c in clinical]), poor),
        "admission_ceiling_auc_mrs_3_6": roc_auc(np.array([c["p_poor_outcome_admission"] for c in clinical]), poor),
        "patients": patients,
    }
    write_json(out / "cohort.json", record)
    columns = ["patient_id", "age", "sex", "nihss", "onset_to_imaging_min", "lesion_side", "tici",
               "reperfused", "sich", "core_ml", "hypoperfused_ml", "final_infarct_ml", "p_poor_outcome", "p_poor_outcome_admission", "mrs_90d"]
    rows = ["\t".join(columns)]
    for p in patients:
        values = {"patient_id": p["patient_id"], **p["clinical"]}
        rows.append("\t".join("n/a" if values[c] is None else str(values[c]) for c in columns))
    (out / "participants.tsv").write_text("\n".join(rows) + "\n")
    if isles is not None:
        isles.mkdir(parents=True, exist_ok=True)
        (isles / "participants.tsv").write_text("\n".join(rows) + "\n")
    return record
