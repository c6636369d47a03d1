"""ADC, brain mask and ischaemic core: analytic cases, then whole phantom studies against truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.analysis.diffusion_core import analyse_diffusion_core
from service.errors import InputError
from service.perfusion.diffusion import ADC_MAX, adc_map, brain_mask_mr, core_mask
from service.phantom.generate import write_patient
from service.phantom.patient import PhantomOptions
from service.phantom.truth_files import read_nifti

THRESHOLDS = {"adc_threshold": 620.0, "min_lesion_ml": 0.3}  # the settings' defaults

# --- analytic ---------------------------------------------------------------------------------


def test_adc_map_recovers_the_true_adc() -> None:
    true = np.linspace(100.0, 3500.0, 2 * 3 * 50, dtype=np.float32).reshape(2, 3, 50)  # 1e-6 mm2/s
    s0 = np.full(true.shape, 1200.0)
    for b in (500.0, 1000.0, 2000.0):
        s_b = s0 * np.exp(-b * true * 1e-6)
        adc = adc_map(s0, s_b, b)
        assert adc.dtype == np.float32 and adc.shape == true.shape
        np.testing.assert_allclose(adc, true, rtol=1e-4)
    s50 = s0 * np.exp(-50 * true * 1e-6)  # a "b0" of 50 s/mm2
    np.testing.assert_allclose(adc_map(s50, s0 * np.exp(-1000 * true * 1e-6), 1000, b_low=50), true, rtol=1e-4)


def test_adc_map_guards_background_and_noise() -> None:
    b0 = np.array([[[0.0, 2.0, 1000.0, 1000.0, 1000.0, np.nan]]])
    b1000 = np.array([[[0.0, 1.0, 0.0, 1200.0, 400.0, 5.0]]])
    adc = adc_map(b0, b1000, 1000.0)
    assert np.isfinite(adc).all()
    assert adc[0, 0, 0] == 0  # air
    assert adc[0, 0, 1] == 0  # below 5 % of the bright signal: background
    assert adc[0, 0, 2] == ADC_MAX  # nothing left at high b
    assert adc[0, 0, 3] == 0  # noise made S(b) > S(0): no negative ADC
    assert adc[0, 0, 4] == pytest.approx(np.log(2.5) * 1000, rel=1e-5)
    assert adc[0, 0, 5] == 0
    with pytest.raises(ValueError, match="must exceed"):
        adc_map(b0, b1000, 0.0)


def test_core_mask_keeps_lesions_drops_specks_background_and_outside() -> None:
    adc = np.full((10, 40, 40), 800.0, dtype=np.float32)
    brain = np.zeros(adc.shape, dtype=bool)
    brain[:, 5:35, 5:35] = True
    adc[2:6, 10:20, 10:20] = 500.0  # 400 voxels: a lesion
    adc[8, 30, 30] = 450.0  # one voxel: noise
    adc[8, 25, 25] = 450.0  # another, diagonal neighbours only
    adc[9, 26, 26] = 450.0
    adc[0, 0:3, 0:3] = 300.0  # outside the brain
    adc[7, 10:15, 10:15] = 0.0  # ADC 0 (background in scanner maps) inside the brain
    result = core_mask(adc, brain, 620.0, voxel_ml=0.01, min_volume_ml=0.05)
    expected = np.zeros(adc.shape, dtype=bool)
    expected[2:6, 10:20, 10:20] = True
    np.testing.assert_array_equal(result.mask, expected)
    assert result.volume_ml == pytest.approx(4.0)
    assert core_mask(adc, brain, 620.0, voxel_ml=0.01, min_volume_ml=0.0).volume_ml == pytest.approx(4.03)
    assert core_mask(adc, brain, 620.0, voxel_ml=0.01, min_volume_ml=5.0).volume_ml == 0.0
    assert core_mask(adc, brain, 450.0, voxel_ml=0.01, min_volume_ml=0.3).volume_ml == 0.0  # strictly below the threshold


def test_core_mask_connectivity() -> None:
    """Two diagonal voxels are one 26-connected component but two 6-connected ones."""
    adc = np.full((3, 3, 3), 800.0)
    adc[0, 0, 0] = adc[1, 1, 1] = 500.0
    brain = np.ones(adc.shape, dtype=bool)
    assert core_mask(adc, brain, 620.0, voxel_ml=1.0, min_volume_ml=2.0, connectivity=3).volume_ml == 2.0
    assert core_mask(adc, brain, 620.0, voxel_ml=1.0, min_volume_ml=2.0, connectivity=1).volume_ml == 0.0


# --- phantom studies --------------------------------------------------------------------------

STROKES = (2, 12)
NO_STROKE = 3  # truth/clinical.json: hypoperfused_ml == 0


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    out = tmp_path_factory.mktemp("diffusion")
    for seed in (*STROKES, NO_STROKE):
        write_patient(seed, "mri", out, PhantomOptions())
    return {seed: out / f"SGPH{seed:08d}" for seed in (*STROKES, NO_STROKE)}


def truth_core_ml(root: Path) -> tuple[np.ndarray, float]:
    """The true core mask and its volume: voxel count times the voxel volume of the NIfTI grid."""
    core, affine = read_nifti(root / "truth" / "mr" / "core.nii.gz")
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    return core > 0, float(core.sum()) * voxel_ml


def series(root: Path, *names: str) -> dict[str, list[Path]]:
    return {name: sorted((root / "dicom" / "MR" / name).glob("*.dcm")) for name in names}


@pytest.mark.parametrize("seed", STROKES)
@pytest.mark.parametrize("kinds", [("dwi",), ("dwi", "adc")], ids=["adc-from-dwi", "forwarded-adc"])
def test_core_volume_matches_the_truth(phantoms: dict[int, Path], seed: int, kinds: tuple[str, ...]) -> None:
    root = phantoms[seed]
    truth_mask, truth_ml = truth_core_ml(root)
    findings = analyse_diffusion_core(series(root, *kinds), version=3, **THRESHOLDS)
    measured = findings.measurements["core_volume_ml"]
    assert truth_ml > 10
    assert measured == pytest.approx(truth_ml, rel=0.10), f"seed {seed}: {measured:.2f} mL vs truth {truth_ml:.2f} mL"
    mask = findings.segments[0].mask
    dice = 2 * np.sum(mask & truth_mask) / (mask.sum() + truth_mask.sum())
    assert dice > 0.85
    assert findings.qc_flags == []


def test_no_stroke_gives_no_core(phantoms: dict[int, Path]) -> None:
    root = phantoms[NO_STROKE]
    assert json.loads((root / "truth" / "clinical.json").read_text())["hypoperfused_ml"] == 0
    for kinds in (("dwi",), ("dwi", "adc")):
        assert analyse_diffusion_core(series(root, *kinds), **THRESHOLDS).measurements["core_volume_ml"] < 1.0


def test_findings_from_the_whole_study(phantoms: dict[int, Path]) -> None:
    """Given every file of the study, the DWI and ADC series are found among FLAIR and PWI."""
    root = phantoms[STROKES[0]]
    paths = sorted((root / "dicom" / "MR").rglob("*.dcm"))
    findings = analyse_diffusion_core(paths, version=2, adc_threshold=600.0, min_lesion_ml=0.5)
    adc_series = series(root, "adc")["adc"]
    assert findings.analysis == "mri-diffusion-core"
    assert findings.version == 2
    assert findings.study_uid == findings.source_images[0].StudyInstanceUID
    assert findings.geometry.shape == (20, 128, 128)
    assert len(findings.source_images) == 20
    assert {h.SeriesDescription for h in findings.source_images} == {"ADC (10^-6 mm2/s)"}
    assert len(adc_series) == 20
    for k, header in enumerate(findings.source_images):
        np.testing.assert_allclose(header.ImagePositionPatient, findings.geometry.slice_position(k), atol=1e-3)
    [segment] = findings.segments
    assert (segment.key, segment.label) == ("core", "Ischemic core")
    assert segment.mask.dtype == bool and segment.mask.shape == findings.geometry.shape
    assert findings.measurements == {"core_volume_ml": segment.volume_ml}
    assert segment.volume_ml == pytest.approx(segment.mask.sum() * findings.geometry.voxel_volume_ml)
    assert findings.parameters == {"adc_threshold": 600.0, "min_lesion_ml": 0.5}
    assert set(findings.timings_s) == {"load", "adc", "mask", "core"}


def test_findings_on_the_dwi_grid_without_adc(phantoms: dict[int, Path]) -> None:
    findings = analyse_diffusion_core(series(phantoms[STROKES[0]], "dwi"), **THRESHOLDS)
    assert [float(h.DiffusionBValue) for h in findings.source_images] == [1000.0] * 20
    z = [float(h.ImagePositionPatient[2]) for h in findings.source_images]
    assert z == sorted(z)


def test_adc_series_alone_is_flagged(phantoms: dict[int, Path]) -> None:
    root = phantoms[STROKES[1]]
    _, truth_ml = truth_core_ml(root)
    findings = analyse_diffusion_core(series(root, "adc"), **THRESHOLDS)
    assert any("brain mask from the ADC alone" in flag for flag in findings.qc_flags)
    assert findings.measurements["core_volume_ml"] == pytest.approx(truth_ml, rel=0.15)


def test_brain_mask_excludes_scalp_and_skull(phantoms: dict[int, Path]) -> None:
    from service.imaging.volumes import load_diffusion, read_datasets

    root = phantoms[STROKES[0]]
    b0 = load_diffusion(read_datasets(series(root, "dwi")["dwi"]))[0.0]
    mask = brain_mask_mr(b0.pixels, pixel_mm=b0.geometry.spacing[1:])
    labels, _ = read_nifti(root / "truth" / "mr" / "tissue_labels.nii.gz")  # 4 skull, 5 scalp
    brain, _ = read_nifti(root / "truth" / "mr" / "brain.nii.gz")
    assert not np.any(mask & (labels == 5))
    assert np.sum(mask & (labels == 4)) < 0.01 * mask.sum()  # partial-volume rim voxels only
    assert np.mean(mask[brain > 0]) > 0.99


def test_no_diffusion_series(phantoms: dict[int, Path]) -> None:
    root = phantoms[NO_STROKE]
    with pytest.raises(InputError, match=r"no DWI or ADC series in the study \(found: flair\)"):
        analyse_diffusion_core(sorted((root / "dicom" / "MR" / "flair").glob("*.dcm")), **THRESHOLDS)
    with pytest.raises(InputError, match="no DWI or ADC series"):
        analyse_diffusion_core({"flair": series(root, "flair")["flair"]}, **THRESHOLDS)


def test_wrong_study_refused(phantoms: dict[int, Path]) -> None:
    with pytest.raises(InputError, match="mixed into study 1.2.3"):
        analyse_diffusion_core(series(phantoms[NO_STROKE], "dwi"), study_uid="1.2.3", **THRESHOLDS)
