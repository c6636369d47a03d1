"""The shipped model on a CT perfusion study: `predict_core_penumbra` as the analysis will call it."""

from __future__ import annotations

import numpy as np
import pytest

from models.training.cohort import SampleSpec
from models.training.dataset import simulate
from models.training.metrics import dice
from service.analysis.ctp_perfusion import analyse_ctp_series
from service.config import Settings
from service.errors import InputError
from service.inference.ctp_core_penumbra import predict_core_penumbra
from service.inference.ctp_inputs import CTP_CONTRACT, temporal_mip
from service.perfusion.ctp import time_to_peak
from service.inference.engine import Backend, load_engine


@pytest.fixture(scope="module")
def study():  # noqa: ANN201
    """Synthetic patient 2 at 10 HU (256 x 256 x 16, 40 frames), analysed as the service does."""
    simulated = simulate(SampleSpec("icbm", 2, 10.0, "test"))
    result = analyse_ctp_series(simulated.frames, simulated.times_s, simulated.geometry)
    ttp = time_to_peak(simulated.frames, simulated.times_s, result.brain, simulated.geometry.spacing)
    return simulated, result, {**result.maps, "ttp": ttp}, temporal_mip(simulated.frames)


@pytest.fixture(scope="module")
def engine():  # noqa: ANN201
    return load_engine(Settings().models_dir / "ctp-core-penumbra.onnx", Backend.ONNXRUNTIME, contract=CTP_CONTRACT)


def test_time_to_peak_follows_the_truth(study) -> None:  # noqa: ANN001
    simulated, result, maps, _ = study
    brain = result.brain & simulated.truth.brain
    error = np.abs(maps["ttp"][brain] - simulated.truth.ttp[brain])
    assert np.median(error) < 1.0  # s; frames are 1.2-1.5 s apart


def test_the_model_finds_core_and_penumbra_inside_the_brain(study, engine) -> None:  # noqa: ANN001
    simulated, result, maps, mip = study
    found = predict_core_penumbra(engine, maps, mip, result.brain, simulated.nihss, simulated.geometry.spacing)
    assert found.nihss_used
    assert not (found.core & found.penumbra).any() and not ((found.core | found.penumbra) & ~result.brain).any()
    assert found.probabilities.shape == (16, 3, 256, 256) and np.allclose(found.probabilities.sum(axis=1), 1.0, atol=1e-5)
    truth = simulated.truth.masks
    assert dice(found.core, truth["core"]) > 0.6 and dice(found.penumbra, truth["penumbra"]) > 0.6
    unknown = predict_core_penumbra(engine, maps, mip, result.brain, None, simulated.geometry.spacing)
    assert not unknown.nihss_used and dice(unknown.core, truth["core"]) > 0.6


def test_a_full_size_matrix_is_classified_on_the_models_pixels(study, engine) -> None:  # noqa: ANN001
    simulated, result, maps, mip = study
    spacing = simulated.geometry.spacing
    found = predict_core_penumbra(engine, maps, mip, result.brain, simulated.nihss, spacing)

    def double(volume: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(volume, 2, axis=1), 2, axis=2)

    fine = predict_core_penumbra(engine, {k: double(v) for k, v in maps.items()}, double(mip), double(result.brain), simulated.nihss,
                                 (spacing[0], spacing[1] / 2, spacing[2] / 2))
    assert fine.core.shape == (16, 512, 512)
    assert np.mean(fine.core == double(found.core)) > 0.999 and np.mean(fine.penumbra == double(found.penumbra)) > 0.999


def test_voxels_the_model_was_not_trained_on_are_refused(study, engine) -> None:  # noqa: ANN001
    simulated, result, maps, mip = study
    with pytest.raises(InputError, match="trained on .* mm pixels .* this study has 2 x 2 mm pixels"):
        predict_core_penumbra(engine, maps, mip, result.brain, 10, (5.0, 2.0, 2.0))
    with pytest.raises(ValueError, match="NIHSS"):
        predict_core_penumbra(engine, maps, mip, result.brain, 50, simulated.geometry.spacing)
