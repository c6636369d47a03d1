"""Seed 001's final-infarct networks: shapes, the weighted Dice loss, the mismatch baseline, the
seed's metrics, a few steps that learn, and the ONNX export agreeing with torch. Never a full
training (that is `python -m models.training train-final-infarct`, see README)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (extra 'train')")

from models.export import PARITY_TOLERANCE, export_onnx, parity  # noqa: E402
from models.networks.late_fusion import BACKGROUND, LESION, LateFusionNet  # noqa: E402
from models.training.final_infarct import (  # noqa: E402
    FinalStudy, FinalTrainConfig, consistency, evaluation_cohort, mismatch_baseline, predict_lesion, train,
)
from models.training.losses import LESION_WEIGHT, weighted_dice_loss  # noqa: E402
from models.training.metrics import precision, recall, volumetric_similarity, voxel_auc  # noqa: E402
from service.errors import InputError  # noqa: E402
from service.inference.final_infarct import including_core  # noqa: E402
from service.inference.final_infarct_inputs import Scenario, contract  # noqa: E402


def _study(seed: int, size: int = 32, slices: int = 4) -> FinalStudy:
    """A toy study whose final infarcts are read off its input: a disc of high 'Tmax' (channel 2),
    its centre of low 'ADC' (channel 1) the core; reperfused final = core, not reperfused = disc."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    brain = np.zeros((slices, size, size), dtype=bool)
    brain[:, 2:-2, 2:-2] = True
    inputs = rng.normal(0, 0.05, (slices, 5, size, size)).astype(np.float32) + 1.0
    disc = np.zeros_like(brain)
    core = np.zeros_like(brain)
    for z in range(slices):
        cy, cx, r = rng.integers(10, size - 10), rng.integers(10, size - 10), rng.integers(4, 8)
        disc[z] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        core[z] = (yy - cy) ** 2 + (xx - cx) ** 2 <= (r // 2) ** 2
    inputs[:, 2][disc] += 1.5
    inputs[:, 1][core] -= 0.6
    inputs *= brain[:, None]
    truths = {Scenario.REPERFUSED: core & brain, Scenario.NOT_REPERFUSED: disc & brain}
    return FinalStudy(f"toy-{seed}", inputs, brain, truths, core, disc & ~core, (5.0, 1.8, 1.8))


def test_the_network_gives_three_class_probabilities_and_background_outside_the_brain() -> None:
    network = LateFusionNet(widths=(4, 8)).eval()
    maps, brain = torch.randn(2, 5, 32, 48), torch.zeros(2, 1, 32, 48)
    brain[:, :, 8:24, 8:40] = 1
    with torch.no_grad():
        out = network(maps, brain)
    assert out.shape == (2, 3, 32, 48)
    assert torch.allclose(out.sum(dim=1), torch.ones(2, 32, 48), atol=1e-5)
    assert torch.all(out[:, BACKGROUND][brain[:, 0] == 0] == 1.0)
    assert network.size_multiple == 4


def test_the_weighted_dice_loss_is_zero_when_right_and_weighs_a_missed_lesion_most() -> None:
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, 2:6, 2:6] = LESION
    labels[0, 0, :] = 1
    perfect = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    weights = torch.tensor([1.0, 1.0, LESION_WEIGHT])
    assert float(weighted_dice_loss(perfect, labels, weights, smooth=0.0)) == pytest.approx(0.0, abs=1e-6)
    missed_lesion = perfect.clone()
    missed_lesion[0, :, 2:6, 2:6] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    missed_healthy = perfect.clone()
    missed_healthy[0, :, 0, :] = torch.tensor([1.0, 0.0, 0.0])[:, None]
    assert float(weighted_dice_loss(missed_lesion, labels, weights)) > 3 * float(weighted_dice_loss(missed_healthy, labels, weights))


def test_the_mismatch_baseline_is_the_core_if_reperfused_and_core_plus_penumbra_if_not() -> None:
    core = np.zeros((2, 4, 4), dtype=bool)
    core[0, 1, 1] = True
    penumbra = np.zeros_like(core)
    penumbra[0, 1, 2] = penumbra[1, 0, 0] = True
    assert np.array_equal(mismatch_baseline(core, penumbra, Scenario.REPERFUSED), core)
    assert np.array_equal(mismatch_baseline(core, penumbra, Scenario.NOT_REPERFUSED), core | penumbra)


