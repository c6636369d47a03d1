"""The 90-day outcome models: the phantom's admission ceiling, seed 000's fusion (Algorithm 1),
seed 004's radiomics features, inputs and card, and that the training learns and exports."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from service.analysis.outcome_fusion import FusionParameters, fuse, youden_threshold
from service.analysis.outcome_radiomics import REGIONS, SHAPE, feature_names, region_features
from service.errors import ModelError
from service.inference.outcome_card import LinearScore, read_outcome_card
from service.inference.outcome_inputs import lesion_slice, network_maps, slab_25d, triplets
from service.phantom.clinical import admission_ceiling, admission_probability, draw_clinical, roc_auc

VOLUMES = {"core": 30.0, "hypoperfused": 120.0, "final_reperfused": 35.0, "final_not_reperfused": 100.0}


def test_admission_probability_is_the_outcome_rate_given_admission_facts() -> None:
    """Patients who share age, NIHSS and lesion have, on average, the admission probability of a poor
    outcome: it integrates reperfusion and sICH out, it does not know them."""
    draws = [draw_clinical(np.random.default_rng(s), VOLUMES, "left") for s in range(6000)]
    by_key: dict[tuple[int, int], list] = {}
    for d in draws:
        by_key.setdefault((d.age, d.nihss), []).append(d)
    observed = np.array([d.mrs_90d >= 3 for d in draws], dtype=float)
    expected = np.array([d.p_poor_outcome_admission for d in draws])
    assert abs(observed.mean() - expected.mean()) < 3 * np.sqrt(expected.mean() * (1 - expected.mean()) / len(draws))
    for group in by_key.values():  # reperfusion and sICH vary within a group; the admission probability does not
        assert len({round(d.p_poor_outcome_admission, 12) for d in group}) == 1


def test_admission_probability_rises_with_nihss_age_and_lesion() -> None:
    base = admission_probability(70, 10, VOLUMES)
    assert admission_probability(70, 20, VOLUMES) > base
    assert admission_probability(85, 10, VOLUMES) > base
    bigger = {**VOLUMES, "final_not_reperfused": 200.0, "final_reperfused": 60.0}
    assert admission_probability(70, 10, bigger) > base
    assert 0 < admission_probability(70, 2, dict.fromkeys(VOLUMES, 0.0)) < base


def test_admission_ceiling_lies_below_the_true_probability_auc() -> None:
    """Knowing reperfusion and sICH (the true probability) discriminates better than anything at admission."""
    rng = np.random.default_rng(3)
    records = []
    for s in range(3000):
        hypo = rng.uniform(10, 250)
        core = hypo * rng.uniform(0, 0.6)
        volumes = {"core": core, "hypoperfused": hypo, "final_reperfused": core + 0.1 * (hypo - core),
                   "final_not_reperfused": core + 0.8 * (hypo - core)}
        records.append(draw_clinical(np.random.default_rng(s), volumes, "right"))
    ceiling = admission_ceiling(records)
    best = roc_auc(np.array([r.p_poor_outcome for r in records]), np.array([r.mrs_90d >= 3 for r in records]))
    assert 0.6 < ceiling < best


def test_fusion_reproduces_the_papers_worked_example() -> None:
    """Seed 000, Table I: patient 023 (NIHSS 8, good outcome) has module probabilities whose mean (0.49)
    is above the threshold 0.40; the NIHSS weighting brings it below, to 'good'."""
    parameters = FusionParameters(thresholds=(0.40,) * 5, nihss_low=0.0, nihss_high=42.0)
    p = np.array([[0.68, 0.75, 0.74, 0.07, 0.24]])
    assert p.mean() > 0.40
    fused = fuse(p, np.array([8.0]), parameters)[0]
    c = 8 / 42
    assert fused == pytest.approx((c * (0.68 + 0.75 + 0.74) + (1 - c) * (0.07 + 0.24)) / (3 * c + 2 * (1 - c)))
    assert fused < 0.40
    assert fuse(p, np.array([30.0]), parameters)[0] > p.mean()  # a severe deficit trusts the 'poor' votes
    assert fuse(p, None, parameters)[0] == pytest.approx(p.mean())
    # c = 0 and every module votes poor: no weight left, the plain mean
    assert fuse(np.array([[0.9, 0.8, 0.7, 0.6, 0.5]]), np.array([0.0]), parameters)[0] == pytest.approx(0.7)
    with pytest.raises(ValueError, match="probabilities"):
        fuse(np.ones((2, 3)), None, parameters)


def test_nihss_weighted_fusion_beats_the_plain_average() -> None:
    """Modules that see the lesion but not the deficit: weighting by the NIHSS adds what they miss."""
    rng = np.random.default_rng(0)
    n = 2000
    lesion, deficit = rng.normal(size=n), rng.normal(size=n)
    nihss = np.clip(np.round(12 + 6 * deficit + 2 * lesion), 0, 42)
    poor = rng.random(n) < 1 / (1 + np.exp(-(1.2 * lesion + 1.2 * deficit)))
    modules = 1 / (1 + np.exp(-(lesion[:, None] + rng.normal(scale=1.0, size=(n, 5)))))
    train, test = slice(0, 1000), slice(1000, n)
    thresholds = tuple(youden_threshold(modules[train, i], poor[train]) for i in range(5))
    parameters = FusionParameters(thresholds, float(nihss[train].min()), float(nihss[train].max()))
    weighted = roc_auc(fuse(modules[test], nihss[test], parameters), poor[test])
    plain = roc_auc(modules[test].mean(axis=1), poor[test])
    assert weighted > plain + 0.02


def test_youden_threshold_separates_and_refuses_one_class() -> None:
    assert youden_threshold(np.array([0.1, 0.2, 0.7, 0.9]), np.array([0, 0, 1, 1])) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="both outcomes"):
        youden_threshold(np.array([0.1, 0.2]), np.array([1, 1]))


def _study(radius: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    z, y, x = np.mgrid[0:12, 0:32, 0:32]
    brain = np.ones((12, 32, 32), dtype=bool)
    d = np.sqrt((z - 6) ** 2 + (y - 16) ** 2 + (x - 12) ** 2)
    hypo, core = d < radius, d < radius / 2
    rng = np.random.default_rng(1)
    maps = {"adc": np.where(core, 500.0, 800.0) + rng.normal(0, 20, d.shape), "tmax": np.where(hypo, 9.0, 2.0),
            "cbf": np.where(hypo, 20.0, 50.0) + rng.normal(0, 2, d.shape)}
    return maps, brain, core, hypo


def test_radiomics_features_measure_the_regions() -> None:
    maps, brain, core, hypo = _study(6)
    names = feature_names(tuple(maps))
    values = region_features(maps, brain, core, hypo, (2.0, 1.0, 1.0))
    assert len(values) == len(names) and np.isfinite(values).all()
    feature = dict(zip(names, values, strict=True))
    assert feature["hypoperfused.shape.volume_ml"] == pytest.approx(hypo.sum() * 2.0 / 1000)
    assert feature["core.shape.volume_ml"] == pytest.approx(core.sum() * 2.0 / 1000)
    assert 0.5 < feature["hypoperfused.shape.sphericity"] <= 1.05
    assert feature["core.adc.mean"] < feature["penumbra.adc.mean"]  # ADC over its brain median: low in the core
    assert feature["hypoperfused.tmax.mean"] == pytest.approx(9.0)
    larger = dict(zip(names, region_features(*_study(9), (2.0, 1.0, 1.0)), strict=True))
    assert larger["hypoperfused.shape.volume_ml"] > feature["hypoperfused.shape.volume_ml"]
    empty = region_features(maps, brain, np.zeros_like(core), np.zeros_like(hypo), (2.0, 1.0, 1.0))
    assert not empty[: len(SHAPE)].any() and len(REGIONS) == 3


def test_centred_inputs_show_the_lesion_and_not_the_size_of_the_head() -> None:
    """Seed 000's modules read each ratio map as its departure from the brain median: two heads of
    different size without a lesion give the same (all-zero) input, a low-ADC lesion reads below 0
    and the maps' plain inputs still fill the brain (seed 004's ResNet keeps them)."""
    def head(radius: int, lesion: bool) -> tuple[dict[str, np.ndarray], np.ndarray]:
        zz, yy, xx = np.mgrid[:6, :64, :64]
        brain = (yy - 32) ** 2 + (xx - 32) ** 2 < radius**2
        adc = np.where(brain, 800.0, 0.0)
        if lesion:
            adc[2:4, 28:36, 28:36] = 450.0
        tmax = np.zeros_like(adc)  # Tmax reads 0 s in normal tissue
        return {"adc": adc, "dwi": adc, "tmax": tmax, "cbf": adc, "cbv": adc}, brain

    small, large = (network_maps(*head(r, False), centred=True) for r in (18, 28))
    assert not small.any() and not large.any()
    assert network_maps(*head(28, False)).sum() > network_maps(*head(18, False)).sum() > 0
    fed = network_maps(*head(28, True), centred=True)
    assert fed[0].min() < -0.4 and (fed[0] < 0).sum() == 2 * 8 * 8 and fed.max() <= 3.0


def test_network_inputs_have_the_documented_shapes() -> None:
    maps, brain, core, hypo = _study(6)
    maps = {**maps, "dwi": np.where(core, 1.5, 1.0), "cbv": np.ones_like(maps["cbf"])}
    fed = network_maps(maps, brain)
    assert fed.shape == (5, 12, 64, 64) and fed.dtype == np.float32 and fed.max() <= 4.0
    two = np.zeros_like(hypo)
    two[4, :5, :5], two[8, :10, :10] = True, True
    assert lesion_slice(two, np.zeros_like(core)) == 8
    assert lesion_slice(np.zeros_like(hypo), np.zeros_like(core)) == 6  # no lesion: the middle slice
    slab = slab_25d(fed, 11)  # near the top: slices 9, 11, 11 (clamped), map by map
    assert slab.shape == (15, 64, 64)
    np.testing.assert_array_equal(slab[0], fed[0, 9])
    np.testing.assert_array_equal(slab[2], fed[0, 11])
    np.testing.assert_array_equal(slab[13], fed[4, 11])
    assert triplets(fed[0]).shape == (10, 3, 64, 64)
    with pytest.raises(ValueError, match="at least 3"):
        triplets(fed[0, :2])


def test_linear_score_and_card_validation(tmp_path) -> None:
    score = LinearScore(names=("nihss", "age"), mean=(10.0, 70.0), scale=(5.0, 10.0), coefficients=(1.0, 0.5), intercept=-0.2)
    assert score.score({"nihss": 15.0, "age": 80.0})[0] == pytest.approx(-0.2 + 1.0 + 0.5)
    with pytest.raises(ValueError):
        LinearScore(names=("a",), mean=(0.0,), scale=(0.0,), coefficients=(1.0,), intercept=0.0)
    path = tmp_path / "outcome.card.json"
    path.write_text(json.dumps({"name": "x"}))
    with pytest.raises(ModelError, match="not valid"):
        read_outcome_card(path)
    with pytest.raises(ModelError, match="no outcome model card"):
        read_outcome_card(tmp_path / "missing.card.json")


def test_a_few_training_steps_learn_and_onnx_matches_torch(tmp_path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    from models.training.outcome_command import export_deep
    from models.training.outcome_crd import DeepConfig, deep_scores, fit_lasso, train_deep

    rng = np.random.default_rng(0)
    n = 48
    poor = (np.arange(n) % 2).astype(int)
    slabs = rng.normal(0, 0.2, (n, 15, 64, 64)).astype(np.float32)
    slabs[poor == 1, 6:9, 20:40, 10:30] += 1.5  # a large Tmax lesion in the poor patients
    losses = []
    network, history = train_deep(slabs, poor, DeepConfig(epochs=6, batch=16, learning_rate=3e-3), lambda e, loss: losses.append(loss))
    assert losses[-1] < losses[0]
    assert roc_auc(deep_scores(network, slabs), poor) > 0.9
    path, difference = export_deep(network, slabs[:3], tmp_path / "deep.onnx")
    assert difference <= 1e-4
    assert path.stat().st_size < 5e6

    x = rng.normal(size=(200, 30))
    y = (x[:, 3] - x[:, 7] + 0.3 * rng.normal(size=200) > 0).astype(int)
    lasso = fit_lasso(x, y, [f"f{i}" for i in range(30)])
    assert {"f3", "f7"} <= set(lasso.names) and len(lasso.names) < 30


def _mri_study(radius: float, nihss: int | None):
    from datetime import datetime

    from service.analysis.outcome_model import OutcomeInputs
    from service.findings import NihssSource, NihssUsed

    z, y, x = np.mgrid[0:20, 0:64, 0:64]
    brain = ((z - 10) / 9.0) ** 2 + ((y - 32) / 26.0) ** 2 + ((x - 32) / 22.0) ** 2 < 1
    d = np.sqrt(((z - 10) * 1.6) ** 2 + (y - 30) ** 2 + (x - 20) ** 2)
    hypo, core = brain & (d < radius), brain & (d < radius * 0.5)
    rng = np.random.default_rng(2)
    maps = {"adc": np.where(core, 520.0, 800.0), "dwi": np.where(core, 900.0, 600.0), "tmax": np.where(hypo, 9.0, 1.0),
            "cbf": np.where(hypo, 18.0, 45.0), "cbv": np.where(core, 2.0, 4.0)}
    maps = {k: np.where(brain, v * (1 + 0.05 * rng.standard_normal(v.shape)), 0.0) for k, v in maps.items()}
    used = None if nihss is None else NihssUsed(nihss, NihssSource.HL7, "MSG1", datetime(2026, 12, 4, 12), datetime(2026, 12, 4, 12, 5))
    return OutcomeInputs(maps, brain, core, hypo, (6.0, 3.6, 3.6), 72.0, True, used)


def test_shipped_outcome_model_follows_nihss_and_lesion() -> None:
    """The shipped CRD model (ONNX Runtime + card): a higher NIHSS or a larger lesion raises the
    probability; without an NIHSS it says it used imaging only."""
    pytest.importorskip("onnxruntime")
    from service.analysis.outcome_model import DEFAULT_CARD, CrdOutcomeModel

    model = CrdOutcomeModel(DEFAULT_CARD)
    mild, severe = model.predict(_mri_study(10, 14)), model.predict(_mri_study(10, 22))
    assert 0 < mild.probability < severe.probability < 1
    assert "NIHSS 14" in mild.inputs_used and model.info.name == "outcome-crd"
    assert model.predict(_mri_study(16, 14)).probability > mild.probability
    blind = model.predict(_mri_study(10, None))
    assert blind.inputs_used == "NIHSS not available: imaging only" and 0 < blind.probability < 1


def test_outcome_model_refuses_a_network_that_is_not_its_cards(tmp_path) -> None:
    from service.analysis.outcome_model import DEFAULT_CARD, CrdOutcomeModel

    card = json.loads(DEFAULT_CARD.read_text())
    (tmp_path / card["deep"]["file"]).write_bytes(b"not the network")
    (tmp_path / "outcome-crd.card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="does not match its card"):
        CrdOutcomeModel(tmp_path / "outcome-crd.card.json")


def test_fusion_recalibration_keeps_the_order_and_is_off_by_default() -> None:
    p = np.array([[0.2, 0.3, 0.4, 0.5, 0.6], [0.6, 0.7, 0.8, 0.7, 0.9]])
    plain = FusionParameters((0.5,) * 5, 0.0, 42.0)
    tuned = FusionParameters((0.5,) * 5, 0.0, 42.0, (0.3, 0.7))
    raw, recalibrated = fuse(p, np.array([8.0, 20.0]), plain), fuse(p, np.array([8.0, 20.0]), tuned)
    assert np.argsort(raw).tolist() == np.argsort(recalibrated).tolist()
    logit = np.log(raw / (1 - raw))
    np.testing.assert_allclose(recalibrated, 1 / (1 + np.exp(-(0.3 + 0.7 * logit))))
    np.testing.assert_array_equal(fuse(p, None, plain), p.mean(axis=1))


def test_the_bootstrap_interval_of_the_slope_covers_a_calibrated_model_and_narrows_with_patients() -> None:
    from models.training.outcome_metrics import slope_interval

    rng = np.random.default_rng(5)
    p = rng.uniform(0.05, 0.95, 400)
    poor = rng.random(400) < p  # calibrated by construction: slope 1
    low, high = slope_interval(p, poor, rounds=200)
    assert low < 1.0 < high
    small_low, small_high = slope_interval(p[:40], poor[:40], rounds=200)
    assert small_high - small_low > high - low


def test_shipped_cnn_lstm_model_recomputes_a_late_nihss_exactly() -> None:
    """Seed 000 through ONNX Runtime: a late NIHSS re-fuses the stored module probabilities to what a
    fresh prediction with that NIHSS gives; without an NIHSS it says imaging only."""
    pytest.importorskip("onnxruntime")
    from service.analysis.outcome_cnn_lstm import DEFAULT_FUSION_CARD, CnnLstmOutcomeModel, fusion_card, recompute
    from service.findings import FusionOutcomeRecord

    model = CnnLstmOutcomeModel(DEFAULT_FUSION_CARD)
    first = model.predict(_mri_study(10, 14))
    assert 0 < first.probability < 1 and [name for name, _ in first.modules] == ["adc", "dwi", "tmax", "cbf", "cbv"]
    stored = FusionOutcomeRecord.from_summary(first.summary(), None)
    for nihss in (22, None):
        fresh = model.predict(_mri_study(10, nihss))
        again = recompute(fusion_card(), stored, fresh.nihss)
        assert again.probability == pytest.approx(fresh.probability, abs=1e-9) and again.nihss == fresh.nihss
    assert model.predict(_mri_study(10, None)).inputs_used.startswith("NIHSS not available: imaging only")
    study = _mri_study(10, 14)  # a study of 8 slices (6 triplets), not the 20 of training
    short = dataclasses.replace(study, maps={k: v[6:14] for k, v in study.maps.items()}, brain=study.brain[6:14],
                                core=study.core[6:14], hypoperfused=study.hypoperfused[6:14])
    assert 0 < model.predict(short).probability < 1


def test_cnn_lstm_model_refuses_a_module_that_is_not_its_cards(tmp_path) -> None:
    from service.analysis.outcome_cnn_lstm import DEFAULT_FUSION_CARD, CnnLstmOutcomeModel

    card = json.loads(DEFAULT_FUSION_CARD.read_text())
    for module in card["modules"]:
        (tmp_path / module["file"]).write_bytes((DEFAULT_FUSION_CARD.parent / module["file"]).read_bytes())
    (tmp_path / card["modules"][2]["file"]).write_bytes(b"not the network")
    (tmp_path / "outcome-cnn-lstm.card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="does not match its card"):
        CnnLstmOutcomeModel(tmp_path / "outcome-cnn-lstm.card.json")
    card["recalibration"] = [0.0, -1.0]
    (tmp_path / "outcome-cnn-lstm.card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="not valid"):
        CnnLstmOutcomeModel(tmp_path / "outcome-cnn-lstm.card.json")


def test_cnn_lstm_modules_learn_and_export_with_any_number_of_triplets(tmp_path) -> None:
    """Two modules exported one after the other (the training exports five in one process) both take
    a study of any slice count, as ONNX Runtime runs them, and match torch."""
    pytest.importorskip("torch")
    import onnxruntime

    from models.training.outcome_cnn_lstm import ModuleConfig, export_module, module_probabilities, train_module

    rng = np.random.default_rng(0)
    poor = (np.arange(24) % 2).astype(int)
    x = rng.normal(0, 0.2, (24, 8, 3, 64, 64)).astype(np.float32)
    x[poor == 1, :, :, 20:40, 10:30] += 1.5  # a lesion in the poor patients
    network, losses = train_module(x, poor, ModuleConfig(epochs=4, batch=8, learning_rate=3e-3))
    assert losses[-1] < losses[0] and roc_auc(module_probabilities(network, x), poor) > 0.9
    for name in ("first", "second"):
        path = tmp_path / f"{name}.onnx"
        assert export_module(network, x[:2], path) < 1e-4
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for triplets_count in (1, 6, 30):
            assert session.run(["logit"], {"triplets": np.zeros((1, triplets_count, 3, 64, 64), np.float32)})[0].shape == (1,)
