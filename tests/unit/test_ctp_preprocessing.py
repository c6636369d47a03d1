"""CT perfusion preprocessing on small phantoms: motion correction, baseline, brain mask,
concentration, denoising and the quality flags."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from service.errors import InputError
from service.perfusion import ctp
from service.perfusion.motion import MotionResult, correct_motion, rigid_matrix
from service.phantom.anatomy import LABELS
from service.phantom.families import Variation
from service.phantom.patient import PerfusionSeries, PhantomOptions, Truth, ct_geometry, ct_perfusion, make_patient, truth_on_grid

SMALL = PhantomOptions(ct_matrix=128, ct_slices=8, ct_frames=30, noise_hu=10.0)
SEED = 2


@dataclasses.dataclass
class Acquired:
    series: PerfusionSeries
    frames: np.ndarray  # [T, Z, Y, X] float32 HU

    @property
    def truth(self) -> Truth:
        return self.series.truth

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.series.geometry.spacing

    @property
    def frames_before_arrival(self) -> int:
        return int(np.count_nonzero(self.series.times <= self.series.aif.arrival))


@pytest.fixture(scope="module")
def acquire():
    """Acquire patient SEED with options changed from SMALL; one patient draw and truth shared."""
    patient = make_patient(SEED, SMALL)
    truth = truth_on_grid(patient, ct_geometry(patient))
    cache: dict[tuple, Acquired] = {}

    def run(**changes: object) -> Acquired:
        key = tuple(sorted(changes.items()))
        if key not in cache:
            variant = dataclasses.replace(patient, options=dataclasses.replace(SMALL, **changes))
            series = ct_perfusion(variant, truth)
            cache[key] = Acquired(series, np.stack(list(series.frames)))
        return cache[key]

    return run


@pytest.fixture(scope="module")
def noisy(acquire) -> Acquired:
    return acquire()


@pytest.fixture(scope="module")
def clean(acquire) -> Acquired:
    return acquire(noise_hu=0.0)


@pytest.fixture(scope="module")
def moved(acquire) -> Acquired:
    return acquire(motion_mm=3.0)


@pytest.fixture(scope="module")
def moved_corrected(moved) -> MotionResult:
    return correct_motion(moved.frames, moved.spacing)


@pytest.fixture(scope="module")
def noisy_mask(noisy) -> np.ndarray:
    n = ctp.baseline_frames(noisy.frames, noisy.series.times)
    return ctp.brain_mask_ct(noisy.frames, noisy.spacing, n)


def _residual_mm(acq: Acquired, estimated: np.ndarray) -> np.ndarray:
    """Mean residual displacement (mm) of brain voxels per frame: true motion composed with the estimate.

    The phantom samples frame k of the reference at ``A_k v`` (voxel indices); the correction
    samples the frame at ``B_k v``; the corrected frame is the reference at ``A_k B_k v``.
    """
    points = np.argwhere(acq.truth.brain).astype(float)
    homogeneous = np.c_[points, np.ones(len(points))].T
    spacing = np.asarray(acq.spacing)[:, None]
    out = []
    for k in range(len(acq.series.motion)):
        moved = _true_sampling(acq, k) @ estimated[k] @ homogeneous
        out.append(np.linalg.norm((moved - homogeneous)[:3] * spacing, axis=0).mean())
    return np.asarray(out)


def _true_sampling(acq: Acquired, k: int) -> np.ndarray:
    """Voxel-index matrix with which the phantom sampled its reference to make frame ``k``."""
    geometry = acq.series.geometry
    to_lps = geometry.affine
    centre = (to_lps @ np.r_[(np.asarray(geometry.shape) - 1) / 2, 1])[:3]
    motion = acq.series.motion[k]
    rigid = np.eye(4)
    rigid[:3, :3] = Rotation.from_euler("xyz", motion["rotation_deg"], degrees=True).as_matrix()
    rigid[:3, 3] = centre - rigid[:3, :3] @ centre + np.asarray(motion["translation_mm"])
    return np.linalg.inv(to_lps) @ np.linalg.inv(rigid) @ to_lps


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.count_nonzero(a & b)) / float(np.count_nonzero(a) + np.count_nonzero(b))


# --- motion ---


def test_motion_corrected_below_one_mm(moved: Acquired, moved_corrected: MotionResult) -> None:
    before = _residual_mm(moved, np.repeat(np.eye(4)[None], len(moved.frames), axis=0))
    after = _residual_mm(moved, moved_corrected.matrices)
    assert before[1:].mean() > 2.0  # the phantom did move
    assert after.mean() < 1.0
    assert after.max() < 1.0
    assert moved_corrected.frames.shape == moved.frames.shape
    assert moved_corrected.frames.dtype == np.float32
    assert moved_corrected.translation_mm.shape == (len(moved.frames), 3)
    assert moved_corrected.rotation_deg.shape == (len(moved.frames), 3)


def test_motion_matrices_match_reported_parameters(moved: Acquired, moved_corrected: MotionResult) -> None:
    spacing = np.asarray(moved.spacing)
    to_mm = np.eye(4)
    to_mm[:3, :3] = np.diag(spacing)
    to_mm[:3, 3] = -spacing * (np.asarray(moved.frames.shape[1:]) - 1) / 2
    k = 5
    expected = np.linalg.inv(to_mm) @ rigid_matrix(moved_corrected.translation_mm[k], moved_corrected.rotation_deg[k]) @ to_mm
    np.testing.assert_allclose(moved_corrected.matrices[k], expected, atol=1e-9)
    # The phantom translates (x, y, z) LPS; the array axes are (slice, row, column) = (z, y, x).
    true = np.asarray(moved.series.motion[k]["translation_mm"])[::-1]
    assert np.abs(moved_corrected.translation_mm[k] - true).max() < 1.0


def test_motion_corrected_frames_align_with_the_reference(acquire, clean: Acquired) -> None:
    moved = acquire(noise_hu=0.0, motion_mm=3.0)
    head = clean.truth.labels != LABELS["air"]
    frames = moved.frames[:4]  # before contrast arrives: the unmoved series' frames are the target
    corrected = correct_motion(frames, moved.spacing).frames
    # Trilinear resampling twice (phantom, correction) across 5 mm slices blurs the 1000 HU skull
    # edges: even the exact inverse motion leaves tens of HU there. Compare with that floor.
    exact = [np.linalg.inv(_true_sampling(moved, k)) for k in range(1, 4)]
    floor = np.stack([ndimage.affine_transform(f, m[:3, :3], m[:3, 3], order=1, mode="nearest") for f, m in zip(frames[1:], exact)])
    error_before = np.abs(frames[1:] - clean.frames[1:4])[:, head].mean()
    error_after = np.abs(corrected[1:] - clean.frames[1:4])[:, head].mean()
    error_floor = np.abs(floor - clean.frames[1:4])[:, head].mean()
    assert error_after < 0.6 * error_before
    assert error_after < 1.1 * error_floor


def test_motion_flag(moved_corrected: MotionResult) -> None:
    assert 3.0 < moved_corrected.max_displacement_mm < ctp.EXCESSIVE_MOTION_MM
    assert np.all(moved_corrected.similarity > ctp.MIN_SIMILARITY)
    assert ctp.excessive_motion(moved_corrected.max_displacement_mm, moved_corrected.similarity) is None
    assert "excessive motion" in ctp.excessive_motion(25.0)
    assert "did not register" in ctp.excessive_motion(2.0, [1.0, 0.99, 0.3])


def test_unmoved_series_estimates_no_motion(noisy: Acquired) -> None:
    result = correct_motion(noisy.frames, noisy.spacing)
    assert result.max_displacement_mm < 0.1
    assert np.abs(result.translation_mm).max() < 0.05
    assert np.abs(result.rotation_deg).max() < 0.05
    assert result.reference_index == 0


def test_motion_argument_errors(noisy: Acquired) -> None:
    with pytest.raises(ValueError, match="T, Z, Y, X"):
        correct_motion(noisy.frames[0], noisy.spacing)
    with pytest.raises(ValueError, match="spacing"):
        correct_motion(noisy.frames, (5.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="reference frame"):
        correct_motion(noisy.frames, noisy.spacing, reference=99)
    with pytest.raises(ValueError, match="reference image shape"):
        correct_motion(noisy.frames, noisy.spacing, reference=np.zeros((2, 2, 2)))


# --- baseline ---


@pytest.mark.parametrize("variant", [{}, {"noise_hu": 0.0}, {"noise_hu": 20.0}, {"truncated_bolus": True}])
def test_baseline_ends_at_arterial_arrival(acquire, variant: dict) -> None:
    acq = acquire(**variant)
    n = ctp.baseline_frames(acq.frames, acq.series.times)
    assert abs(n - acq.frames_before_arrival) <= 1


def test_baseline_from_a_curve(clean: Acquired) -> None:
    curve = clean.series.aif(clean.series.times) + 40.0
    n = ctp.baseline_frames(curve, clean.series.times)
    assert abs(n - clean.frames_before_arrival) <= 1


def test_contrast_in_first_frame_is_an_input_error(noisy: Acquired) -> None:
    peak = int(np.argmax(noisy.series.aif(noisy.series.times)))
    times = noisy.series.times[peak:] - noisy.series.times[peak]
    with pytest.raises(InputError, match="no baseline before contrast arrival"):
        ctp.baseline_frames(noisy.frames[peak:], times)


def test_no_contrast_is_an_input_error(noisy: Acquired) -> None:
    static = np.repeat(noisy.frames[:1], 12, axis=0) + np.random.default_rng(0).normal(0, 10, (12, *noisy.frames.shape[1:])).astype(np.float32)
    with pytest.raises(InputError, match="no contrast arrival"):
        ctp.baseline_frames(static, np.arange(12.0))


def test_baseline_argument_errors(noisy: Acquired) -> None:
    with pytest.raises(ValueError, match="times"):
        ctp.baseline_frames(noisy.frames, noisy.series.times[:-1])
    with pytest.raises(ValueError, match="curve"):
        ctp.baseline_frames(noisy.frames[0], noisy.series.times)
    with pytest.raises(ValueError, match="increase"):
        ctp.baseline_frames(np.zeros(5), np.array([0.0, 1.0, 1.0, 2.0, 3.0]))


# --- brain mask ---


def test_brain_mask_matches_truth(noisy: Acquired, noisy_mask: np.ndarray) -> None:
    truth = noisy.truth
    target = truth.brain & ~np.isin(truth.labels, (LABELS["artery"], LABELS["vein"]))
    assert noisy_mask.dtype == bool and noisy_mask.shape == noisy.frames.shape[1:]
    assert _dice(noisy_mask, target) >= 0.85
    assert not np.any(noisy_mask & (truth.labels == LABELS["skull"]))
    assert not np.any(noisy_mask & np.isin(truth.labels, (LABELS["air"], LABELS["scalp"])))
    assert not np.any(noisy_mask & np.isin(truth.labels, (LABELS["artery"], LABELS["vein"])))
    csf = (truth.labels == LABELS["csf"]) & ~truth.brain
    assert np.count_nonzero(noisy_mask & csf) < 0.15 * np.count_nonzero(csf)


def test_brain_mask_keeps_the_cortex_against_the_skull() -> None:
    """A geometric head (thin CSF layer, a ribbon of cortex) in 10 mm slices at 20 HU: the mask
    holds at least 97 % of the true brain tissue and no bone, yet leaves out what is mostly CSF."""
    variation = Variation(anatomy="geometric", zones=("graded",), ct_slices=(8, 8), slice_mm=(10.0,), cortex_mm=(4.0, 4.0))
    patient = make_patient(SEED, PhantomOptions(ct_matrix=128, ct_frames=30, noise_hu=20.0, variation=variation))
    series = ct_perfusion(patient)
    frames = np.stack(list(series.frames))
    truth = series.truth
    mask = ctp.brain_mask_ct(frames, series.geometry.spacing, ctp.baseline_frames(frames, series.times))
    assert np.count_nonzero(mask & truth.brain) >= 0.97 * np.count_nonzero(truth.brain)
    assert not np.any(mask & np.isin(truth.labels, (LABELS["skull"], LABELS["air"], LABELS["scalp"])))
    assert np.count_nonzero(mask & ~truth.brain) < 0.05 * np.count_nonzero(truth.brain)


def test_brain_mask_without_brain_is_an_input_error(noisy: Acquired) -> None:
    air = np.full((5, 4, 32, 32), -1000.0, dtype=np.float32)
    with pytest.raises(InputError, match="no brain"):
        ctp.brain_mask_ct(air, noisy.spacing, 2)
    with pytest.raises(ValueError, match="n_baseline"):
        ctp.brain_mask_ct(noisy.frames, noisy.spacing, 0)


# --- concentration and denoising ---


def test_concentration_is_frames_minus_baseline_mean(clean: Acquired) -> None:
    n = ctp.baseline_frames(clean.frames, clean.series.times)
    conc = ctp.concentration_ct(clean.frames, n)
    expected = clean.frames.astype(np.float64) - clean.frames[:n].astype(np.float64).mean(axis=0)
    assert conc.dtype == np.float32 and conc.shape == clean.frames.shape
    np.testing.assert_allclose(conc, expected, atol=1e-3)
    # Tissue is at most barely enhanced in the baseline (the last one may be a fraction of a second
    # after the arterial arrival); it peaks at tens of HU.
    assert np.abs(conc[:n, clean.truth.brain]).max() < 2.0
    with pytest.raises(ValueError, match="n_baseline"):
        ctp.concentration_ct(clean.frames, len(clean.frames))


def test_denoise_reduces_noise_without_bleeding(noisy: Acquired, clean: Acquired, noisy_mask: np.ndarray) -> None:
    n = ctp.baseline_frames(noisy.frames, noisy.series.times)
    noisy_conc = ctp.concentration_ct(noisy.frames, n)
    clean_conc = ctp.concentration_ct(clean.frames, n)
    smoothed = ctp.denoise(noisy_conc, noisy.spacing, noisy_mask, sigma_mm=2.0)
    inside = noisy_mask[None] & np.ones(len(noisy_conc), dtype=bool)[:, None, None, None]
    rms_before = np.sqrt(np.mean((noisy_conc - clean_conc)[inside] ** 2))
    rms_after = np.sqrt(np.mean((smoothed - clean_conc)[inside] ** 2))
    assert rms_after < 0.5 * rms_before
    np.testing.assert_array_equal(smoothed[:, ~noisy_mask], noisy_conc[:, ~noisy_mask])
    # The masked vessels (hundreds of HU) do not leak into tissue: the mean tissue curve is kept.
    clean_smoothed = ctp.denoise(clean_conc, clean.spacing, noisy_mask, sigma_mm=2.0)
    curve, curve_smoothed = clean_conc[:, noisy_mask].mean(axis=1), clean_smoothed[:, noisy_mask].mean(axis=1)
    assert np.abs(curve_smoothed - curve).max() < 0.05 * curve.max()
    with pytest.raises(ValueError, match="mask"):
        ctp.denoise(noisy_conc, noisy.spacing, noisy_mask[:-1])


# --- quality flags ---


def test_truncated_bolus_flag(acquire, noisy: Acquired, noisy_mask: np.ndarray) -> None:
    truncated = acquire(truncated_bolus=True)
    for acq, flagged in ((noisy, False), (truncated, True)):
        curve = acq.frames[:, noisy_mask].mean(axis=1)
        n = ctp.baseline_frames(acq.frames, acq.series.times)
        flag = ctp.truncated_bolus(curve, n)
        assert (flag is not None) == flagged, flag
    assert "truncated bolus" in ctp.truncated_bolus([0.0, 0.0, 5.0, 10.0, 9.0])
    assert ctp.truncated_bolus([0.0, 0.0, 0.0]) is None


def test_time_point_and_coverage_flags() -> None:
    assert ctp.too_few_time_points(30) is None
    assert "too few time points" in ctp.too_few_time_points(8)
    assert ctp.coverage_mm(16, (5.0, 0.9, 0.9)) == 80.0
    assert ctp.coverage_mm(8, 5.0) == 40.0
    assert ctp.insufficient_coverage(16, 5.0) is None
    assert "insufficient coverage" in ctp.insufficient_coverage(4, 5.0)
    with pytest.raises(ValueError):
        ctp.coverage_mm(0, 5.0)
