"""The whole path with real tools: storescu -> strokegate serve -> storescp, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_tools import dciodvfy_errors, requires_dciodvfy, requires_storescu, storescu
from returned_results import FINAL_LABELS, check_final_infarcts, check_report_matches_findings, dice, hypoperfused, read_report, read_truth, round_trip
from service.phantom.generate import write_patient
from service.phantom.truth_files import read_nifti
from service_harness import Service, StoreSCP, TemporaryPostgres, wait_for

pytestmark = [pytest.mark.integration, requires_storescu, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def mri_patient(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic MRI stroke patient 2 (default 128x128x20 grid)."""
    out = tmp_path_factory.mktemp("mri")
    write_patient(2, "mri", out)
    return out / "SGPH00000002"


def truth_core_ml(patient: Path) -> float:
    core, affine = read_nifti(patient / "truth" / "mr" / "core.nii.gz")
    return float(core.sum()) * abs(np.linalg.det(affine[:3, :3])) / 1000


def seg_volume_ml(path: Path, source_dir: Path) -> float:
    """Voxels set in the SEG times the voxel volume of its source series (slice spacing from positions)."""
    frames = pydicom.dcmread(path).pixel_array.astype(bool)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in source_dir.glob("*.dcm")]
    z = sorted({float(h.ImagePositionPatient[2]) for h in headers})
    row, column = (float(v) for v in headers[0].PixelSpacing)
    return float(frames.sum()) * row * column * (z[1] - z[0]) / 1000


def run_dwi_study(tmp_path: Path, database_url: str, mri_patient: Path) -> None:
    pacs = StoreSCP(tmp_path / "pacs").start()
    service = Service(tmp_path / "gate", database_url, [f"{pacs.address}?send=seg+sr"])
    try:
        service.start()
        storescu(mri_patient / "dicom" / "MR" / "dwi", service.port, "STROKEGATE")
        files = wait_for(lambda: len(pacs.files()) >= 2 and pacs.files(), 120, "SEG and SR at the PACS")
        by_modality = {pydicom.dcmread(f, stop_before_pixels=True).Modality: f for f in files}
        assert set(by_modality) == {"SEG", "SR"}
        source = pydicom.dcmread(next((mri_patient / "dicom" / "MR" / "dwi").glob("*.dcm")), stop_before_pixels=True)
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            assert ds.StudyInstanceUID == source.StudyInstanceUID
            assert ds.PatientID == source.PatientID
            assert dciodvfy_errors(path) == [], path
        truth = truth_core_ml(mri_patient)
        measured = seg_volume_ml(by_modality["SEG"], mri_patient / "dicom" / "MR" / "dwi")
        assert abs(measured - truth) <= 0.10 * truth, f"SEG core {measured:.1f} mL vs truth {truth:.1f} mL"
        # SEG and SR go out before the job has drawn its reader series and is done
        study = wait_for(lambda: (s := service.get(f"/api/studies/{source.StudyInstanceUID}"))["state"] == "done" and s,
                         60, "the study's job done")
        assert study["instances"] == 40
        assert study["jobs"][0]["findings"]["segments"]["core"] == pytest.approx(measured, rel=0.01)
        deliveries = service.get("/api/deliveries")
        assert len(deliveries) == 2 and all(d["state"] == "sent" for d in deliveries)
        assert service.metric("strokegate_instances_received_total", modality="MR") == 40
        assert service.metric("strokegate_delivery_attempts_total", result="success") == 2
        wait_for(lambda: service.metric("strokegate_last_instance_to_pacs_ack_seconds_count") == 1, 30,
                 "the last-image-to-PACS time observed")
        assert source.StudyInstanceUID not in service.get("/metrics")
        assert source.PatientID not in service.get("/metrics")
        log = service.log.read_text()
        assert source.StudyInstanceUID not in log and source.PatientID not in log and str(source.PatientName) not in log
    finally:
        service.stop()
        pacs.stop()


@requires_dciodvfy
def test_dwi_study_comes_back_as_valid_seg_and_sr_sqlite(tmp_path: Path, mri_patient: Path) -> None:
    run_dwi_study(tmp_path, f"sqlite:///{tmp_path / 'strokegate.db'}", mri_patient)


@requires_dciodvfy
def test_dwi_study_comes_back_as_valid_seg_and_sr_postgresql(tmp_path: Path, mri_patient: Path) -> None:
    with TemporaryPostgres() as url:
        run_dwi_study(tmp_path, url, mri_patient)


