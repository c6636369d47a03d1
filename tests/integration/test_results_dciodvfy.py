"""The SEG and SR StrokeGate emits pass dicom3tools' dciodvfy, and dcmtk's dsrdump reads the SR."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_tools import dciodvfy_errors, dciodvfy_warnings, requires_dciodvfy

from service.findings import Findings, FusionOutcomeRecord, ModelInfo, NihssSource, NihssUsed, OutcomeRecord, Segment
from service.imaging.geometry import Geometry
from service.phantom.generate import write_patient
from service.phantom.patient import PhantomOptions
from service.phantom.truth_files import read_nifti
from service.results.seg import build_seg
from service.results.sr import build_sr
from service.results.summary import build_summary, revise_summary

pytestmark = [pytest.mark.integration, requires_dciodvfy]


@pytest.fixture(scope="module")
def findings(tmp_path_factory: pytest.TempPathFactory) -> Findings:
    """Core truth of phantom MRI patient 2 on its b=1000 DWI headers (64 x 64 x 8)."""
    out = tmp_path_factory.mktemp("results")
    write_patient(2, "mri", out, PhantomOptions(mr_matrix=64, mr_slices=8, mr_frames=6))
    root = out / "SGPH00000002"
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((root / "dicom/MR/dwi").glob("*.dcm"))]
    b1000 = [h for h in headers if float(h.DiffusionBValue) == 1000.0]
    iop = np.asarray(b1000[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    b1000.sort(key=lambda h: float(np.asarray(h.ImagePositionPatient, dtype=float) @ normal))
    positions = np.array([h.ImagePositionPatient for h in b1000], dtype=float)
    first = b1000[0]
    geometry = Geometry(
        shape=(len(b1000), int(first.Rows), int(first.Columns)),
        spacing=(float(np.diff(positions @ normal).mean()), *map(float, first.PixelSpacing)),
        origin=tuple(positions[0]),
        row_direction=tuple(iop[:3]),
        column_direction=tuple(iop[3:]),
        slice_thickness=float(first.SliceThickness),
    )
    mask = read_nifti(root / "truth/mr/core.nii.gz")[0].astype(bool)
    volume = float(mask.sum()) * geometry.voxel_volume_ml
    return Findings(
        study_uid=first.StudyInstanceUID,
        version=1,
        analysis="mri-diffusion-core",
        geometry=geometry,
        source_images=b1000,
        segments=[Segment("core", "Ischemic core", mask, volume)],
        measurements={"core_volume_ml": volume},
        parameters={"adc_threshold": 620.0},
    )


@pytest.fixture(scope="module")
def files(findings: Findings, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("objects")
    seg = build_seg(findings)
    sr = build_sr(findings, seg)
    paths = {"seg": folder / "seg.dcm", "sr": folder / "sr.dcm"}
    seg.save_as(paths["seg"], enforce_file_format=True)
    sr.save_as(paths["sr"], enforce_file_format=True)
    return paths


@pytest.mark.parametrize("kind", ["seg", "sr"])
def test_dciodvfy_finds_no_errors(files: dict[str, Path], kind: str) -> None:
    assert dciodvfy_errors(files[kind]) == []
    # Without local-code measurements or QC flags the objects are warning-free as well, but for the
    # SR's clinical-input group ("NIHSS not available: imaging only"), whose concept names are
    # StrokeGate's declared local codes (99SGATE), which dciodvfy cannot know.
    local = "Unrecognized defined term <99SGATE> for value 1 of attribute <Coding Scheme Designator>"
    assert [w for w in dciodvfy_warnings(files[kind]) if not w.endswith(local)] == []
    assert kind == "sr" or dciodvfy_warnings(files[kind]) == []


@pytest.mark.skipif(shutil.which("dsrdump") is None, reason="dcmtk dsrdump not installed (apt-get install dcmtk)")
def test_dsrdump_reads_the_volume(files: dict[str, Path], findings: Findings) -> None:
    proc = subprocess.run(["dsrdump", str(files["sr"])], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    values = re.findall(r'NUM:\(,,"Volume"\)="([^"]+)" \(ml,UCUM,"milliliter"\)', proc.stdout)
    assert len(values) == 1, proc.stdout
    assert float(values[0]) == pytest.approx(findings.segments[0].volume_ml, rel=1e-9)
    assert "Ischemic core" in proc.stdout


def test_local_codes_only_warn(findings: Findings, tmp_path: Path) -> None:
    """A measurement without a DICOM code, a QC flag and the 90-day outcomes (one NUM per model) use
    the 99SGATE scheme: valid, one warning kind."""
    nihss = NihssUsed(14, NihssSource.HL7, "MSG0001", datetime(2026, 12, 4, 10, 15), datetime(2026, 12, 4, 10, 20))
    outcome = OutcomeRecord(0.62, ModelInfo("outcome-crd", "1.0.0", "ab" * 32, "onnxruntime (CPUExecutionProvider)"),
                            nihss, radiomics=0.4, deep=1.2, age=72.0, sex_female=True)
    extended = dataclasses.replace(
        findings, measurements={**findings.measurements, "mismatch_ratio": 2.5}, qc_flags=["low_snr"],
        nihss=nihss, outcome=outcome,  # the 90-day outcome's NUM with its model identification
        outcome_cnn_lstm=FusionOutcomeRecord(0.55, ModelInfo("outcome-cnn-lstm", "1.0.0", "cd" * 32, "onnxruntime (CPUExecutionProvider)"),
                                             nihss, (("adc", 0.7), ("dwi", 0.6), ("tmax", 0.8), ("cbf", 0.3), ("cbv", 0.2))),
    )
    path = tmp_path / "sr.dcm"
    build_sr(extended, build_seg(extended)).save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    assert all("<99SGATE>" in line for line in dciodvfy_warnings(path))


def test_a_revised_summary_has_no_errors(findings: Findings, tmp_path: Path) -> None:
    """The summary a clinical revision brings (the first one's montage, a redrawn text column) is as
    valid a Secondary Capture as the first."""
    nihss = NihssUsed(22, NihssSource.HL7, "MSG0002", datetime(2026, 12, 4, 10, 16), datetime(2026, 12, 4, 10, 30))
    drawn = dataclasses.replace(findings, maps={"adc": np.full(findings.geometry.shape, 800.0, dtype=np.float32)})
    first, revised = tmp_path / "summary.dcm", tmp_path / "summary-r2.dcm"
    build_summary(drawn).save_as(first, enforce_file_format=True)
    outcome = OutcomeRecord(0.7, ModelInfo("outcome-crd", "1.0.0", "ab" * 32, "onnxruntime (CPUExecutionProvider)"),
                            nihss, radiomics=0.4, deep=1.2, age=72.0, sex_female=True)
    revise_summary(pydicom.dcmread(first), findings.study_uid, 1, 2, nihss, [outcome], ["Core: 10.0 mL"], []).save_as(
        revised, enforce_file_format=True)
    assert dciodvfy_errors(first) == [] and dciodvfy_errors(revised) == []
