"""Model files on inference engines: cards checked at load, backends chosen, parity on the bundled input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from service.config import Settings
from service.errors import InputError, ModelError
from service.inference.card import card_path, read_card
from service.inference.ctp_inputs import CTP_CONTRACT
from service.inference.engine import Backend, choose_backend, load_engine, shipped_models
from service.inference.parity import bundled_parity

SHIPPED = Settings().models_dir / "ctp-core-penumbra.onnx"


@pytest.fixture
def copied(tmp_path: Path) -> Path:
    """The shipped model's files in a folder of their own, to be spoilt."""
    card = read_card(card_path(SHIPPED))
    for ref in (card.files.onnx, card.files.exported_program, card.files.test_input):
        shutil.copy(SHIPPED.parent / ref.name, tmp_path / ref.name)
    shutil.copy(card_path(SHIPPED), card_path(tmp_path / SHIPPED.name))
    return tmp_path / SHIPPED.name


def _edit_card(model: Path, edit) -> None:  # noqa: ANN001
    path = card_path(model)
    card = json.loads(path.read_text())
    edit(card)
    path.write_text(json.dumps(card))


def test_the_shipped_model_is_found_with_its_card_and_is_for_research_only() -> None:
    assert SHIPPED in shipped_models(SHIPPED.parent)
    card = read_card(card_path(SHIPPED))
    assert "not for diagnosis" in card.intended_use.lower()
    assert card.files.onnx.bytes < 8_000_000  # a few MB
    assert [c.name for c in card.inputs.channels] == ["cbf", "cbv", "ttp", "tmax", "mip"]
    assert card.outputs.classes == ("healthy", "penumbra", "core")
    assert card.training.command.startswith("python -m models.training train")


def test_onnxruntime_reproduces_the_reference_probabilities_of_the_bundled_input() -> None:
    engine = load_engine(SHIPPED, Backend.ONNXRUNTIME, contract=CTP_CONTRACT)
    parity = bundled_parity(engine, SHIPPED.parent)
    assert parity.max_difference <= 1e-4 and parity.holds
    assert engine.identity.backend.startswith("onnxruntime (") and engine.identity.sha256 == read_card(card_path(SHIPPED)).files.onnx.sha256


def test_torch_and_onnxruntime_agree_within_1e4() -> None:
    pytest.importorskip("torch", reason="torch is not installed (extra 'train')")
    with np.load(SHIPPED.with_name("ctp-core-penumbra.test.npz")) as data:
        inputs = {t.name: data[t.name] for t in CTP_CONTRACT.tensors}
    torch_engine = load_engine(SHIPPED, Backend.TORCH, contract=CTP_CONTRACT)
    ort_engine = load_engine(SHIPPED, Backend.ONNXRUNTIME, contract=CTP_CONTRACT)
    assert float(np.abs(torch_engine.predict(inputs) - ort_engine.predict(inputs)).max()) <= 1e-4
    assert bundled_parity(torch_engine, SHIPPED.parent).holds


def test_tensorrt_builds_a_cached_fp16_engine_that_matches(tmp_path: Path) -> None:
    pytest.importorskip("tensorrt", reason="TensorRT cannot be installed here: no NVIDIA GPU, and its wheels fetch NVIDIA's libraries")
    engine = load_engine(SHIPPED, Backend.TENSORRT, contract=CTP_CONTRACT, cache_dir=tmp_path)
    assert bundled_parity(engine, SHIPPED.parent).holds
    assert len(list(tmp_path.glob("*.plan"))) == 1
    engine.close()
    again = load_engine(SHIPPED, Backend.TENSORRT, contract=CTP_CONTRACT, cache_dir=tmp_path)  # from the cache
    assert bundled_parity(again, SHIPPED.parent).holds


def test_the_tensorrt_plan_is_keyed_by_model_tensorrt_and_gpu() -> None:
    from service.inference.tensorrt_backend import plan_name, profile

    sha = "ab" * 32
    names = {plan_name("m", sha, "10.3.0", "NVIDIA H100 80GB HBM3", (9, 0)), plan_name("m", "cd" * 32, "10.3.0", "NVIDIA H100 80GB HBM3", (9, 0)),
             plan_name("m", sha, "10.4.0", "NVIDIA H100 80GB HBM3", (9, 0)), plan_name("m", sha, "10.3.0", "NVIDIA L4", (8, 9))}
    assert len(names) == 4 and all(n.endswith("-fp16.plan") and "/" not in n for n in names)
    shapes = profile(read_card(card_path(SHIPPED)))
    low, opt, high = shapes["maps"]
    assert low[0] == 1 and opt[2:] == (256, 256) and high[2] >= 512 and low[1] == opt[1] == high[1] == 5


