"""Segmentation metrics per patient in 3D: Dice, 95 % Hausdorff distance (mm) and the absolute
volume difference (mL) of seed 002; precision, recall, volumetric similarity and voxel AUC, which
seed 001 adds."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """2|A and B| / (|A| + |B|); 1 when both are empty (nothing to find, nothing found)."""
    total = int(predicted.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * float((predicted & truth).sum()) / total


def hausdorff_95(predicted: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float]) -> float | None:
    """95th percentile of the symmetric surface distances (mm); None when either mask is empty."""
    if not predicted.any() or not truth.any():
        return None
    distances = []
    for a, b in ((predicted, truth), (truth, predicted)):
        surface = a & ~ndimage.binary_erosion(a)
        to_b = ndimage.distance_transform_edt(~(b & ~ndimage.binary_erosion(b)), sampling=spacing_mm)
        distances.append(to_b[surface])
    return float(np.percentile(np.concatenate(distances), 95))


def volume_difference_ml(predicted: np.ndarray, truth: np.ndarray, voxel_ml: float) -> float:
    """|V_truth - V_predicted| in mL."""
    return abs(float(predicted.sum()) - float(truth.sum())) * voxel_ml


def precision(predicted: np.ndarray, truth: np.ndarray) -> float:
    """|A and B| / |A|; when nothing is predicted: 1 if nothing is true, else 0."""
    found = int(predicted.sum())
    if found == 0:
        return 1.0 if not truth.any() else 0.0
    return float((predicted & truth).sum()) / found


def recall(predicted: np.ndarray, truth: np.ndarray) -> float:
    """|A and B| / |B|; 1 when the truth is empty."""
    true = int(truth.sum())
    return 1.0 if true == 0 else float((predicted & truth).sum()) / true


def volumetric_similarity(predicted: np.ndarray, truth: np.ndarray) -> float:
    """1 - |V_A - V_B| / (V_A + V_B) (Taha and Hanbury); 1 when both are empty."""
    a, b = int(predicted.sum()), int(truth.sum())
    return 1.0 if a + b == 0 else 1.0 - abs(a - b) / (a + b)


def voxel_auc(scores: np.ndarray, truth: np.ndarray) -> float | None:
    """Area under the ROC curve of voxel ``scores`` against the ``truth`` mask (Mann-Whitney U,
    ties counted half); None when the truth has only one class."""
    scores, truth = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(truth, dtype=bool).ravel()
    positives, negatives = int(truth.sum()), int((~truth).sum())
    if positives == 0 or negatives == 0:
        return None
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    return float((ranks[truth].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))
