"""Segmentation metrics of seed 002, per patient in 3D: Dice, 95 % Hausdorff distance (mm) and
the absolute volume difference (mL)."""

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
