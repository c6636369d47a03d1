"""How an outcome model is judged: discrimination (AUC, against the admission ceiling on the same
patients), calibration (slope and intercept of the logistic recalibration, Brier score, the
calibration curve) and clinical usefulness (decision-curve net benefit)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from service.phantom.clinical import roc_auc


@dataclass(frozen=True)
class OutcomeScore:
    """One model on one set of patients."""

    model: str
    split: str
    family: str
    patients: int
    poor_fraction: float
    auc: float
    ceiling_auc: float  # the admission ceiling on the same patients
    calibration_slope: float
    calibration_intercept: float
    brier: float

    @property
    def of_ceiling(self) -> float:
        return self.auc / self.ceiling_auc


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def calibration(p: np.ndarray, poor: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) of logit P(poor) = a + b logit(p), by maximum likelihood; 1 and 0 when
    the predictions are calibrated."""
    x, y = logit(p), np.asarray(poor, dtype=np.float64)

    def loss(theta: np.ndarray) -> float:
        eta = theta[0] + theta[1] * x
        return float(np.sum(np.logaddexp(0, eta) - y * eta))

    fitted = minimize(loss, np.array([0.0, 1.0]), method="BFGS")
    return float(fitted.x[1]), float(fitted.x[0])


def score(model: str, split: str, family: str, p: np.ndarray, poor: np.ndarray, p_admission: np.ndarray) -> OutcomeScore:
    slope, intercept = calibration(p, poor)
    return OutcomeScore(model, split, family, len(p), float(np.mean(poor)), roc_auc(p, poor), roc_auc(p_admission, poor),
                        slope, intercept, float(np.mean((p - poor) ** 2)))


def calibration_curve(p: np.ndarray, poor: np.ndarray, bins: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean predicted and observed rate per quantile bin of the prediction, and the bin sizes."""
    order = np.argsort(p)
    groups = [g for g in np.array_split(order, bins) if len(g)]
    return (np.array([p[g].mean() for g in groups]), np.array([np.mean(poor[g]) for g in groups]),
            np.array([len(g) for g in groups]))


def net_benefit(p: np.ndarray, poor: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Decision-curve net benefit of treating those with p >= threshold: TP/n - FP/n * t / (1 - t)."""
    poor = np.asarray(poor, dtype=bool)
    n = len(p)
    out = []
    for t in thresholds:
        treated = p >= t
        out.append((treated & poor).sum() / n - (treated & ~poor).sum() / n * t / (1 - t))
    return np.array(out)


def slope_interval(p: np.ndarray, poor: np.ndarray, rounds: int = 400, seed: int = 0) -> tuple[float, float]:
    """The 95 % percentile bootstrap interval of the calibration slope (patients resampled with
    replacement; resamples with one outcome only are skipped): small families give wide intervals,
    which is the point of showing them."""
    p, poor = np.asarray(p, dtype=np.float64), np.asarray(poor, dtype=bool)
    rng = np.random.default_rng(seed)
    slopes = []
    for _ in range(rounds):
        index = rng.integers(0, len(p), len(p))
        if poor[index].all() or not poor[index].any():
            continue
        slopes.append(calibration(p[index], poor[index])[0])
    if not slopes:
        return float("nan"), float("nan")
    low, high = np.percentile(slopes, [2.5, 97.5])
    return float(low), float(high)

