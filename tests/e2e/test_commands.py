"""The commands a user runs: `strokegate demo` and `strokegate process`, as subprocesses."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from service.phantom.generate import write_patient
from service.phantom.patient import PhantomOptions
from service.results.sr import clinical_input

STROKEGATE = Path(sys.executable).parent / "strokegate"
pytestmark = pytest.mark.timeout(600)


def test_demo_sends_a_patient_and_receives_seg_and_sr(tmp_path: Path) -> None:
    # without --keep: a new folder in the temporary folder (here tmp_path), kept, so the paths it prints exist
    result = subprocess.run([str(STROKEGATE), "demo"], capture_output=True, text=True, timeout=500,
                            env={**os.environ, "COLUMNS": "200", "TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    kept = Path(re.search(r"everything the demo made is in (\S+)", out).group(1))
    assert kept.parent == tmp_path and kept.name.startswith("strokegate-demo-")
    assert "received by PACS: SEG" in out and "received by PACS: SR" in out
    measured = float(re.search(r"ischaemic core \(ADC < 620 e-6 mm2/s\)\s*│\s*([\d.]+) mL", out).group(1))
    truth = float(re.search(r"ground truth core\s*│\s*([\d.]+) mL", out).group(1))
    assert abs(measured - truth) <= 0.1 * truth
    received = [pydicom.dcmread(p, stop_before_pixels=True) for p in (kept / "pacs").glob("*.dcm")]
    assert {"SEG", "SR", "OT"} <= {ds.Modality for ds in received}  # OT: summary and colour maps
    assert any(ds.SOPClassUID == pydicom.uid.ParametricMapStorage for ds in received)
    summary = Path(re.search(r"summary image: (\S+\.dcm)", out).group(1))
    assert summary.exists() and summary.with_suffix(".png").exists() and summary.is_relative_to(kept)


def test_process_analyses_a_folder_offline(tmp_path: Path) -> None:
    write_patient(12, "mri", tmp_path / "in")  # DICOM plus NIfTI truth and JSON: non-DICOM files are skipped
    result = subprocess.run([str(STROKEGATE), "process", str(tmp_path / "in"), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    findings = json.loads((tmp_path / "out" / "findings.json").read_text())
    truth = json.loads((tmp_path / "in" / "SGPH00000012" / "truth" / "clinical.json").read_text())
    assert findings["analysis"] == "mri-perfusion-diffusion-mismatch"  # DWI and DSC-PWI: the mismatch
    assert findings["segments"]["core"] > 0.5 * truth["core_ml"]
    assert findings["measurements"]["hypoperfused_volume_ml"] >= findings["measurements"]["core_volume_ml"]
    assert pydicom.dcmread(tmp_path / "out" / "SEG.dcm").Modality == "SEG"
    assert pydicom.dcmread(tmp_path / "out" / "SR.dcm").Modality == "SR"
    assert findings["nihss"] == {"available": False, "note": "NIHSS not available: imaging only"}
    items = clinical_input(pydicom.dcmread(tmp_path / "out" / "SR.dcm"))
    assert items["CLINICALINPUT"] == "NIHSS not available: imaging only"
    probability, unit = items["POORMRS90D"]  # the 90-day outcome, from the images alone
    assert 0.0 < probability < 1.0 and unit == "{probability}"
    assert items["OUTCOMEINPUTS"].startswith("outcome-crd") and "imaging only" in items["OUTCOMEINPUTS"]


def test_process_analyses_a_ct_perfusion_study(tmp_path: Path) -> None:
    write_patient(2, "ctp", tmp_path / "in", PhantomOptions(ct_matrix=128, ct_slices=10, noise_hu=10.0))
    result = subprocess.run([str(STROKEGATE), "process", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                             "--nihss", "14", "--nihss-assessed", "2026-12-04T10:15:00"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    findings = json.loads((tmp_path / "out" / "findings.json").read_text())
    assert findings["analysis"] == "ct-perfusion"
    assert {"core", "penumbra"} <= set(findings["segments"])
    assert findings["measurements"]["hypoperfused_volume_ml"] > 0
    assert "target_mismatch" in findings["measurements"] and isinstance(findings["qc_flags"], list)
    seg = pydicom.dcmread(tmp_path / "out" / "SEG.dcm")
    # the CT model refuses 1.8 mm pixels; the final-infarct pair resamples them to its 0.9 mm and says so
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Ischemic core", "Penumbra", "Predicted final infarct if reperfused",
                                                            "Predicted final infarct if not reperfused"]
    assert any(flag.startswith("predicted final infarct on pixels resampled from") for flag in findings["qc_flags"])
    assert "reperfusion_salvage_ml" in findings["measurements"]
    assert pydicom.dcmread(tmp_path / "out" / "SR.dcm").Modality == "SR"
    assert findings["nihss"]["value"] == 14 and findings["nihss"]["source"] == "dicom/cli"
    assert findings["nihss"]["assessed_at"] == "2026-12-04T10:15:00Z"
    items = clinical_input(pydicom.dcmread(tmp_path / "out" / "SR.dcm"))
    assert items["72089-6"] == (14.0, "{score}") and items["NIHSSSOURCE"].startswith("command line")


def test_process_explains_a_folder_it_cannot_analyse(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    result = subprocess.run([str(STROKEGATE), "process", str(tmp_path / "in"), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "no DICOM files" in result.stdout