def test_results_arrive_when_the_destination_comes_back(tmp_path: Path, mri_patient: Path) -> None:
    pacs = StoreSCP(tmp_path / "pacs")  # not started: the PACS is down
    service = Service(tmp_path / "gate", f"sqlite:///{tmp_path / 'db.sqlite'}", [f"{pacs.address}?send=seg+sr"]).start()
    try:
        storescu(mri_patient / "dicom" / "MR" / "dwi", service.port, "STROKEGATE")
        wait_for(lambda: service.metric("strokegate_delivery_failures_total") >= 4, 90, "failed delivery attempts")
        pending = service.get("/api/deliveries")
        assert pending and all(d["state"] == "pending" and d["attempts"] >= 1 and d["last_error"] for d in pending)
        pacs.start()
        wait_for(lambda: len(pacs.files()) >= 2, 60, "results after the PACS came back")
        wait_for(lambda: all(d["state"] == "sent" for d in service.get("/api/deliveries")), 20, "deliveries marked sent")
        assert len(pacs.files()) == 2
        assert service.metric("strokegate_delivery_attempts_total", result="failure") >= 4
    finally:
        service.stop()
        pacs.stop()


@requires_dciodvfy
def test_dwi_and_dsc_perfusion_come_back_as_the_mismatch(tmp_path: Path, mri_patient: Path) -> None:
    """The whole MRI study (DWI, ADC, FLAIR, DSC-PWI): core from ADC, penumbra from Tmax > 6 s,
    the mismatch in the SR. Issue 4 sets no DSC accuracy target; as a regression guard the
    hypoperfused volume must be within 20 mL and Dice >= 0.85 (measured on patient 2: -16 mL,
    Dice 0.89, Tmax median error 0.1 s), the core within 10 %."""
    result = round_trip(tmp_path, mri_patient / "dicom" / "MR", instances=40 + 20 + 20 + 50 * 20)
    findings = check_report_matches_findings(result)
    assert findings["analysis"] == "mri-perfusion-diffusion-mismatch"
    reperfused, not_reperfused = FINAL_LABELS
    assert set(result.masks) == {"Ischemic core", "Penumbra", reperfused, not_reperfused}
    assert not (result.masks["Ischemic core"] & result.masks["Penumbra"]).any()
    check_final_infarcts(result)  # seed 001's two networks: both volumes, the salvage, their Dice and the verdict
    assert {m["name"] for m in findings["models"]} == {"mri-final-infarct-reperfused", "mri-final-infarct-not-reperfused", "outcome-crd"}
    measured = findings["measurements"]
    assert measured["mismatch_volume_ml"] == pytest.approx(measured["hypoperfused_volume_ml"] - measured["core_volume_ml"], abs=1e-2)
    assert result.report.target_mismatch is not None
    truth = read_truth(mri_patient / "truth" / "mr")
    hypo_ml = result.report.measurements["hypoperfused_volume_ml"]
    hypo_dice = dice(hypoperfused(result.masks), truth.masks["hypoperfused"])
    core_ml = result.report.volumes["Ischemic core"]
    summary = (f"hypoperfused {hypo_ml:.1f} mL vs {truth.volume('hypoperfused'):.1f} mL, Dice {hypo_dice:.3f}; core "
               f"{core_ml:.1f} mL vs {truth.volume('core'):.1f} mL, Dice {dice(result.masks['Ischemic core'], truth.masks['core']):.3f}")
    print(summary)
    assert abs(hypo_ml - truth.volume("hypoperfused")) <= 20.0 and hypo_dice >= 0.85, summary
    assert abs(core_ml - truth.volume("core")) <= 0.10 * truth.volume("core"), summary


