"""Results returned by the service: one study sent with storescu and its SEG and SR received by a
storescp 'PACS' (``round_trip``), read back into masks and values, and compared with a synthetic
patient's truth masks (``truth/<ct|mr>/*.nii.gz``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
import pytest
from pydicom.sr.codedict import codes

from dicom_tools import dciodvfy_errors, storescu

from service.phantom.truth_files import read_nifti
from service.results.coding import MEASUREMENT_CODES, QC_FLAG, TARGET_MISMATCH
from service_harness import Service, StoreSCP, wait_for


def seg_masks(path: Path) -> dict[str, np.ndarray]:
    """{segment label: bool [slice, row, column]} of a BINARY SEG, slices ordered along the normal
    (increasing), as the phantom's truth arrays are."""
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array.astype(bool)
    if frames.ndim == 2:
        frames = frames[None]
    orientation = np.asarray(ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient, float)
    normal = np.cross(orientation[:3], orientation[3:])
    labels = {int(item.SegmentNumber): str(item.SegmentLabel) for item in ds.SegmentSequence}
    placed: list[tuple[str, float, np.ndarray]] = []
    for frame, group in zip(frames, ds.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        position = np.asarray(group.PlanePositionSequence[0].ImagePositionPatient, float)
        placed.append((labels[number], round(float(position @ normal), 2), frame))
    heights = sorted({h for _, h, _ in placed})
    masks = {label: np.zeros((len(heights), *frames.shape[1:]), dtype=bool) for label in labels.values()}
    for label, height, frame in placed:
        masks[label][heights.index(height)] = frame
    return masks


@dataclass
class Truth:
    masks: dict[str, np.ndarray]
    voxel_ml: float

    def volume(self, name: str) -> float:
        return float(self.masks[name].sum()) * self.voxel_ml


def read_truth(folder: Path) -> Truth:
    """Core, penumbra, hypoperfused and both final-infarct truth masks of one scan grid."""
    masks, voxel_ml = {}, 0.0
    for name in ("core", "penumbra", "hypoperfused", "final_reperfused", "final_not_reperfused"):
        mask, affine = read_nifti(folder / f"{name}.nii.gz")
        masks[name] = mask.astype(bool)
        voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000
    return Truth(masks, voxel_ml)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


@dataclass
class Report:
    """What a returned TID 1500 SR says: segment volumes by label, study measurements by
    ``Findings.measurements`` name, the target-mismatch verdict and the QC flags."""

    volumes: dict[str, float]
    measurements: dict[str, float]
    target_mismatch: bool | None
    qc_flags: list[str]


def read_report(path: Path) -> Report:
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(path))
    volumes = {
        str(group.tracking_identifier): float(group.get_measurements(name=codes.SCT.Volume)[0].value)
        for group in sr.content.get_volumetric_roi_measurement_groups()
    }
    names = {code.value: name for name, code in MEASUREMENT_CODES.items()}
    measurements: dict[str, float] = {}
    verdict: bool | None = None
    flags: list[str] = []
    for group in sr.content.get_image_measurement_groups():
        for measurement in group.get_measurements():
            measurements[names.get(measurement.name.value, measurement.name.value)] = float(measurement.value)
        for evaluation in group.get_qualitative_evaluations():
            if evaluation.name == TARGET_MISMATCH:
                verdict = evaluation.value == codes.SCT.Yes
        flags += [item.TextValue for item in group[0].ContentSequence
                  if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == QC_FLAG.value]
    return Report(volumes, measurements, verdict, flags)


@dataclass
class RoundTrip:
    """What came back for one study sent to the service."""

    seg: Path
    sr: Path
    masks: dict[str, np.ndarray]  # SEG segment label -> bool [slice, row, column]
    report: Report
    study: dict  # /api/studies/{uid}
    source_study_uid: str
    summary: Path  # the summary image (secondary capture)


