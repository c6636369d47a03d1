"""The phantom's ground truth is self-consistent: maps, masks and images tell one story."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from service.phantom.generate import write_patient
from service.phantom.haemodynamics import GammaVariate, residue_function
from service.phantom.patient import diffusion, make_patient, mr_geometry, truth_on_grid
from service.phantom.truth_files import read_nifti

from conftest import SMALL_NOISE_FREE


def read_ctp_hu(dicom_dir: Path) -> np.ndarray:
    """[time, slice, row, column] HU from one file per slice per time point."""
    items = []
    for path in dicom_dir.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        items.append((int(ds.AcquisitionNumber), float(ds.ImagePositionPatient[2]), hu))
    times = sorted({t for t, _, _ in items})
    zs = sorted({z for _, z, _ in items})
    out = np.zeros((len(times), len(zs), *items[0][2].shape))
    for t, z, hu in items:
        out[times.index(t), zs.index(z)] = hu
    return out


def reference_curve(aif: GammaVariate, times: np.ndarray, cbf: float, mtt: float, tmax: float, flow_scale: float, residue: str) -> np.ndarray:
    """C(t) = flow_scale * CBF * (AIF conv R)(t - Tmax), by brute-force convolution on a 5 ms grid."""
    dt = 0.005
    t = np.arange(0.0, times[-1] + dt, dt)
    conv = np.convolve(aif(t - tmax), residue_function(t, mtt, residue))[: len(t)] * dt
    return flow_scale * cbf * np.interp(times, t, conv)


@pytest.mark.parametrize("residue", ["exponential", "boxcar"])
def test_true_maps_convolved_with_true_aif_reproduce_noise_free_curves(tmp_path: Path, residue: str) -> None:
    out = tmp_path / residue
    write_patient(2, "ctp", out, replace(SMALL_NOISE_FREE, residue=residue))
    root = out / "SGPH00000002"
    record = json.loads((root / "truth" / "ct_perfusion.json").read_text())
    assert record["residue"] == residue
    aif = GammaVariate(**{k: record["aif"][k] for k in ("arrival", "time_to_peak", "alpha", "peak")})
    times = np.asarray(record["times_s"])
    hu = read_ctp_hu(root / "dicom" / "CT" / "ctp")
    truth = {name: read_nifti(root / "truth" / "ct" / f"{name}.nii.gz")[0] for name in ("cbf", "mtt", "tmax", "artery_fraction", "vein_fraction", "core", "penumbra")}
    tissue = (truth["cbf"] > 1) & (truth["artery_fraction"] == 0) & (truth["vein_fraction"] == 0)
    rng = np.random.default_rng(0)
    picks = [tuple(v) for v in rng.permutation(np.argwhere(tissue))[:150]]
    picks += [tuple(v) for v in np.argwhere(truth["core"] > 0)[:25]] + [tuple(v) for v in np.argwhere(truth["penumbra"] > 0)[:25]]
    assert len(picks) > 150, "the test patient must have tissue, core and penumbra in view"
    for voxel in picks:
        measured = hu[(slice(None), *voxel)] - hu[(0, *voxel)]
        expected = reference_curve(aif, times, truth["cbf"][voxel], truth["mtt"][voxel], truth["tmax"][voxel], record["flow_scale"], residue)
        expected -= expected[0]
        # Stored integers: each frame is rounded to 1 HU, so a difference is within 1 HU.
        np.testing.assert_allclose(measured, expected, atol=1.01, err_msg=f"voxel {voxel}")


def test_arterial_and_venous_curves_follow_the_recorded_aif_and_vof(small_ctp: Path) -> None:
    record = json.loads((small_ctp / "truth" / "ct_perfusion.json").read_text())
    hu = read_ctp_hu(small_ctp / "dicom" / "CT" / "ctp")
    artery = read_nifti(small_ctp / "truth" / "ct" / "artery_fraction.nii.gz")[0]
    vein = read_nifti(small_ctp / "truth" / "ct" / "vein_fraction.nii.gz")[0]
    for fraction, key in ((artery, "aif"), (vein, "vof")):
        voxel = np.unravel_index(np.argmax(fraction), fraction.shape)
        assert fraction[voxel] > 0.3, f"no {key} vessel in view"
        enhancement = hu[(slice(None), *voxel)] - hu[(0, *voxel)]
        curve = np.asarray(record[key]["values"])
        # A purely vascular voxel would follow the curve exactly; partial volume scales it.
        assert np.corrcoef(enhancement, curve)[0, 1] > 0.98
        assert enhancement.max() >= 0.3 * fraction[voxel] * curve.max()


def test_hypoperfused_region_is_exactly_core_plus_penumbra(small_ctp: Path) -> None:
    load = lambda name: read_nifti(small_ctp / "truth" / "ct" / f"{name}.nii.gz")[0]  # noqa: E731
    tmax, brain, core, penumbra = load("tmax"), load("brain") > 0, load("core") > 0, load("penumbra") > 0
    assert core.sum() > 0 and penumbra.sum() > 0
    np.testing.assert_array_equal((tmax > 6.0) & brain, core | penumbra)
    assert not (core & penumbra).any()


def test_zones_nest_and_core_is_severely_hypoperfused() -> None:
    patient = make_patient(2, SMALL_NOISE_FREE)
    truth = truth_on_grid(patient, mr_geometry(patient))
    m = truth.masks
    assert m["core"].sum() > 0
    assert not (m["core"] & ~m["final_reperfused"]).any()
    assert not (m["final_reperfused"] & ~m["final_not_reperfused"]).any()
    assert not (m["final_not_reperfused"] & ~m["hypoperfused"]).any()
    # Without reperfusion the core grows into most of the penumbra.
    grown = (m["final_not_reperfused"] & m["penumbra"]).sum() / m["penumbra"].sum()
    assert grown > 0.5
    # Core: CBF below 30 % of the contralateral normal tissue, low CBV.
    contralateral = _hemisphere(truth, patient, opposite=True) & truth.brain & ~m["oligaemia"]
    assert np.median(truth.cbf[m["core"]]) < 0.3 * np.mean(truth.cbf[contralateral])
    assert np.median(truth.cbv[m["core"]]) < 0.8 * np.median(truth.cbv[contralateral])
    assert truth.tmax[m["penumbra"]].min() > 6.0


def _hemisphere(truth, patient, opposite: bool) -> np.ndarray:
    centres = truth.geometry.voxel_centres()[0]
    x_mni = patient.pose.lps_to_mni(centres)[..., 0]
    left = x_mni < 0
    lesion_left = patient.lesion.side == "left"
    return left != lesion_left if opposite else left == lesion_left


def test_adc_below_620_in_brain_is_exactly_the_core() -> None:
    patient = make_patient(2, SMALL_NOISE_FREE)
    truth = truth_on_grid(patient, mr_geometry(patient))
    images = diffusion(patient, truth)
    np.testing.assert_array_equal((images["adc_true"] < 620) & truth.brain, truth.masks["core"])
    # b1000 = b0 exp(-b ADC) in the noise-free model: the measured ADC is close in the core.
    core_measured = images["adc"][truth.masks["core"]]
    assert abs(np.median(core_measured) - np.median(images["adc_true"][truth.masks["core"]])) < 60


def test_truth_nifti_geometry_matches_the_dicom(small_ctp: Path) -> None:
    _, affine = read_nifti(small_ctp / "truth" / "ct" / "cbf.nii.gz")
    first = pydicom.dcmread(small_ctp / "dicom" / "CT" / "ctp" / "IM00001.dcm", stop_before_pixels=True)
    # Voxel (column 0, row 0, slice 0) in RAS is ImagePositionPatient with x and y negated.
    lps = np.asarray(first.ImagePositionPatient, dtype=float)
    np.testing.assert_allclose(affine[:3, 3], lps * [-1, -1, 1], atol=1e-3)
    np.testing.assert_allclose(np.abs(np.diag(affine)[:2]), [float(v) for v in first.PixelSpacing], atol=1e-4)


@pytest.mark.parametrize("grid", ["ct", "mr"])
def test_core_is_cbf_below_30_percent_of_the_contralateral_normal_mean(grid: str) -> None:
    """The clinical CT definition, on both scan grids: within the hypoperfused brain, core is
    exactly CBF < 0.3 x the contralateral normal-tissue mean; the penumbra never below it."""
    from service.phantom.patient import CORE_RCBF, ct_geometry

    patient = make_patient(2, SMALL_NOISE_FREE)
    geometry = ct_geometry(patient) if grid == "ct" else mr_geometry(patient)
    truth = truth_on_grid(patient, geometry)
    reference = truth.cbf_reference
    m = truth.masks
    low = truth.cbf < CORE_RCBF * reference
    np.testing.assert_array_equal(low & m["hypoperfused"], m["core"])
    assert truth.cbf[m["penumbra"]].min() >= CORE_RCBF * reference * 0.999
    # Realistic: core CBF about 20 % of normal; the reference is the contralateral normal mean.
    assert 0.12 < truth.cbf[m["core"]].mean() / reference < 0.28
    contralateral = _hemisphere(truth, patient, opposite=True) & truth.brain & ~m["oligaemia"] & ~m["hypoperfused"]
    assert truth.cbf[contralateral].mean() == pytest.approx(reference, rel=0.15)
