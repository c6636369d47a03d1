"""Focal Tversky loss (Abraham and Khan 2019), as seed 002 trains with it: gamma 4/3, alpha 0.7
on false negatives, beta 0.3 on false positives, over the three classes inside the brain."""

from __future__ import annotations

import torch

GAMMA, ALPHA, BETA = 4.0 / 3.0, 0.7, 0.3


def focal_tversky(probabilities: torch.Tensor, labels: torch.Tensor, brain: torch.Tensor,
                  gamma: float = GAMMA, alpha: float = ALPHA, beta: float = BETA, smooth: float = 1.0) -> torch.Tensor:
    """Mean over classes of ``(1 - TI_c) ** (1 / gamma)``, ``TI_c = TP / (TP + alpha FN + beta FP)``
    summed over the batch's brain voxels.

    ``probabilities`` [N, C, H, W], ``labels`` [N, H, W] class indices, ``brain`` [N, 1, H, W] 0/1.
    """
    classes = probabilities.shape[1]
    truth = torch.nn.functional.one_hot(labels.long(), classes).permute(0, 3, 1, 2).to(probabilities.dtype) * brain
    predicted = probabilities * brain
    dims = (0, 2, 3)
    tp = (predicted * truth).sum(dims)
    fn = ((1.0 - predicted) * truth).sum(dims)
    fp = (predicted * (1.0 - truth) * brain).sum(dims)
    tversky = (tp + smooth) / (tp + alpha * fn + beta * fp + smooth)
    return torch.pow(torch.clamp(1.0 - tversky, min=0.0), 1.0 / gamma).mean()


LESION_WEIGHT = 8.0
"""Seed 001: the lesion class weighs 8 times the healthy and background classes in the Dice loss."""


def weighted_dice_loss(probabilities: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Weighted multi-class soft Dice loss (Milletari et al.), as seed 001 trains with it:
    ``1 - sum_c w_c Dice_c / sum_c w_c``, each class's Dice over the whole batch.

    ``probabilities`` [N, C, H, W], ``labels`` [N, H, W] class indices, ``weights`` [C].
    """
    classes = probabilities.shape[1]
    truth = torch.nn.functional.one_hot(labels.long(), classes).permute(0, 3, 1, 2).to(probabilities.dtype)
    dims = (0, 2, 3)
    overlap = (probabilities * truth).sum(dims)
    total = probabilities.sum(dims) + truth.sum(dims)
    per_class = (2.0 * overlap + smooth) / (total + smooth)
    weights = weights.to(probabilities.dtype)
    return 1.0 - (weights * per_class).sum() / weights.sum()
