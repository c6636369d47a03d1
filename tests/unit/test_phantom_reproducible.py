"""A seed is a patient: same seed, same bytes and UIDs; another seed, another patient."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from service.cli import app
from service.phantom.generate import write_cohort, write_patient
from service.phantom.patient import PhantomOptions

SMALL = PhantomOptions(ct_matrix=64, ct_slices=4, ct_frames=8, mr_matrix=48, mr_slices=6, mr_frames=8)


def study_fingerprint(root: Path) -> dict[str, tuple[str, str, str, str]]:
    """Relative path -> (SOP, series and study UID, pixel-data hash) for every DICOM file."""
    out = {}
    for path in sorted(root.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        out[str(path.relative_to(root))] = (
            ds.SOPInstanceUID,
            ds.SeriesInstanceUID,
            ds.StudyInstanceUID,
            hashlib.sha256(ds.PixelData).hexdigest(),
        )
    return out


@pytest.fixture(scope="module")
def three_patients(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("seeds")
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        write_patient(seed, "all", base / name, SMALL)
    return {"a": base / "a" / "SGPH00000005", "b": base / "b" / "SGPH00000005", "c": base / "c" / "SGPH00000006"}


def test_same_seed_gives_identical_pixel_data_and_uids(three_patients: dict[str, Path]) -> None:
    a, b = study_fingerprint(three_patients["a"]), study_fingerprint(three_patients["b"])
    assert len(a) == 4 * 8 + 5 * 4 + 6 * (2 + 1 + 1 + 8)  # CTP, maps, DWI (2 b), ADC, FLAIR, PWI
    assert a == b
    for name in ("ct/cbf.nii.gz", "mr/core.nii.gz", "clinical.json", "ct_perfusion.json"):
        assert (three_patients["a"] / "truth" / name).read_bytes() == (three_patients["b"] / "truth" / name).read_bytes()


def test_different_seeds_give_different_patients(three_patients: dict[str, Path]) -> None:
    a, c = study_fingerprint(three_patients["a"]), study_fingerprint(three_patients["c"])
    uids_a = {u for v in a.values() for u in v[:3]}
    uids_c = {u for v in c.values() for u in v[:3]}
    assert not uids_a & uids_c
    assert {v[3] for v in a.values()}.isdisjoint({v[3] for v in c.values()})
    first = lambda root: pydicom.dcmread(root / "dicom" / "CT" / "ctp" / "IM00001.dcm")  # noqa: E731
    assert first(three_patients["a"]).PatientID != first(three_patients["c"]).PatientID


def test_study_uids_are_consistent_across_a_studys_series(three_patients: dict[str, Path]) -> None:
    root = three_patients["a"]
    for modality, n_series in (("CT", 6), ("MR", 4)):
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in (root / "dicom" / modality).rglob("*.dcm")]
        assert len({h.StudyInstanceUID for h in headers}) == 1
        assert len({h.FrameOfReferenceUID for h in headers}) == 1
        assert len({h.SeriesInstanceUID for h in headers}) == n_series
        assert len({h.SOPInstanceUID for h in headers}) == len(headers)
        assert {h.PatientID for h in headers} == {"SGPH00000005"}
        assert all("PHANTOM" in str(h.PatientName) for h in headers)
        assert len({h.AccessionNumber for h in headers}) == 1


def test_dwi_series_carries_both_b_values_and_pwi_its_time_points(three_patients: dict[str, Path]) -> None:
    mr = three_patients["a"] / "dicom" / "MR"
    dwi = [pydicom.dcmread(p, stop_before_pixels=True) for p in (mr / "dwi").glob("*.dcm")]
    assert sorted({float(h.DiffusionBValue) for h in dwi}) == [0.0, 1000.0]
    pwi = [pydicom.dcmread(p, stop_before_pixels=True) for p in (mr / "pwi").glob("*.dcm")]
    assert sorted({int(h.TemporalPositionIdentifier) for h in pwi}) == list(range(1, 9))
    assert {float(h.EchoTime) for h in pwi} == {30.0}


def test_cohort_prints_best_auc_and_patient_is_the_same_alone_or_in_a_cohort(tmp_path: Path, three_patients: dict[str, Path]) -> None:
    result = CliRunner().invoke(app, ["phantom", "--kind", "maps", "--out", str(tmp_path), "--seed", "3", "--count", "4",
                                      "--ct-matrix", "48", "--ct-slices", "4", "--ct-frames", "8"])
    assert result.exit_code == 0, result.output
    assert "best achievable AUC" in result.output
    record = json.loads((tmp_path / "cohort.json").read_text())
    assert [p["patient_id"] for p in record["patients"]] == [f"SGPH{s:08d}" for s in range(3, 7)]
    rows = (tmp_path / "participants.tsv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("patient_id\tage\tsex\tnihss")
    alone = json.loads((three_patients["c"] / "truth" / "clinical.json").read_text())
    in_cohort = json.loads((tmp_path / "SGPH00000006" / "truth" / "clinical.json").read_text())
    assert alone == in_cohort


def test_isles_export_writes_images_maps_and_masks(tmp_path: Path) -> None:
    record = write_cohort(8, 1, "all", tmp_path, SMALL, isles=tmp_path / "isles")
    sub = tmp_path / "isles" / "rawdata" / "sub-SGPH00000008" / "ses-01"
    assert (sub / "ct" / "sub-SGPH00000008_ses-01_ctp.nii.gz").exists()
    for name in ("dwi/sub-SGPH00000008_ses-01_dwi.nii.gz", "dwi/sub-SGPH00000008_ses-01_adc.nii.gz", "perf/sub-SGPH00000008_ses-01_dsc.nii.gz"):
        assert (sub / name).exists(), name
    masks = tmp_path / "isles" / "derivatives" / "sub-SGPH00000008" / "ses-01"
    assert (masks / "dwi" / "sub-SGPH00000008_ses-01_core_msk.nii.gz").exists()
    assert (tmp_path / "isles" / "participants.tsv").exists()
    assert record["count"] == 1 and np.isnan(record["best_auc_mrs_3_6"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kind", "pet"], "ctp, mri, maps, all"),
        (["--residue", "gaussian"], "exponential, boxcar"),
        (["--count", "0"], "at least 1"),
        (["--noise-hu", "-3"], "must not be negative"),
    ],
)
def test_cli_rejects_bad_options_without_writing(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["phantom", "--out", str(tmp_path / "out"), *args])
    assert result.exit_code != 0
    assert message in result.output
    assert not (tmp_path / "out").exists()
