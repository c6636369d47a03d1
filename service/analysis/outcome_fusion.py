"""Seed 000's Algorithm 1: the image modules' probabilities fused, weighted by the NIHSS.

Each module i (one map's CNN-LSTM) gives p_i = P(mRS 3-6). With its threshold tau_i (chosen on
the training patients, Youden's J), module i votes poor (p_i > tau_i) or good. The normalised
NIHSS c in [0, 1] weights the votes: a poor vote gets c, a good vote 1 - c, so a severe deficit
trusts the modules that say poor and a mild one those that say good. The weights are normalised
to sum to 1 and the fused probability is the weighted mean of the p_i. Without an NIHSS the fusion
is the plain mean (c carries no information then). A logistic recalibration fitted on validation
patients (never the test or held-out ones) may follow: sigmoid(a + b logit(p)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FusionParameters:
    """What Algorithm 1 learns on the training patients."""

    thresholds: tuple[float, ...]  # tau_i, one per module, in module order
    nihss_low: float  # the NIHSS mapped to c = 0
    nihss_high: float  # the NIHSS mapped to c = 1
    recalibration: tuple[float, float] = (0.0, 1.0)  # (intercept a, slope b); (0, 1) leaves p as it is

    def normalised_nihss(self, nihss: np.ndarray | float) -> np.ndarray:
        span = max(self.nihss_high - self.nihss_low, 1e-9)
        return np.clip((np.asarray(nihss, dtype=np.float64) - self.nihss_low) / span, 0.0, 1.0)


def fuse(probabilities: np.ndarray, nihss: np.ndarray | None, parameters: FusionParameters) -> np.ndarray:
    """[N, modules] module probabilities (and N NIHSS values, or None) -> [N] fused probability."""
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(parameters.thresholds):
        raise ValueError(f"expected [patients, {len(parameters.thresholds)}] probabilities, got {p.shape}")
    if nihss is None:
        return recalibrated(p.mean(axis=1), *parameters.recalibration)
    c = parameters.normalised_nihss(nihss)[:, None]
    poor = p > np.asarray(parameters.thresholds)[None, :]
    raw = np.where(poor, c, 1.0 - c)
    total = raw.sum(axis=1, keepdims=True)
    weights = np.where(total > 0, raw / np.where(total > 0, total, 1.0), 1.0 / p.shape[1])
    return recalibrated((weights * p).sum(axis=1), *parameters.recalibration)


def recalibrated(p: np.ndarray, intercept: float, slope: float) -> np.ndarray:
    """sigmoid(intercept + slope * logit(p)); ``p`` unchanged for (0, 1)."""
    p = np.asarray(p, dtype=np.float64)
    if intercept == 0.0 and slope == 1.0:
        return p
    q = np.clip(p, 1e-6, 1 - 1e-6)
    return 1.0 / (1.0 + np.exp(-(intercept + slope * np.log(q / (1 - q)))))


def youden_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1 (a module's tau_i)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    if labels.all() or not labels.any():
        raise ValueError("a threshold needs both outcomes among the training patients")
    candidates = np.unique(scores)
    best, best_j = float(candidates[0]), -np.inf
    for t in candidates:
        predicted = scores > t
        j = (predicted & labels).sum() / labels.sum() - (predicted & ~labels).sum() / (~labels).sum()
        if j > best_j:
            best, best_j = float(t), j
    return best
