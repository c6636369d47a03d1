"""MRI of another pixel size than the final-infarct networks were trained on is resampled to the
card's pixel size and predicted, instead of refused; slices of another thickness still are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage.transform import resize

from service.errors import InputError
from service.inference.card import Normalisation
from service.inference.engine import Backend, load_engine
from service.inference.final_infarct import predict_final_infarct, trained_pixel_mm
from service.inference.final_infarct_inputs import Scenario, contract

WEIGHTS = Path(__file__).parents[2] / "models" / "weights"


@pytest.fixture(scope="module")
def engine():  # noqa: ANN201
    return load_engine(WEIGHTS / "mri-final-infarct-not-reperfused.onnx", Backend.ONNXRUNTIME,
                       contract=contract("mri", Scenario.NOT_REPERFUSED))


def _study(engine) -> tuple[dict[str, np.ndarray], np.ndarray]:  # noqa: ANN001
    """The bundled test input (two slices of a test patient with a large final infarct) as the
    volumes the service would give: the scaled channels back in their units."""
    bundled = np.load(WEIGHTS / "mri-final-infarct-not-reperfused.test.npz")
    maps, brain = bundled["maps"], bundled["brain"][:, 0] > 0.5
    volumes = {}
    for index, channel in enumerate(engine.card.inputs.channels):
        scale = channel.scale if channel.normalisation is Normalisation.SCALE else 1.0
        volumes[channel.name] = maps[:, index] * scale
    return volumes, brain


def test_finer_pixels_are_resampled_to_the_trained_size_and_give_the_same_prediction(engine) -> None:  # noqa: ANN001
    volumes, brain = _study(engine)
    pixel = trained_pixel_mm(engine.card)
    native = predict_final_infarct(engine, volumes, brain, (6.0, pixel, pixel))
    assert native.resampled_from_mm is None and native.mask.sum() > 100

    z, h, w = brain.shape  # the same patient on pixels half the size
    fine = {name: resize(v, (z, 2 * h, 2 * w), order=1, preserve_range=True) for name, v in volumes.items()}
    fine_brain = resize(brain.astype(float), (z, 2 * h, 2 * w), order=0, preserve_range=True) > 0.5
    found = predict_final_infarct(engine, fine, fine_brain, (6.0, pixel / 2, pixel / 2))
    assert found.mask.shape == fine_brain.shape and not (found.mask & ~fine_brain).any()
    assert found.resampled_from_mm == pytest.approx((pixel / 2, pixel / 2))
    back = resize(found.mask.astype(float), (z, h, w), order=1, preserve_range=True) >= 0.5
    overlap = 2 * (back & native.mask).sum() / (back.sum() + native.mask.sum())
    print(f"Dice of the resampled prediction with the native one: {overlap:.3f}")
    assert overlap >= 0.9, overlap


def test_slices_of_another_thickness_are_still_refused(engine) -> None:  # noqa: ANN001
    volumes, brain = _study(engine)
    pixel = trained_pixel_mm(engine.card)
    with pytest.raises(InputError, match="slices"):
        predict_final_infarct(engine, volumes, brain, (2.0, pixel, pixel))
