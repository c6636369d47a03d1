"""Training the CT perfusion core/penumbra model: the dataset is what the service computes, the
loss and metrics say what they should, a few steps learn, and the export agrees with torch.
Never a full training (that is `python -m models.training train`, about an hour)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (extra 'train')")

from models.export import PARITY_TOLERANCE, export_onnx, onnx_forward, parity  # noqa: E402
from models.training.cohort import FAMILIES, CohortPlan, SampleSpec  # noqa: E402
from models.training.dataset import ANALYSIS_SOURCES, DATASET_VERSION, analysis_fingerprint, build, load, sample_path, simulate  # noqa: E402
from models.training.evaluate import Summary, acceptance  # noqa: E402
from models.training.losses import focal_tversky  # noqa: E402
from models.training.core_penumbra import CropSampler, Study, TrainConfig, augment, new_network, predict_study, train  # noqa: E402
from models.training.metrics import dice, hausdorff_95, volume_difference_ml  # noqa: E402
import service  # noqa: E402
from service.analysis.ctp_perfusion import CtpParameters, analyse_ctp_series  # noqa: E402
from service.imaging.perfusion_series import load_ctp  # noqa: E402
from service.phantom import families as phantom_families  # noqa: E402
from service.phantom.generate import write_patient  # noqa: E402
from service.phantom.patient import PhantomOptions  # noqa: E402


def _small(noise_hu: float) -> PhantomOptions:
    return PhantomOptions(ct_matrix=96, ct_slices=8, ct_frames=20, noise_hu=noise_hu)


@pytest.fixture
def small_family(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(FAMILIES, "small", _small)
    return "small"


def test_simulated_arrays_give_the_maps_the_dicom_path_gives(tmp_path: Path, small_family: str) -> None:
    simulated = simulate(SampleSpec(small_family, 2, 10.0, "train"))
    write_patient(2, "ctp", tmp_path, _small(10.0))
    series = load_ctp(sorted((tmp_path / "SGPH00000002" / "dicom" / "CT" / "ctp").glob("*.dcm")))
    assert np.array_equal(simulated.frames, series.frames)
    assert np.allclose(simulated.times_s, series.times_s, atol=1e-5)
    direct = analyse_ctp_series(simulated.frames, simulated.times_s, simulated.geometry)
    read = analyse_ctp_series(series.frames, series.times_s, series.geometry)
    for name in ("brain", "core", "hypoperfused"):
        assert np.array_equal(getattr(direct, name), getattr(read, name)), name
    for name, volume in direct.maps.items():
        assert np.allclose(volume, read.maps[name], atol=1e-3), name


def test_focal_tversky_is_zero_when_right_and_weighs_misses_above_false_alarms() -> None:
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, 2:6, 2:6] = 2
    brain = torch.ones(1, 1, 8, 8)
    right = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    assert float(focal_tversky(right, labels, brain)) == pytest.approx(0.0, abs=1e-6)
    missed, extra = right.clone(), right.clone()
    missed[0, :, 2, 2:6] = torch.tensor([1.0, 0.0, 0.0])[:, None]  # 4 core voxels called healthy
    extra[0, :, 0, 0:4] = torch.tensor([0.0, 0.0, 1.0])[:, None]  # 4 healthy voxels called core
    assert float(focal_tversky(missed, labels, brain)) > float(focal_tversky(extra, labels, brain)) > 0


def test_metrics() -> None:
    a = np.zeros((3, 20, 20), bool)
    a[1, 5:10, 5:10] = True
    b = np.roll(a, 3, axis=2)
    assert dice(a, a) == 1.0 and dice(a, np.zeros_like(a)) == 0.0 and dice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert dice(a, b) == pytest.approx(2 * 10 / 50)
    assert hausdorff_95(a, b, (5.0, 1.0, 1.0)) == pytest.approx(3.0)
    assert hausdorff_95(a, np.zeros_like(a), (5.0, 1.0, 1.0)) is None
    assert volume_difference_ml(a, a[:, :, ::-1] & False, 0.5) == pytest.approx(12.5)


def test_splits_keep_patients_and_the_held_out_family_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(FAMILIES, "other", _small)
    plan = CohortPlan(("icbm", "other"), "other", (5.0, 10.0, 20.0), train=5, validation=2, test=3)
    seeds = plan.seeds()
    assert not set(seeds["train"]) & set(seeds["validation"]) and not set(seeds["train"]) & set(seeds["test"])
    held_out = [s for s in plan.samples() if s.split == "held-out"]
    assert {s.family for s in held_out} == {"other"} and len(held_out) == 3 * 3
    assert {s.family for s in plan.samples() if s.split in ("train", "validation")} == {"icbm"}
    with pytest.raises(ValueError, match="no phantom family"):
        CohortPlan(("nope",), None, (10.0,), 1, 1, 1).samples()


def test_a_few_training_steps_learn_and_the_export_agrees_with_torch(tmp_path: Path, small_family: str) -> None:
    specs = [SampleSpec(small_family, 2, 10.0, "train"), SampleSpec(small_family, 3, 10.0, "validation")]
    paths = build(specs, tmp_path / "data")
    assert len(paths) == 2 and all(p.is_file() for p in paths.values())
    studies = []
    for spec, path in paths.items():
        arrays = load(path)
        assert arrays["inputs"].shape == (8, 5, 96, 96)
        assert arrays["labels"].max() == 2 or spec.seed != 2  # patient 2 has a core
        studies.append(Study(spec.key, arrays.pop("inputs"), arrays.pop("brain"), arrays.pop("labels"), int(arrays.pop("nihss")), arrays))
    config = TrainConfig(epochs=2, steps_per_epoch=2, batch=2, crop=32, widths=(4, 8), seed=1)
    network, history = train(studies[:1], studies[1:], config, tmp_path / "run")
    assert [r["epoch"] for r in history.epochs] == [1, 2] and (tmp_path / "run" / "best.pt").is_file()
    assert all(np.isfinite(r["train_loss"]) and 0 <= r["validation_dice_core"] <= 1 for r in history.epochs)

    # the same steps on one batch lower its loss: the gradients reach every part of the network
    sampler = CropSampler(studies[:1], config)
    (maps, brain, clinical), labels, _ = sampler.batch()
    fresh = new_network(config)
    optimiser = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss = focal_tversky(fresh(maps, brain, clinical), labels, brain)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]

    onnx_path = export_onnx(network, tmp_path / "small.onnx")
    study = studies[1]
    inputs = {"maps": study.inputs[2:5], "brain": study.brain[2:5, None].astype(np.float32),
              "clinical": np.array([[0.2, 1.0], [0.0, 0.0], [0.9, 1.0]], np.float32)}
    assert parity(network, onnx_path, inputs) <= PARITY_TOLERANCE
    on_onnx = predict_study(network, study, forward=onnx_forward(onnx_path))  # how the evaluation scores the shipped file
    assert np.abs(on_onnx - predict_study(network, study)).max() <= PARITY_TOLERANCE


def test_augmentation_moves_the_truth_with_the_maps_and_leaves_outside_the_brain_empty() -> None:
    # a lesion in the top half of the crop: the map's value marks it, so after any flip the labels must follow it
    maps = np.zeros((5, 32, 32), np.float32)
    brain = np.zeros((32, 32), bool)
    brain[4:28, 4:28] = True
    labels = np.zeros((32, 32), np.uint8)
    labels[6:12, 8:20] = 2
    maps[:, brain] = 1.0
    maps[:, labels == 2] = 0.2
    config = TrainConfig(augment=True, intensity_scale=0.05, noise_sd=0.01)
    rng = np.random.default_rng(0)
    flipped = 0
    for _ in range(20):
        m, b, l = augment(maps, brain, labels, rng, config)
        assert m.dtype == np.float32 and m.shape == maps.shape and b.shape == brain.shape == l.shape
        assert np.all(m[:, ~b] == 0.0)  # no noise outside the brain
        assert (l == 2).sum() == (labels == 2).sum() and b.sum() == brain.sum()
        assert np.all(m[:, l == 2] < 0.4) and np.all(m[:, b & (l == 0)] > 0.8)  # the lesion's maps stay on its labels
        assert 0.2 * 0.95 - 0.06 < m[0, l == 2].mean() < 0.2 * 1.05 + 0.06
        flipped += bool(l[20:26, 8:20].all())
    assert 0 < flipped < 20  # flipped up-down some of the time, not always
    plain = CropSampler([Study("s", maps[None], brain[None], labels[None], 5)], TrainConfig(batch=4, crop=32))
    assert not plain.config.augment  # augmentation is asked for, never on by default


def test_the_same_seed_gives_the_same_weights(tmp_path: Path, small_family: str) -> None:
    paths = build([SampleSpec(small_family, 2, 10.0, "train")], tmp_path / "data")
    arrays = load(next(iter(paths.values())))
    study = Study("s", arrays.pop("inputs"), arrays.pop("brain"), arrays.pop("labels"), int(arrays.pop("nihss")), arrays)
    config = TrainConfig(epochs=1, steps_per_epoch=3, batch=2, crop=32, widths=(4, 8), seed=5)
    first, _ = train([study], [], config, tmp_path / "a")
    second, _ = train([study], [], config, tmp_path / "b")
    other, _ = train([study], [], TrainConfig(epochs=1, steps_per_epoch=3, batch=2, crop=32, widths=(4, 8), seed=6), tmp_path / "c")
    a, b, c = first.state_dict(), second.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_the_cohort_draws_the_phantoms_own_families() -> None:
    """One list of families: the training cohort's are service.phantom.families', held-out one included."""
    assert list(FAMILIES) == list(phantom_families.FAMILIES)
    plan = CohortPlan(tuple(FAMILIES), phantom_families.held_out_family(), (10.0,), train=1, validation=1, test=1)
    assert {s.family for s in plan.samples() if s.split in ("train", "validation")} == set(phantom_families.tuning_families())


def test_cached_studies_are_keyed_by_the_analysis_that_made_them(tmp_path: Path) -> None:
    root = Path(service.__file__).parent
    copy = tmp_path / "service"
    for name in ANALYSIS_SOURCES:
        source = root / name
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, copy / name)
    assert analysis_fingerprint(root=copy) == analysis_fingerprint()
    assert analysis_fingerprint(CtpParameters(core_rcbf=0.25)) != analysis_fingerprint()
    edited = shutil.copytree(copy, tmp_path / "edited" / "service")
    changed = edited / "perfusion" / "ctp.py"
    changed.write_text(changed.read_text() + "\n# changed\n")
    assert analysis_fingerprint(root=edited) != analysis_fingerprint()
    assert sample_path(tmp_path, SampleSpec("icbm", 1, 10.0, "test")).parent.name == f"v{DATASET_VERSION}-{analysis_fingerprint()}"


def test_the_acceptance_compares_the_model_with_the_threshold_per_family_at_10_hu() -> None:
    def rows(split: str, family: str, noise: float, core: tuple[float, float], penumbra: tuple[float, float]) -> list[Summary]:
        return [Summary(split, family, noise, method, cls, 3, value, 2.0, 1.0)
                for cls, values in (("core", core), ("penumbra", penumbra)) for method, value in zip(("model", "threshold"), values)]

    summaries = (rows("test", "icbm", 10.0, (0.90, 0.80), (0.80, 0.81)) + rows("held-out", "geo", 10.0, (0.84, 0.80), (0.90, 0.80))
                 + rows("test", "icbm", 20.0, (0.50, 0.80), (0.10, 0.80)) + rows("test", "varied", 10.0, (0.90, 0.80), (0.70, 0.75)))
    checks = {(c.split, c.family): c for c in acceptance(summaries)}
    assert set(checks) == {("test", "icbm"), ("test", "varied"), ("held-out", "geo")}
    assert checks["test", "icbm"].holds and checks["test", "icbm"].core_margin == pytest.approx(0.10)
    assert not checks["held-out", "geo"].holds  # core only 0.04 above
    assert not checks["test", "varied"].holds  # penumbra 0.05 below