def test_auto_takes_the_best_backend_here_and_says_why() -> None:
    card = read_card(card_path(SHIPPED))
    backend, reason = choose_backend(Backend.AUTO, card)
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert backend is Backend.ONNXRUNTIME
        assert "tensorrt" in reason.lower() and "onnxruntime" in reason
    if backend is not Backend.TENSORRT:
        with pytest.raises(ModelError, match="tensorrt was asked for but cannot run here"):
            choose_backend("tensorrt", card)


def test_a_file_that_does_not_match_its_card_is_refused(copied: Path) -> None:
    data = bytearray(copied.read_bytes())
    data[-10] ^= 0xFF
    copied.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="does not match its model card: sha256"):
        load_engine(copied, Backend.ONNXRUNTIME, contract=CTP_CONTRACT)


def test_a_card_that_does_not_match_what_the_service_feeds_is_refused(copied: Path) -> None:
    _edit_card(copied, lambda c: c["inputs"]["channels"].insert(0, c["inputs"]["channels"].pop(1)))  # CBV first
    with pytest.raises(ModelError, match="input channel 0 is cbv .* but the service feeds cbf"):
        load_engine(copied, Backend.ONNXRUNTIME, contract=CTP_CONTRACT)


def test_a_card_with_another_normalisation_is_refused(copied: Path) -> None:
    _edit_card(copied, lambda c: c["inputs"]["channels"][3].update(scale=1.0))  # Tmax in s instead of s / 10
    with pytest.raises(ModelError, match="input channel 3 is tmax .*scale 1,.* but the service feeds tmax .*scale 10"):
        load_engine(copied, Backend.ONNXRUNTIME, contract=CTP_CONTRACT)


def test_a_card_with_other_classes_is_refused(copied: Path) -> None:
    _edit_card(copied, lambda c: c["outputs"].update(classes=["healthy", "core", "penumbra"]))
    with pytest.raises(ModelError, match="gives classes"):
        load_engine(copied, Backend.ONNXRUNTIME, contract=CTP_CONTRACT)


def test_a_card_that_does_not_say_research_only_is_invalid(copied: Path) -> None:
    _edit_card(copied, lambda c: c.update(intended_use="Clinical decision support."))
    with pytest.raises(ModelError, match="not valid.*intended_use"):
        load_engine(copied, Backend.ONNXRUNTIME)


def test_a_model_without_a_card_is_refused(copied: Path) -> None:
    card_path(copied).unlink()
    with pytest.raises(ModelError, match="cannot be read"):
        load_engine(copied, Backend.ONNXRUNTIME)
    assert shipped_models(copied.parent) == []


def test_inputs_are_checked_and_each_run_is_counted() -> None:
    engine = load_engine(SHIPPED, Backend.ONNXRUNTIME, contract=CTP_CONTRACT)
    maps, brain, clinical = np.zeros((2, 5, 48, 64), np.float32), np.ones((2, 1, 48, 64), np.float32), np.zeros((2, 2), np.float32)
    labels = {"model": engine.card.name, "backend": "onnxruntime"}
    before = REGISTRY.get_sample_value("strokegate_inference_seconds_count", labels) or 0.0
    probabilities = engine.predict({"maps": maps, "brain": brain, "clinical": clinical})
    assert probabilities.shape == (2, 3, 48, 64)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert REGISTRY.get_sample_value("strokegate_inference_seconds_count", labels) == before + 1
    with pytest.raises(InputError, match="multiples of 16"):
        engine.predict({"maps": maps[..., :40], "brain": brain[..., :40], "clinical": clinical})
    with pytest.raises(ValueError, match="takes inputs"):
        engine.predict({"maps": maps, "brain": brain})
    with pytest.raises(ValueError, match="disagree on batch"):
        engine.predict({"maps": maps, "brain": brain[:1], "clinical": clinical})


def test_outside_the_brain_the_model_says_healthy() -> None:
    engine = load_engine(SHIPPED, Backend.ONNXRUNTIME, contract=CTP_CONTRACT)
    rng = np.random.default_rng(0)
    brain = np.zeros((1, 1, 64, 64), np.float32)
    brain[..., 16:48, 16:48] = 1
    probabilities = engine.predict({"maps": rng.normal(size=(1, 5, 64, 64)).astype(np.float32), "brain": brain,
                                    "clinical": np.array([[0.5, 1.0]], np.float32)})
    assert np.all(probabilities[0, 0][brain[0, 0] == 0] == 1.0)