def test_a_prediction_with_the_measured_core_keeps_both_and_refuses_another_grid() -> None:
    prediction = np.zeros((2, 8, 8), dtype=bool)
    prediction[0, :3, :3] = True
    core = np.zeros_like(prediction)
    core[1, 4:, 4:] = True
    both = including_core(prediction, core)
    assert both.sum() == prediction.sum() + core.sum() and (both & prediction).sum() == prediction.sum()
    assert np.array_equal(including_core(prediction, None), prediction) and including_core(prediction, None) is not prediction
    with pytest.raises(InputError, match="grid"):
        including_core(prediction, core[:, :4])


def test_a_shipped_pair_is_evaluated_on_its_test_patients_and_on_new_ones_it_never_saw() -> None:
    from models.training.cohort import CohortPlan

    families = ("icbm", "geometric-graded", "geometric-uniform")
    plan = CohortPlan(families, "geometric-uniform", (10.0,), 4, 1, 2)
    specs = evaluation_cohort({**plan.seeds(), "training": 1}, families, "geometric-uniform", 5, 10.0)
    trained = set(plan.seeds()["train"])
    tested = [s for s in specs if s.split in ("test", "held-out")]
    assert len(tested) == 5 * len(families) and not {s.seed for s in tested} & (trained | set(plan.seeds()["validation"]))
    assert {s.seed for s in tested} >= set(plan.seeds()["test"]) | set(plan.seeds()["held-out"])
    assert {s.family for s in specs if s.split == "held-out"} == {"geometric-uniform"}
    assert sorted(s.seed for s in specs if s.split == "validation") == plan.seeds()["validation"]
    assert len({s.key for s in specs}) == len(specs)


def test_the_seed_metrics_say_what_they_should() -> None:
    truth = np.zeros(10, dtype=bool)
    truth[:4] = True
    predicted = np.zeros(10, dtype=bool)
    predicted[2:8] = True  # 2 of 4 found, 4 false positives
    assert precision(predicted, truth) == pytest.approx(2 / 6)
    assert recall(predicted, truth) == pytest.approx(2 / 4)
    assert volumetric_similarity(predicted, truth) == pytest.approx(1 - 2 / 10)
    assert voxel_auc(truth.astype(float), truth) == pytest.approx(1.0)
    assert voxel_auc(1.0 - truth, truth) == pytest.approx(0.0)
    assert voxel_auc(np.ones(10), truth) == pytest.approx(0.5)
    assert voxel_auc(np.ones(10), np.zeros(10, dtype=bool)) is None
    assert consistency(predicted, predicted | truth) == 1.0
    assert consistency(truth, predicted) == pytest.approx(0.5)


def test_a_few_training_steps_learn_each_scenario(tmp_path: Path) -> None:
    studies = [_study(seed) for seed in range(6)]
    config = FinalTrainConfig(epochs=3, steps_per_epoch=15, batch=6, widths=(4, 8), learning_rate=5e-3, dropout=0.0)
    for scenario in Scenario:
        network, history = train(studies[:5], studies[5:], scenario, config, tmp_path / scenario.value)
        losses = [r["train_loss"] for r in history.epochs]
        assert losses[-1] < losses[0]
        assert history.epochs[history.best_epoch - 1]["validation_dice"] > 0.3
        assert (tmp_path / scenario.value / "best.pt").is_file()
        assert predict_lesion(network, studies[5]).shape == studies[5].brain.shape


def test_the_onnx_export_agrees_with_torch(tmp_path: Path) -> None:
    network = LateFusionNet(widths=(4, 8)).eval()
    feeds = contract("mri", Scenario.REPERFUSED)
    path = export_onnx(network, tmp_path / "final.onnx", feeds)
    rng = np.random.default_rng(0)
    inputs = {"maps": rng.normal(size=(2, 5, 32, 40)).astype(np.float32), "brain": np.ones((2, 1, 32, 40), dtype=np.float32)}
    assert parity(network, path, inputs, feeds) <= PARITY_TOLERANCE