def test_flags_and_failure_reasons_reach_the_api_and_the_sr(tmp_path: Path, mri_patient: Path) -> None:
    """A DSC series without EchoTime leaves the core reported with a QC flag (in the API's findings
    and as TEXT in the SR); a study with nothing to analyse fails with its reason in the API."""
    flagged, refused = tmp_path / "flagged", tmp_path / "refused"
    shutil.copytree(mri_patient / "dicom" / "MR" / "dwi", flagged / "dwi")
    (flagged / "pwi").mkdir()
    for path in sorted((mri_patient / "dicom" / "MR" / "pwi").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        del ds.EchoTime
        ds.save_as(flagged / "pwi" / path.name)
    refused.mkdir()
    for path in sorted((mri_patient / "dicom" / "MR" / "flair").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = "2.25.4242"
        ds.save_as(refused / path.name)
    pacs = StoreSCP(tmp_path / "pacs").start()
    service = Service(tmp_path / "gate", f"sqlite:///{tmp_path / 'db.sqlite'}", [f"{pacs.address}?send=seg+sr"]).start()
    try:
        storescu(flagged, service.port, "STROKEGATE")
        storescu(refused, service.port, "STROKEGATE")
        uid = pydicom.dcmread(next((flagged / "dwi").glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
        done = wait_for(lambda: (s := service.get(f"/api/studies/{uid}", missing={})).get("state") == "done" and s, 120, "flagged study")
        failed = wait_for(lambda: (s := service.get("/api/studies/2.25.4242", missing={})).get("state") == "failed" and s, 120, "refused study")
        findings = done["jobs"][-1]["findings"]
        assert findings["analysis"] == "mri-diffusion-core"
        (flag,) = [f for f in findings["qc_flags"] if f.startswith("DSC perfusion not analysed")]
        assert "EchoTime" in flag
        assert any(job["findings"] and flag in job["findings"]["qc_flags"] for job in service.get("/api/jobs"))
        assert "nothing to analyse" in failed["error"] and "flair" in failed["error"]
        assert "nothing to analyse" in failed["jobs"][-1]["error"]
        files = wait_for(lambda: len(pacs.files()) >= 2 and pacs.files(), 60, "SEG and SR at the PACS")
        (sr,) = [f for f in files if pydicom.dcmread(f, stop_before_pixels=True).Modality == "SR"]
        assert flag in read_report(sr).qc_flags
        assert dciodvfy_errors(sr) == []
    finally:
        service.stop()
        pacs.stop()


@requires_dciodvfy
def test_each_destination_gets_its_own_objects_under_its_own_series_labels(tmp_path: Path, mri_patient: Path) -> None:
    """Configured in the environment as an operator would (JSON): the PACS gets SEG, SR and the
    colour maps with its own series numbers and descriptions; a viewer gets only the summary image,
    labelled as written. Relabelled objects keep the UIDs of the objects StrokeGate wrote."""
    pacs = StoreSCP(tmp_path / "pacs", ae_title="PACS").start()
    viewer = StoreSCP(tmp_path / "viewer", ae_title="VIEWER").start()
    destinations = [
        {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port, "send": ["seg", "sr", "maps"],
         "series": {"seg": {"number": 1901, "description": "AI stroke core"},
                    "maps": {"number": 2911, "description": "AI {map} colour"}}},
        {"ae_title": "VIEWER", "host": "127.0.0.1", "port": viewer.port, "send": ["summary"]},
    ]
    service = Service(tmp_path / "gate", f"sqlite:///{tmp_path / 'db.sqlite'}", [],
                      env={"STROKEGATE_DESTINATIONS": json.dumps(destinations)}).start()
    try:
        storescu(mri_patient / "dicom" / "MR" / "dwi", service.port, "STROKEGATE")
        source = pydicom.dcmread(next((mri_patient / "dicom" / "MR" / "dwi").glob("*.dcm")), stop_before_pixels=True)
        wait_for(lambda: service.get(f"/api/studies/{source.StudyInstanceUID}", {}).get("state") == "done", 120, "the analysis")
        deliveries = wait_for(lambda: (d := service.get("/api/deliveries?limit=1000")) and all(x["state"] == "sent" for x in d)
                              and d, 60, "every delivery sent")
        at_pacs = [pydicom.dcmread(p, stop_before_pixels=True) for p in pacs.files()]
        at_viewer = [pydicom.dcmread(p, stop_before_pixels=True) for p in viewer.files()]
        assert len(at_pacs) + len(at_viewer) == len(deliveries)
        labels = {(ds.Modality, int(ds.SeriesNumber), ds.SeriesDescription) for ds in at_pacs}
        assert ("SEG", 1901, "AI stroke core (RESEARCH)") in labels
        assert ("SR", 902, "StrokeGate report v1 - research use only") in labels  # no label set: as written
        maps = {(n, d) for m, n, d in labels if m not in ("SEG", "SR")}
        assert maps == {(2916, "AI ADC colour (RESEARCH)")}  # ADC is the sixth map: 2911 + 5
        assert not any(ds.SeriesDescription.startswith("StrokeGate summary") for ds in at_pacs)
        (summary,) = at_viewer
        assert int(summary.SeriesNumber) == 903 and summary.SeriesDescription.startswith("StrokeGate summary")
        received = {ds.SOPInstanceUID for ds in at_pacs + at_viewer}
        assert len(received) == len(deliveries)  # each object once
        written = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in (tmp_path / "gate" / "results").rglob("*.dcm")}
        assert received <= written
        assert dciodvfy_errors(next(p for p in pacs.files() if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG")) == []
    finally:
        service.stop()
        pacs.stop()
        viewer.stop()
