"""The in-plane median within delayed tissue that the CT core threshold reads (ctp.median_within):
a core just below the threshold is found whole, and the edge between core and penumbra stays put."""

from __future__ import annotations

import numpy as np
import pytest

from service.perfusion import ctp

SPACING = (5.0, 0.9375, 0.9375)
THRESHOLD = 0.30


def _lesion(core_rcbf: float, penumbra_rcbf: float, sd: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """rCBF with noise: a delayed region (rows 20-79) whose left half is core, right half penumbra,
    in normal tissue at 1.0; returns the map, the delayed region and the true core."""
    rng = np.random.default_rng(seed)
    truth = np.ones((4, 100, 100), dtype=np.float32)
    delayed = np.zeros(truth.shape, dtype=bool)
    delayed[:, 20:80, 20:80] = True
    core = delayed.copy()
    core[:, :, 50:] = False
    truth[core] = core_rcbf
    truth[delayed & ~core] = penumbra_rcbf
    return truth + rng.normal(0.0, sd, truth.shape).astype(np.float32), delayed, core


def test_a_core_just_below_the_threshold_is_found_whole() -> None:
    measured, delayed, core = _lesion(0.27, 0.5, sd=0.05)
    before = (measured[core] < THRESHOLD).mean()
    after = (ctp.median_within(measured, delayed, SPACING, 3.0)[core] < THRESHOLD).mean()
    assert before < 0.80  # the noise alone puts a share of the core above the threshold
    assert after >= 0.95


def test_the_penumbra_beside_the_core_is_not_called_core() -> None:
    measured, delayed, core = _lesion(0.15, 0.5, sd=0.08)
    regular = ctp.median_within(measured, delayed, SPACING, 3.0)
    penumbra = delayed & ~core
    assert (regular[penumbra] < THRESHOLD).mean() < 0.01
    # The edge stays where it was: the column of penumbra next to the core is not core.
    assert (regular[:, 20:80, 50] < THRESHOLD).mean() < 0.05
    assert (regular[:, 20:80, 49] < THRESHOLD).mean() > 0.95


def test_only_the_region_is_read_and_changed() -> None:
    measured, delayed, _ = _lesion(0.2, 0.5, sd=0.05)
    regular = ctp.median_within(measured, delayed, SPACING, 5.0)
    np.testing.assert_array_equal(regular[~delayed], measured[~delayed])
    # Normal tissue at 1.0 around the region does not lift its border voxels.
    assert np.median(regular[:, 20, 20:50]) == pytest.approx(0.2, abs=0.03)


def test_a_radius_below_a_pixel_changes_nothing() -> None:
    measured, delayed, _ = _lesion(0.2, 0.5, sd=0.05)
    np.testing.assert_array_equal(ctp.median_within(measured, delayed, SPACING, 0.5), measured)
    with pytest.raises(ValueError):
        ctp.median_within(measured, delayed[0], SPACING, 3.0)
