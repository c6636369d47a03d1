"""A real PACS in the loop: Orthanc with the shipped routing rule forwards a stroke study to
StrokeGate by itself, and every StrokeGate result (SEG, SR, summary image, colour map series,
Parametric Maps) lands in the same Orthanc study, once, valid, with the values of the Findings."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_tools import (
    ORTHANC_CONFIG,
    dciodvfy_errors,
    load_orthanc_config,
    requires_dciodvfy,
    requires_orthanc,
    requires_storescu,
    run_orthanc,
    storescu,
)
from service.phantom.generate import write_patient
from service.phantom.patient import PhantomOptions
from service_harness import Service, wait_for

pytestmark = [pytest.mark.integration, requires_orthanc, requires_storescu, requires_dciodvfy, pytest.mark.timeout(400)]

ROUTING = ORTHANC_CONFIG.parent / "strokegate.json"
STUDIES = {  # kind -> (phantom options, folder of the series to store, maps expected)
    "mri": (PhantomOptions(mr_matrix=96, mr_frames=30), "MR", {"ADC", "CBF", "CBV", "MTT", "TTP", "Tmax"}),
    # CT at 256 x 256, the pixel size the CT perfusion model was trained on: its segments come back too
    "ctp": (PhantomOptions(ct_slices=8, ct_frames=30, noise_hu=10.0), "CT/ctp", {"CBF", "CBV", "MTT", "TTP", "Tmax"}),
}
SEGMENT_IDENTS = {"Ischemic core": "core", "Penumbra": "penumbra", "Ischemic core (model)": "core-ctp-core-penumbra",
                  "Penumbra (model)": "penumbra-ctp-core-penumbra"}
FINAL_MODELS = {"Predicted final infarct if reperfused": ("final_reperfused", "final-infarct-reperfused"),
                "Predicted final infarct if not reperfused": ("final_not_reperfused", "final-infarct-not-reperfused")}
"""Seed 001's predictions: their segment kind and model name (after the modality, mri- or ct-)."""


def segment_ident(label: str, kind: str) -> str:
    """The API's ident of the segment labelled ``label`` in a ``kind`` study's SEG."""
    if label in FINAL_MODELS:
        segment, model = FINAL_MODELS[label]
        return f"{segment}-{'ct' if kind == 'ctp' else 'mri'}-{model}"
    return SEGMENT_IDENTS[label]


def numbers(items) -> list[float]:  # noqa: ANN001
    """Every NUM value in an SR content tree."""
    values = []
    for item in items:
        if item.ValueType == "NUM":
            values.append(float(item.MeasuredValueSequence[0].NumericValue))
        values += numbers(item.get("ContentSequence", []))
    return values


@pytest.mark.parametrize("kind", sorted(STUDIES))
def test_orthanc_forwards_the_study_and_gets_every_result_back_into_it(tmp_path: Path, kind: str) -> None:
    options, folder, maps = STUDIES[kind]
    write_patient(2, "ctp" if kind == "ctp" else "mri", tmp_path / "patient", options)
    images = tmp_path / "patient" / "SGPH00000002" / "dicom" / folder
    service = Service(tmp_path / "gate", f"sqlite:///{tmp_path / 'db.sqlite'}", [])
    routing = load_orthanc_config(ROUTING)
    routing["DicomModalities"]["strokegate"] = ["STROKEGATE", "127.0.0.1", service.port]
    routing["LuaScripts"] = [str(ORTHANC_CONFIG.parent / "strokegate.lua")]
    routing["StableAge"] = 2
    with run_orthanc(tmp_path / "orthanc", overrides=routing) as orthanc:
        service.destinations = [f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"]
        service.start()
        try:
            storescu(images, orthanc.dicom_port, orthanc.aet)
            source = pydicom.dcmread(next(images.rglob("*.dcm")), stop_before_pixels=True)
            study = wait_for(lambda: service.get(f"/api/studies/{source.StudyInstanceUID}", {}).get("state") == "done"
                             and service.get(f"/api/studies/{source.StudyInstanceUID}"), 240, "the analysis")
            job = study["jobs"][-1]
            produced = len(service.get("/api/deliveries?limit=1000"))

            def ours() -> list[dict] | None:
                studies = orthanc.get("/studies")
                assert len(studies) == 1, "results must file into the source study"
                series = [s for s in orthanc.get(f"/studies/{studies[0]}/series")
                          if s["MainDicomTags"].get("SeriesDescription", "").startswith("StrokeGate")]
                return series if sum(len(s["Instances"]) for s in series) == produced else None

            series = wait_for(ours, 180, f"all {produced} results in the Orthanc study")
            time.sleep(4)  # the study is stable again: a second forward would happen now
            assert orthanc.log_text().count("StrokeGate: forwarded") == 1, "results must not be sent back"
            assert [(j["version"], j["state"]) for j in service.get("/api/jobs")] == [(1, "done")]

            descriptions = {s["MainDicomTags"]["SeriesDescription"] for s in series}
            assert any(d.startswith("StrokeGate summary") for d in descriptions)
            assert {d.split()[1] for d in descriptions if " colour " in d} == maps
            assert {d.split()[1] for d in descriptions if " values " in d} == maps

            by_modality: dict[str, pydicom.Dataset] = {}
            for one in series:
                for instance in one["Instances"]:
                    path = tmp_path / "returned" / f"{instance}.dcm"
                    path.parent.mkdir(exist_ok=True)
                    with urllib.request.urlopen(f"{orthanc.rest_url}/instances/{instance}/file", timeout=10) as response:
                        path.write_bytes(response.read())
                    assert dciodvfy_errors(path) == [], one["MainDicomTags"]["SeriesDescription"]
                    ds = pydicom.dcmread(path)
                    assert (ds.StudyInstanceUID, ds.PatientID) == (source.StudyInstanceUID, source.PatientID)
                    by_modality[ds.Modality] = ds

            findings = job["findings"]
            seg = hd.seg.Segmentation.from_dataset(by_modality["SEG"])
            spacing = [float(v) for v in seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
            positions = sorted({tuple(float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient)
                                for f in seg.PerFrameFunctionalGroupsSequence})
            between = float(np.linalg.norm(np.subtract(positions[1], positions[0])))  # slices may have gaps
            voxel_ml = between * spacing[0] * spacing[1] / 1000
            frames = np.asarray(seg.pixel_array).astype(bool)
            labels = [d.SegmentLabel for d in seg.SegmentSequence]
            if kind == "ctp":
                assert {"Ischemic core (model)", "Penumbra (model)"} <= set(labels)
            assert set(FINAL_MODELS) <= set(labels)  # both predicted final infarcts (MRI here on resampled 2.4 mm pixels)
            for number, label in enumerate(labels, start=1):
                key = segment_ident(label, kind)
                voxels = frames[[i for i, f in enumerate(seg.PerFrameFunctionalGroupsSequence)
                                 if f.SegmentIdentificationSequence[0].ReferencedSegmentNumber == number]].sum()
                assert voxels * voxel_ml == pytest.approx(findings["segments"][key], rel=0.02, abs=0.05), label
            sr = hd.sr.Comprehensive3DSR.from_dataset(by_modality["SR"])
            reported = numbers(sr.ContentSequence)
            for name, value in findings["measurements"].items():
                if name != "target_mismatch":
                    assert any(abs(v - value) <= 1e-3 + 1e-6 * abs(value) for v in reported), (name, value, reported)
        finally:
            service.stop()
