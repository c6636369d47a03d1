"""Anatomy-guided detail (service.perfusion.anatomy) on maps whose truth is built here."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from service.perfusion.anatomy import restore_detail, temporal_mean_guide

SPACING = (5.0, 1.0, 1.0)
SHAPE = (2, 96, 96)


def _grey_fraction(seed: int = 0) -> np.ndarray:
    """Grey matter fraction varying at the scale of 1-2 voxels, as cortex and deep nuclei do."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(SHAPE), (0, 1.5, 1.5))
    return 1.0 / (1.0 + np.exp(-field / field.std() * 2.0))


def _smoothed(a: np.ndarray, sigma_mm: float) -> np.ndarray:
    return ndimage.gaussian_filter(a, (0, sigma_mm, sigma_mm), mode="nearest")


def _r(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.corrcoef(a[mask], b[mask])[0, 1])


@pytest.fixture
def tissue() -> dict[str, np.ndarray]:
    grey = _grey_fraction()
    rng = np.random.default_rng(1)
    truth = (60.0 * grey + 25.0 * (1.0 - grey)) * (1.0 + 0.1 * np.linspace(-1, 1, SHAPE[2]))  # CBF, a slow gradient too
    guide = 29.0 + 9.0 * grey + rng.normal(0.0, 0.5, SHAPE)  # unenhanced grey matter reads ~9 HU above white
    denoised = _smoothed(truth, 3.0) + rng.normal(0.0, 0.5, SHAPE)  # a map after denoising: structure gone
    return {"truth": truth, "guide": guide, "map": denoised, "brain": np.ones(SHAPE, dtype=bool)}


def test_grey_white_structure_comes_back_from_the_guide(tissue: dict[str, np.ndarray]) -> None:
    brain = tissue["brain"]
    (restored,), (gain,) = restore_detail([tissue["map"]], tissue["guide"], [brain], SPACING)
    assert gain > 0
    before, after = _r(tissue["map"], tissue["truth"], brain), _r(restored, tissue["truth"], brain)
    assert before < 0.8 and after > 0.9, (before, after)
    # The mean stays; most of the grey/white contrast the smoothing took comes back, none invented.
    grey, white = _grey_fraction() > 0.8, _grey_fraction() < 0.2

    def contrast(a: np.ndarray) -> float:
        return float(a[grey].mean() / a[white].mean())

    assert abs(restored.mean() / tissue["map"].mean() - 1.0) < 0.02
    lost = contrast(tissue["truth"]) - contrast(tissue["map"])
    assert 0.5 * lost < contrast(restored) - contrast(tissue["map"]) < lost, (contrast(tissue["map"]), contrast(restored))


def test_a_guide_that_does_not_predict_the_map_changes_nothing(tissue: dict[str, np.ndarray]) -> None:
    brain = tissue["brain"]
    inverted = 2.0 * tissue["guide"].mean() - tissue["guide"]  # brighter where flow is lower
    (restored,), (gain,) = restore_detail([tissue["map"]], inverted, [brain], SPACING)
    assert gain == 0.0
    np.testing.assert_array_equal(restored, tissue["map"])
    (flat,), (gain,) = restore_detail([tissue["map"]], np.full(SHAPE, 30.0), [brain], SPACING)
    assert gain == 0.0
    np.testing.assert_array_equal(flat, tissue["map"])


def test_nothing_is_carried_across_the_border_of_the_hypoperfusion(tissue: dict[str, np.ndarray]) -> None:
    lesion = np.zeros(SHAPE, dtype=bool)
    lesion[:, :, :48] = True
    truth = np.where(lesion, 0.2 * tissue["truth"], tissue["truth"])
    denoised = np.where(lesion, 0.2 * tissue["map"], tissue["map"])  # denoised on each side, as TIPS does
    (restored,), _ = restore_detail([denoised], tissue["guide"], [~lesion, lesion], SPACING)
    border_normal = np.zeros(SHAPE, dtype=bool)
    border_normal[:, :, 48:51] = True
    border_lesion = np.zeros(SHAPE, dtype=bool)
    border_lesion[:, :, 45:48] = True
    # Filtering across the border would pull the first millimetres of each side halfway to the other.
    assert abs(restored[border_normal].mean() / truth[border_normal].mean() - 1.0) < 0.05
    assert abs(restored[border_lesion].mean() / truth[border_lesion].mean() - 1.0) < 0.05
    assert restored[lesion].max() < truth[~lesion].mean()


def test_the_guide_is_the_smoothed_temporal_mean_inside_the_mask() -> None:
    rng = np.random.default_rng(2)
    grey = _grey_fraction()
    frames = (29.0 + 9.0 * grey)[None] + rng.normal(0.0, 10.0, (40, *SHAPE))
    mask = np.ones(SHAPE, dtype=bool)
    mask[:, :10] = False
    guide = temporal_mean_guide(frames, mask, SPACING)
    assert not guide[~mask].any()
    assert _r(guide, 29.0 + 9.0 * grey, mask) > 0.85  # 10 HU per frame, 40 frames, 1 mm smoothing


def test_bad_arguments_are_refused(tissue: dict[str, np.ndarray]) -> None:
    brain = tissue["brain"]
    with pytest.raises(ValueError, match="overlap"):
        restore_detail([tissue["map"]], tissue["guide"], [brain, brain], SPACING)
    with pytest.raises(ValueError, match="one shape"):
        restore_detail([tissue["map"]], tissue["guide"][:, :10], [brain], SPACING)
    with pytest.raises(ValueError, match="scale_mm"):
        restore_detail([tissue["map"]], tissue["guide"], [brain], SPACING, scale_mm=0.0)
