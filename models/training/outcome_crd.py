"""Seed 004's clinical-radiomics-deep learning (CRD) outcome model, fitted on synthetic patients.

Splits (by patient, per family): the first ``test`` patients of each training family test; the
rest is cut into parts A (two thirds) and B, cross-fitted so that the logistic combiner is fitted
on the components' predictions for patients they were not fitted to (``fit_crd``). The held-out
family only tests.

- clinical: logistic regression on NIHSS, age, sex (and a second one without the NIHSS, for
  "NIHSS not available: imaging only");
- radiomics: the region features of the core, hypoperfused region and penumbra
  (service.analysis.outcome_radiomics), standardised, LASSO logistic regression with the penalty
  chosen by 5-fold cross-validation (minimum deviance); the rad-score is its linear predictor;
- deep: a small 2.5D ResNet on slices n-2, n, n+2 of the five MRI maps; its logit is the score;
- combined: logistic regression of the outcome on the three scores.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.networks.outcome_resnet import OutcomeResNet25D
from models.training.outcome_data import MRI_MAPS, OutcomeCohort
from service.analysis.outcome_radiomics import feature_names, region_features
from service.inference.outcome_card import LinearScore
from service.inference.outcome_inputs import lesion_slice, network_maps, slab_25d

CLINICAL = ("nihss", "age", "sex_female")
CLINICAL_IMAGING_ONLY = ("age", "sex_female")
SCORES = ("clinical", "radiomics", "deep")


@dataclass(frozen=True)
class DeepConfig:
    epochs: int = 30
    batch: int = 32
    learning_rate: float = 5e-4  # the paper's
    weight_decay: float = 1e-4  # the paper's
    seed: int = 4
    threads: int = 2


@dataclass
class CrdModel:
    clinical: LinearScore
    clinical_imaging_only: LinearScore
    radiomics: LinearScore
    network: OutcomeResNet25D
    combined: LinearScore
    combined_imaging_only: LinearScore
    deep_history: list[dict[str, float]]


def clinical_matrix(cohort: OutcomeCohort, names: tuple[str, ...]) -> np.ndarray:
    return np.stack([np.asarray(getattr(cohort, n), dtype=np.float64) for n in names], axis=1)


def radiomics_matrix(cohort: OutcomeCohort, spacing_mm: tuple[float, float, float]) -> np.ndarray:
    rows = []
    for i in range(len(cohort)):
        maps = {name: cohort.maps[i, k].astype(np.float32) for k, name in enumerate(MRI_MAPS)}
        rows.append(region_features(maps, cohort.brain[i], cohort.core[i], cohort.hypoperfused[i], spacing_mm))
    return np.stack(rows)


def slabs(cohort: OutcomeCohort) -> np.ndarray:
    out = []
    for i in range(len(cohort)):
        maps = {name: cohort.maps[i, k].astype(np.float32) for k, name in enumerate(MRI_MAPS)}
        fed = network_maps(maps, cohort.brain[i])
        out.append(slab_25d(fed, lesion_slice(cohort.hypoperfused[i], cohort.core[i])))
    return np.stack(out)


def fit_logistic(x: np.ndarray, y: np.ndarray, names: tuple[str, ...], standardise: bool = True) -> LinearScore:
    """Unpenalised logistic regression, as a ``LinearScore`` in the original units."""
    from sklearn.linear_model import LogisticRegression

    mean = x.mean(axis=0) if standardise else np.zeros(x.shape[1])
    scale = np.where(x.std(axis=0) > 1e-9, x.std(axis=0), 1.0) if standardise else np.ones(x.shape[1])
    model = LogisticRegression(penalty=None, max_iter=5000).fit((x - mean) / scale, y)
    return LinearScore(names=names, mean=tuple(mean), scale=tuple(scale), coefficients=tuple(model.coef_[0]), intercept=float(model.intercept_[0]))


def fit_lasso(x: np.ndarray, y: np.ndarray, names: list[str], seed: int = 4) -> LinearScore:
    """LASSO logistic regression, the penalty by 5-fold cross-validation on the deviance; only the
    features with a non-zero coefficient are kept in the score."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    mean = x.mean(axis=0)
    std = x.std(axis=0)
    scale = np.where(std > 1e-9, std, 1.0)
    z = (x - mean) / scale
    model = LogisticRegressionCV(Cs=20, cv=StratifiedKFold(5, shuffle=True, random_state=seed), l1_ratios=(1.0,),
                                 solver="saga", scoring="neg_log_loss", max_iter=20000, random_state=seed).fit(z, y)
    coefficients = model.coef_[0]
    keep = np.flatnonzero(np.abs(coefficients) > 1e-8)
    if keep.size == 0:  # the penalty removed everything: keep the single most informative feature
        keep = np.array([int(np.argmax(np.abs(z.T @ (y - y.mean()))))])
        coefficients = np.zeros_like(coefficients)
        coefficients[keep] = fit_logistic(z[:, keep], y, (names[keep[0]],), standardise=False).coefficients
    return LinearScore(names=tuple(names[k] for k in keep), mean=tuple(mean[keep]), scale=tuple(scale[keep]),
                       coefficients=tuple(coefficients[keep]), intercept=float(model.intercept_[0]))


def _augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(batch.shape[0], generator=generator) < 0.5
    batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    shifts = torch.randint(-4, 5, (2,), generator=generator)
    batch = torch.roll(batch, shifts=(int(shifts[0]), int(shifts[1])), dims=(-2, -1))
    return batch + 0.03 * torch.randn(batch.shape, generator=generator)