def round_trip(root: Path, study_dir: Path, instances: int) -> RoundTrip:
    """Send every file under ``study_dir``; wait for the SEG, SR and summary image at a storescp 'PACS'."""
    pacs = StoreSCP(root / "pacs").start()
    service = Service(root / "gate", f"sqlite:///{root / 'strokegate.db'}", [pacs.address])
    try:
        service.start()
        storescu(study_dir, service.port, "STROKEGATE", timeout=120)
        source = pydicom.dcmread(next(study_dir.rglob("*.dcm")), stop_before_pixels=True)
        uid = source.StudyInstanceUID

        def finished() -> dict | None:
            study = service.get(f"/api/studies/{uid}", missing={})
            # The study's state, not its last job's: a pause in the sending longer than the idle
            # time analyses what has come (version 1) while the rest keeps the study receiving.
            settled = study.get("instances") == instances and study.get("state") in ("done", "failed")
            return study if settled and study.get("jobs") else None

        study = wait_for(finished, 240, f"the analysis of all {instances} instances (log: {service.log})", interval=1.0)
        assert study["state"] == "done", f"study failed: {study.get('error')}"
        version = study["jobs"][-1]["version"]

        def latest() -> dict[str, Path] | None:
            found = {}
            for path in pacs.files():
                try:
                    ds = pydicom.dcmread(path, stop_before_pixels=True)
                except (InvalidDicomError, EOFError):  # storescp is still writing it: the next look reads it whole
                    continue
                if f" v{version} " in f" {ds.SeriesDescription} " and ds.Modality in ("SEG", "SR"):
                    found[ds.Modality] = path
                elif str(ds.SeriesDescription).startswith(f"StrokeGate summary v{version} "):
                    found["summary"] = path
            return found if set(found) == {"SEG", "SR", "summary"} else None

        by_modality = wait_for(latest, 60, f"SEG, SR and summary of version {version} at the PACS")
        for path in by_modality.values():
            returned = pydicom.dcmread(path, stop_before_pixels=True)
            assert returned.StudyInstanceUID == uid and returned.PatientID == source.PatientID
            assert dciodvfy_errors(path) == [], path
        return RoundTrip(
            by_modality["SEG"], by_modality["SR"], seg_masks(by_modality["SEG"]), read_report(by_modality["SR"]),
            study, uid, by_modality["summary"],
        )
    finally:
        service.stop()
        pacs.stop()


def check_report_matches_findings(result: RoundTrip) -> dict:
    """The SR, the SEG and the API's findings tell the same numbers; returns the findings."""
    findings = result.study["jobs"][-1]["findings"]
    measured = findings["measurements"]
    assert set(result.report.volumes) == set(result.masks)
    for name, value in measured.items():
        if name == "target_mismatch":
            assert result.report.target_mismatch == (value == 1.0)
        elif name in ("core_volume_ml", "penumbra_volume_ml"):
            label = {"core_volume_ml": "Ischemic core", "penumbra_volume_ml": "Penumbra"}[name]
            assert result.report.volumes.get(label, 0.0) == pytest.approx(value, abs=1e-3)
        else:
            assert result.report.measurements[name] == pytest.approx(value, abs=1e-3), name
    assert result.report.qc_flags == findings["qc_flags"]
    return findings


def hypoperfused(masks: dict[str, np.ndarray]) -> np.ndarray:
    core = masks["Ischemic core"]
    return core | masks["Penumbra"] if "Penumbra" in masks else core


FINAL_LABELS = ("Predicted final infarct if reperfused", "Predicted final infarct if not reperfused")
"""The SEG labels of seed 001's two predictions (reperfused, not reperfused)."""


def check_final_infarcts(result: RoundTrip) -> dict:
    """Both predictions came back: the SR's volumes, salvage and Dice are the API's, the salvage is
    their difference, the verdict 0 or 1, the reperfused prediction mostly inside the other one.
    Returns the measurements."""
    measured = result.study["jobs"][-1]["findings"]["measurements"]
    for name in ("predicted_final_reperfused_ml", "predicted_final_not_reperfused_ml", "reperfusion_salvage_ml", "scenario_dice"):
        assert result.report.measurements[name] == pytest.approx(measured[name], abs=1e-3), name
    assert measured["reperfusion_salvage_ml"] == pytest.approx(
        measured["predicted_final_not_reperfused_ml"] - measured["predicted_final_reperfused_ml"], abs=1e-2)
    assert measured["reperfusion_responder"] in (0.0, 1.0)
    reperfused, not_reperfused = (result.masks[label] for label in FINAL_LABELS)
    inside = (reperfused & not_reperfused).sum() / max(1, reperfused.sum())
    assert inside >= 0.8, f"only {inside:.0%} of the reperfused prediction lies inside the non-reperfused one"
    return measured
