"""The model against the service's threshold method on the test and held-out studies: Dice, 95 %
Hausdorff distance and volume difference per class, per family and noise level (medians over
patients), both measured against the phantom's truth."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.networks.slow_fusion import SlowFusionNet
from models.training.cohort import SampleSpec
from models.training.core_penumbra import Study, predict_study
from models.training.loop import Forward
from models.training.metrics import dice, hausdorff_95, volume_difference_ml
from service.inference.card import MetricRow

CLASSES = {"penumbra": 1, "core": 2}
METHODS = ("model", "model, NIHSS unknown", "threshold")
ACCEPTANCE_NOISE_HU = 10.0
CORE_MARGIN = 0.05
"""The model's median core Dice must be at least the threshold method's plus this."""
PENUMBRA_SLACK = 0.02
"""The model's median penumbra Dice may be at most this below the threshold method's."""


@dataclass(frozen=True)
class Score:
    spec: SampleSpec
    method: str
    cls: str
    dice: float
    hd95_mm: float | None
    volume_difference_ml: float
    true_ml: float


def score_study(network: SlowFusionNet, spec: SampleSpec, study: Study, forward: Forward | None = None) -> list[Score]:
    """Both methods' scores on one study; the model run by ``forward`` (e.g. the exported file on
    ONNX Runtime, as the service runs it) or by torch when None."""
    spacing = tuple(float(v) for v in study.extra["spacing_mm"])
    voxel_ml = float(np.prod(spacing)) / 1000.0
    predictions = {
        "model": predict_study(network, study, nihss_known=True, forward=forward).argmax(axis=1),
        "model, NIHSS unknown": predict_study(network, study, nihss_known=False, forward=forward).argmax(axis=1),
    }
    scores = []
    for cls, index in CLASSES.items():
        truth = study.labels == index
        masks = {name: classes == index for name, classes in predictions.items()}
        masks["threshold"] = study.extra[f"threshold_{cls}"].astype(bool)
        for method, mask in masks.items():
            scores.append(Score(spec, method, cls, dice(mask, truth), hausdorff_95(mask, truth, spacing),
                                volume_difference_ml(mask, truth, voxel_ml), float(truth.sum()) * voxel_ml))
    return scores


@dataclass(frozen=True)
class Summary:
    split: str
    family: str
    noise_hu: float
    method: str
    cls: str
    patients: int
    dice: float
    hd95_mm: float | None
    volume_difference_ml: float


def summarise(scores: list[Score]) -> list[Summary]:
    """Medians over patients per (split, family, noise, method, class)."""
    groups: dict[tuple, list[Score]] = {}
    for s in scores:
        groups.setdefault((s.spec.split, s.spec.family, s.spec.noise_hu, s.method, s.cls), []).append(s)
    out = []
    for (split, family, noise, method, cls), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][4], METHODS.index(kv[0][3]))):
        distances = [s.hd95_mm for s in group if s.hd95_mm is not None]
        out.append(Summary(split, family, noise, method, cls, len(group), float(np.median([s.dice for s in group])),
                           float(np.median(distances)) if distances else None,
                           float(np.median([s.volume_difference_ml for s in group]))))
    return out


@dataclass(frozen=True)
class Acceptance:
    """The model's Dice minus the threshold method's, per family, at the acceptance noise level."""

    split: str
    family: str
    core_margin: float
    penumbra_margin: float

    @property
    def holds(self) -> bool:
        return self.core_margin >= CORE_MARGIN and self.penumbra_margin >= -PENUMBRA_SLACK


def acceptance(summaries: list[Summary], noise_hu: float = ACCEPTANCE_NOISE_HU) -> list[Acceptance]:
    """The acceptance check of each (split, family) evaluated at ``noise_hu``: core Dice at least
    ``CORE_MARGIN`` above the threshold method's, penumbra Dice no more than ``PENUMBRA_SLACK`` below."""
    dice_of = {(s.split, s.family, s.method, s.cls): s.dice for s in summaries if s.noise_hu == noise_hu}
    out = []
    for split, family in sorted({(split, family) for split, family, _, _ in dice_of}, key=lambda k: (k[0] != "test", k[1])):
        margins = [dice_of.get((split, family, "model", cls), float("nan")) - dice_of.get((split, family, "threshold", cls), float("nan"))
                   for cls in ("core", "penumbra")]
        out.append(Acceptance(split, family, *margins))
    return out


def metric_rows(summaries: list[Summary]) -> tuple[MetricRow, ...]:
    """The card's metrics: per split, family, noise level, method and class."""
    return tuple(
        MetricRow(split=s.split, family=s.family, noise_hu=s.noise_hu, method=s.method, cls=s.cls, patients=s.patients,
                  dice=round(s.dice, 4), hd95_mm=None if s.hd95_mm is None else round(s.hd95_mm, 2),
                  volume_difference_ml=round(s.volume_difference_ml, 2))
        for s in summaries
    )