def train_deep(x: np.ndarray, y: np.ndarray, config: DeepConfig,
               on_epoch: Callable[[int, float], None] | None = None) -> tuple[OutcomeResNet25D, list[dict[str, float]]]:
    """The 2.5D ResNet on slabs ``x`` [N, C, 64, 64] and outcomes ``y``: Adam, BCE, flips, shifts, noise."""
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    generator = torch.Generator().manual_seed(config.seed)
    network = OutcomeResNet25D(x.shape[1])
    optimiser = torch.optim.Adam(network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, config.epochs)
    loss_fn = nn.BCEWithLogitsLoss()
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y.astype(np.float32))
    history = []
    for epoch in range(config.epochs):
        network.train()
        started, total = time.perf_counter(), 0.0
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(order), config.batch):
            index = order[start:start + config.batch]
            if len(index) < 2:
                continue
            optimiser.zero_grad()
            loss = loss_fn(network(_augment(inputs[index], generator)), targets[index])
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(index)
        schedule.step()
        history.append({"epoch": epoch + 1, "train_loss": total / len(order), "seconds": time.perf_counter() - started})
        if on_epoch is not None:
            on_epoch(epoch + 1, total / len(order))
    network.eval()
    return network, history


def deep_scores(network: OutcomeResNet25D, x: np.ndarray) -> np.ndarray:
    network.eval()
    with torch.no_grad():
        return np.concatenate([network(torch.from_numpy(x[i:i + 64])).numpy() for i in range(0, len(x), 64)]).astype(np.float64)


@dataclass(frozen=True)
class Features:
    """Everything the CRD model reads of a set of patients."""

    clinical: np.ndarray
    clinical_imaging_only: np.ndarray
    radiomics: np.ndarray
    slabs: np.ndarray
    poor: np.ndarray


def features(cohort: OutcomeCohort, spacing_mm: tuple[float, float, float]) -> Features:
    return Features(clinical_matrix(cohort, CLINICAL), clinical_matrix(cohort, CLINICAL_IMAGING_ONLY),
                    radiomics_matrix(cohort, spacing_mm), slabs(cohort), cohort.poor.astype(int))


def _components(f: Features, config: DeepConfig, on_epoch: Callable[[int, float], None] | None) -> CrdModel:
    clinical = fit_logistic(f.clinical, f.poor, CLINICAL)
    clinical_io = fit_logistic(f.clinical_imaging_only, f.poor, CLINICAL_IMAGING_ONLY)
    radiomics = fit_lasso(f.radiomics, f.poor, feature_names(MRI_MAPS), seed=config.seed)
    network, history = train_deep(f.slabs, f.poor, config, on_epoch)
    return CrdModel(clinical, clinical_io, radiomics, network, clinical, clinical, history)


def _join(a: Features, b: Features) -> Features:
    return Features(*(np.concatenate([getattr(a, n), getattr(b, n)]) for n in ("clinical", "clinical_imaging_only", "radiomics", "slabs", "poor")))


def fit_crd(part_a: Features, part_b: Features, config: DeepConfig,
            on_epoch: Callable[[int, float], None] | None = None) -> CrdModel:
    """Cross-fitted: components fitted on A score B and fitted on B score A; the combiners are
    fitted on those out-of-fold scores of all of A and B; the shipped components are then fitted
    on A and B together."""
    out_of_fold = []
    for fit_on, scored in ((part_a, part_b), (part_b, part_a)):
        out_of_fold.append(component_scores(_components(fit_on, config, None), scored))
    s = {k: np.concatenate([out_of_fold[0][k], out_of_fold[1][k]]) for k in out_of_fold[0]}
    poor = np.concatenate([part_b.poor, part_a.poor])
    model = _components(_join(part_a, part_b), config, on_epoch)
    model.combined = fit_logistic(np.stack([s["clinical"], s["radiomics"], s["deep"]], 1), poor, SCORES, standardise=False)
    model.combined_imaging_only = fit_logistic(np.stack([s["clinical_imaging_only"], s["radiomics"], s["deep"]], 1),
                                               poor, SCORES, standardise=False)
    return model


def _selected(radiomics: LinearScore, matrix: np.ndarray) -> np.ndarray:
    names = feature_names(MRI_MAPS)
    return matrix[:, [names.index(n) for n in radiomics.names]]


def component_scores(model: CrdModel, f: Features) -> dict[str, np.ndarray]:
    return {
        "clinical": model.clinical.score(f.clinical),
        "clinical_imaging_only": model.clinical_imaging_only.score(f.clinical_imaging_only),
        "radiomics": model.radiomics.score(_selected(model.radiomics, f.radiomics)),
        "deep": deep_scores(model.network, f.slabs),
    }


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def probabilities(model: CrdModel, f: Features) -> dict[str, np.ndarray]:
    """P(mRS 3-6) of each component alone (its own logistic link), and of the two CRD combiners."""
    s = component_scores(model, f)
    return {
        "clinical": sigmoid(s["clinical"]),
        "radiomics": sigmoid(s["radiomics"]),
        "deep": sigmoid(s["deep"]),
        "CRD": sigmoid(model.combined.score(np.stack([s["clinical"], s["radiomics"], s["deep"]], 1))),
        "CRD, NIHSS not available": sigmoid(model.combined_imaging_only.score(np.stack([s["clinical_imaging_only"], s["radiomics"], s["deep"]], 1))),
    }
