"""The phantom's physiological and clinical models behave as documented."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import fftconvolve

from service.imaging.geometry import Geometry
from service.phantom.clinical import MRS_CUTPOINTS, draw_clinical, outcome_logit, roc_auc, sigmoid
from service.phantom.haemodynamics import FLOW_SCALE, GammaVariate, residue_function, tissue_curves, venous_outflow
from service.phantom.lesion import LesionPlan


def test_gamma_variate_peaks_where_and_as_high_as_asked() -> None:
    aif = GammaVariate(arrival=6.0, time_to_peak=5.0, alpha=3.0, peak=400.0)
    t = np.arange(0, 60, 0.01)
    assert t[np.argmax(aif(t))] == pytest.approx(11.0, abs=0.01)
    assert aif(t).max() == pytest.approx(400.0, rel=1e-6)
    assert aif(np.array([0.0, 5.9])).tolist() == [0.0, 0.0]
    assert aif.area() == pytest.approx(np.trapezoid(aif(np.arange(0, 300, 0.001)), dx=0.001), rel=1e-6)


def test_venous_outflow_is_later_wider_and_conserves_area() -> None:
    aif = GammaVariate(6.0, 5.0, 3.0, 400.0)
    vof = venous_outflow(aif, lag=5.0, widening=1.3)
    t = np.arange(0, 120, 0.01)
    assert t[np.argmax(vof(t))] > t[np.argmax(aif(t))] + 5
    assert vof.area() == pytest.approx(aif.area(), rel=1e-9)


@pytest.mark.parametrize("residue", ["exponential", "boxcar"])
def test_tissue_curves_match_brute_force_convolution(residue: str) -> None:
    aif = GammaVariate(8.0, 6.0, 3.5, 400.0)
    times = np.linspace(0, 55, 37)
    cbf, mtt, delay = np.array([60.0, 25.0, 12.0]), np.array([4.0, 5.0, 10.0]), np.array([0.4, 1.3, 9.7])
    curves, ttp = tissue_curves(times, aif, cbf, mtt, delay, residue)
    dt = 0.001
    t = np.arange(0, 60, dt)
    for v in range(3):
        conv = fftconvolve(aif(t - delay[v]), residue_function(t, mtt[v], residue))[: len(t)] * dt * FLOW_SCALE * cbf[v]
        np.testing.assert_allclose(curves[:, v], np.interp(times, t, conv), atol=0.01 * conv.max())
        assert ttp[v] == pytest.approx(t[np.argmax(conv)], abs=0.11)
    # Area under the tissue curve is CBV scaled: integral C = FLOW_SCALE * CBF * MTT * integral AIF.
    assert curves[:, 0].max() > curves[:, 1].max() > curves[:, 2].max()


def test_rejects_unknown_residue() -> None:
    with pytest.raises(ValueError, match="residue"):
        tissue_curves(np.arange(3.0), GammaVariate(1, 1, 1, 1), np.ones(1), np.ones(1), np.zeros(1), "gaussian")


def test_lesion_volumes_cover_the_clinical_ranges() -> None:
    plans = [LesionPlan.random(np.random.default_rng(s)) for s in range(400)]
    core = np.array([p.volumes_ml["core"] for p in plans])
    hypo = np.array([p.volumes_ml["hypoperfused"] for p in plans])
    assert core.max() <= 150 and hypo.max() <= 250
    assert (core <= hypo).all()
    assert 0.05 < np.mean(hypo == 0) < 0.25, "some patients have no stroke"
    assert core.max() > 100 and hypo.max() > 200 and np.percentile(hypo[hypo > 0], 10) < 40
    for p in plans:
        v = p.volumes_ml
        assert v["core"] <= v["final_reperfused"] <= v["final_not_reperfused"] <= v["hypoperfused"] <= v["oligaemia"]


def test_nihss_rises_with_lesion_volume() -> None:
    small = [draw_clinical(np.random.default_rng(s), {"core": 2, "hypoperfused": 15, "final_reperfused": 3, "final_not_reperfused": 12}, "right").nihss for s in range(200)]
    large = [draw_clinical(np.random.default_rng(s), {"core": 90, "hypoperfused": 220, "final_reperfused": 100, "final_not_reperfused": 200}, "right").nihss for s in range(200)]
    assert np.mean(large) > np.mean(small) + 10
    assert max(large) <= 42 and min(small) >= 0


def test_mrs_follows_the_documented_proportional_odds_model() -> None:
    volumes = {"core": 30, "hypoperfused": 120, "final_reperfused": 35, "final_not_reperfused": 100}
    draws = [draw_clinical(np.random.default_rng(s), volumes, "left") for s in range(3000)]
    poor = np.array([d.mrs_90d >= 3 for d in draws])
    p = np.array([d.p_poor_outcome for d in draws])
    # Observed rate of mRS 3-6 agrees with the model's mean probability (3 standard errors).
    assert abs(poor.mean() - p.mean()) < 3 * np.sqrt(p.mean() * (1 - p.mean()) / len(p))
    for d in draws[:50]:
        assert d.p_poor_outcome == pytest.approx(float(sigmoid(outcome_logit(d.age, d.nihss, d.final_infarct_ml, d.sich, d.reperfused))))
    assert {d.mrs_90d for d in draws} <= set(range(len(MRS_CUTPOINTS) + 1))
    reperfused = [d for d in draws if d.reperfused]
    assert all(d.final_infarct_ml == 35 for d in reperfused)


def test_roc_auc() -> None:
    assert roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert roc_auc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert roc_auc(np.array([0.5, 0.5, 0.5]), np.array([0, 1, 1])) == 0.5
    assert np.isnan(roc_auc(np.array([0.1, 0.2]), np.array([1, 1])))


def test_geometry_affines_agree() -> None:
    g = Geometry(shape=(4, 10, 12), spacing=(5.0, 0.8, 0.9), origin=(-10.0, 20.0, 30.0))
    voxel = np.array([2, 3, 7, 1.0])  # slice, row, column
    lps = g.affine @ voxel
    np.testing.assert_allclose(lps[:3], [-10 + 7 * 0.9, 20 + 3 * 0.8, 30 + 2 * 5])
    ras = g.nifti_affine @ np.array([7, 3, 2, 1.0])  # column, row, slice
    np.testing.assert_allclose(ras[:3], lps[:3] * [-1, -1, 1])
    assert g.voxel_volume_ml == pytest.approx(5 * 0.8 * 0.9 / 1000)
    with pytest.raises(ValueError, match="orthonormal"):
        Geometry((1, 1, 1), (1, 1, 1), (0, 0, 0), row_direction=(1, 0, 0), column_direction=(1, 0, 0))
