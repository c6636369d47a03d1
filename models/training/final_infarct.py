"""Training and evaluating seed 001's late-fusion networks, one per reperfusion scenario.

Square crops of the training studies' 2D slices (seed 001 uses whole images; whole slices cost
too much on 2 shared cores), half of each batch centred on the scenario's final infarct, mirrored
left-right at random; the
weighted multi-class Dice loss (lesion 8x); Adam. After each epoch the validation studies are
predicted whole and the checkpoint with the best lesion Dice is kept (validation patients come
from the training families only: the held-out family never chooses a checkpoint).

Evaluation compares each network with seed 001's perfusion-diffusion mismatch baseline
(``mismatch_baseline``) on the scenario's truth, with the seed's metrics per patient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from models.networks.late_fusion import BACKGROUND, HEALTHY, LESION, LateFusionNet
from models.training.loop import History, Recipe, fit, predict_volume, torch_forward
from models.training.losses import LESION_WEIGHT, weighted_dice_loss
from models.training.metrics import dice, hausdorff_95, precision, recall, volumetric_similarity, voxel_auc
from models.training.card import CardText
from models.training.cohort import FAMILY_STRIDE, FIRST_SEED, SampleSpec
from service.inference.card import RESEARCH_ONLY, MetricRow
from service.inference.final_infarct_inputs import LESION_THRESHOLD, Scenario, contract

TRUTH_KEY = {Scenario.REPERFUSED: "final_reperfused", Scenario.NOT_REPERFUSED: "final_not_reperfused"}
"""The cached study's truth of each scenario."""


@dataclass(frozen=True)
class FinalTrainConfig:
    epochs: int = 6
    steps_per_epoch: int = 50
    batch: int = 12  # seed 001
    crop: int | None = 64  # square crops of the slices (None: whole slices, as seed 001; too slow on 2 shared cores)
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    lesion_fraction: float = 0.5  # share of slices holding the scenario's final infarct
    widths: tuple[int, ...] = (4, 8, 16, 32)
    dropout: float = 0.3
    seed: int = 1
    threads: int = 1


@dataclass
class FinalStudy:
    """One cached study: network input, brain, both truths, and the mismatch method's masks."""

    key: str
    inputs: np.ndarray  # [Z, C, H, W] float32
    brain: np.ndarray  # [Z, H, W] bool
    truths: dict[Scenario, np.ndarray]  # bool [Z, H, W] each
    core: np.ndarray  # the analysis's threshold core (MRI: ADC; CT: rCBF within Tmax > 6 s)
    penumbra: np.ndarray  # its Tmax > 6 s lesion minus the core
    spacing_mm: tuple[float, float, float]

    @classmethod
    def from_arrays(cls, key: str, arrays: dict[str, np.ndarray]) -> FinalStudy:
        """From a cached study of either modality (``models.training.dataset``)."""
        return cls(key, arrays["inputs"], arrays["brain"].astype(bool),
                   {s: arrays[k].astype(bool) & arrays["brain"].astype(bool) for s, k in TRUTH_KEY.items()},
                   arrays["threshold_core"].astype(bool), arrays["threshold_penumbra"].astype(bool),
                   tuple(float(v) for v in arrays["spacing_mm"]))

    def labels(self, scenario: Scenario) -> np.ndarray:
        """uint8 ``[Z, H, W]``: background outside the brain, healthy, lesion (the scenario's truth)."""
        labels = np.full(self.brain.shape, BACKGROUND, dtype=np.uint8)
        labels[self.brain] = HEALTHY
        labels[self.truths[scenario]] = LESION
        return labels


def mismatch_baseline(core: np.ndarray, penumbra: np.ndarray, scenario: Scenario) -> np.ndarray:
    """Seed 001's perfusion-diffusion mismatch model: the final infarct is the core if reperfused,
    core plus penumbra if not."""
    core = np.asarray(core, dtype=bool)
    return core.copy() if scenario is Scenario.REPERFUSED else core | np.asarray(penumbra, dtype=bool)


def new_network(config: FinalTrainConfig, inputs: int = 5) -> LateFusionNet:
    torch.manual_seed(config.seed)
    return LateFusionNet(inputs=inputs, widths=config.widths, dropout=config.dropout)


class SliceSampler:
    """Random whole training slices (with brain), padded to the network's size multiple."""

    def __init__(self, studies: list[FinalStudy], scenario: Scenario, config: FinalTrainConfig, multiple: int) -> None:
        self.studies, self.scenario, self.config, self.multiple = studies, scenario, config, multiple
        self.rng = np.random.default_rng(config.seed)
        self.labels = [s.labels(scenario) for s in studies]
        self.slices = [(i, z) for i, s in enumerate(studies) for z in range(s.brain.shape[0]) if s.brain[z].sum() >= 50]
        self.lesion_slices = [(i, z) for i, z in self.slices if (self.labels[i][z] == LESION).any()]
        if not self.slices:
            raise ValueError("no training slice holds brain")

    def _crop(self, maps: np.ndarray, brain: np.ndarray, labels: np.ndarray, lesion: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A ``crop`` x ``crop`` window centred on a lesion voxel (lesion slices) or a brain voxel."""
        size = self.config.crop
        h, w = brain.shape
        if size is None or size >= min(h, w):
            return maps, brain, labels
        ys, xs = np.nonzero(labels == LESION) if lesion else np.nonzero(brain)
        k = int(self.rng.integers(len(ys)))
        top = int(np.clip(ys[k] - size // 2, 0, h - size))
        left = int(np.clip(xs[k] - size // 2, 0, w - size))
        window = (slice(top, top + size), slice(left, left + size))
        return maps[(slice(None), *window)], brain[window], labels[window]

    def batch(self) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        """((maps, brain), labels, brain)."""
        maps, brains, labels = [], [], []
        for _ in range(self.config.batch):
            pool = self.lesion_slices if self.lesion_slices and self.rng.random() < self.config.lesion_fraction else self.slices
            i, z = pool[int(self.rng.integers(len(pool)))]
            study = self.studies[i]
            m, b, l = study.inputs[z], study.brain[z], self.labels[i][z]
            if self.config.crop is not None:
                m, b, l = self._crop(m, b, l, lesion=pool is self.lesion_slices)
            if self.rng.random() < 0.5:
                m, b, l = m[:, :, ::-1], b[:, ::-1], l[:, ::-1]
            maps.append(m)
            brains.append(b)
            labels.append(l)
        h, w = brains[0].shape
        ph, pw = -h % self.multiple, -w % self.multiple
        brain = torch.from_numpy(np.pad(np.stack(brains), ((0, 0), (0, ph), (0, pw)))[:, None].astype(np.float32))
        return ((torch.from_numpy(np.pad(np.stack(maps), ((0, 0), (0, 0), (0, ph), (0, pw))).astype(np.float32)), brain),
                torch.from_numpy(np.pad(np.stack(labels), ((0, 0), (0, ph), (0, pw))).astype(np.int64)), brain)


def predict_lesion(network: LateFusionNet, study: FinalStudy, batch: int = 8) -> np.ndarray:
    """Lesion probability ``[Z, H, W]`` of a whole study (torch, eval mode)."""
    return predict_volume(torch_forward(network), study.inputs, study.brain, network.size_multiple, batch=batch)[:, LESION]


def train(studies: list[FinalStudy], validation: list[FinalStudy], scenario: Scenario, config: FinalTrainConfig, folder: Path,
          on_step: Callable[[int, int, float], None] | None = None) -> tuple[LateFusionNet, History]:
    """Train from scratch; checkpoints (``last.pt``, ``best.pt``) and ``history.json`` in ``folder``.
    Returns the network with the best validation lesion Dice and the history."""
    torch.set_num_threads(config.threads)
    network = new_network(config, studies[0].inputs.shape[1])
    weights = torch.tensor([1.0, 1.0, LESION_WEIGHT])

    def validate(net: torch.nn.Module) -> dict[str, float]:
        scores = [dice(predict_lesion(net, s) >= LESION_THRESHOLD, s.truths[scenario]) for s in validation]
        return {"validation_dice": float(np.mean(scores)) if scores else float("nan")}

    recipe = Recipe(
        network=network, sampler=SliceSampler(studies, scenario, config, network.size_multiple),
        loss=lambda probabilities, labels, brain: weighted_dice_loss(probabilities, labels, weights),
        optimiser=torch.optim.Adam(network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay),
        validate=validate, selection=lambda r: r["validation_dice"] if validation else -r["train_loss"],
        checkpoint={"config": asdict(config), "scenario": scenario.value},
    )
    return fit(recipe, config.epochs, config.steps_per_epoch, folder, config.threads, on_step)


@dataclass(frozen=True)
class FinalScore:
    """One patient, one method (``model``, ``model with measured core`` or ``mismatch``), one scenario: seed 001's metrics."""

    key: str
    split: str
    family: str
    scenario: str
    method: str
    dice: float
    precision: float
    recall: float
    volumetric_similarity: float
    hd95_mm: float | None
    auc: float | None
    predicted_ml: float
    true_ml: float


def score(key: str, split: str, family: str, scenario: Scenario, method: str, mask: np.ndarray, scores: np.ndarray,
          truth: np.ndarray, spacing_mm: tuple[float, float, float]) -> FinalScore:
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    return FinalScore(key, split, family, scenario.value, method, dice(mask, truth), precision(mask, truth), recall(mask, truth),
                      volumetric_similarity(mask, truth), hausdorff_95(mask, truth, spacing_mm), voxel_auc(scores, truth),
                      float(mask.sum()) * voxel_ml, float(truth.sum()) * voxel_ml)


@dataclass(frozen=True)
class FinalSummary:
    """Medians over the patients of one (split, family, scenario, method)."""

    split: str
    family: str
    scenario: str
    method: str
    patients: int
    dice: float
    precision: float
    recall: float
    volumetric_similarity: float
    hd95_mm: float | None
    auc: float | None
    volume_difference_ml: float


def summarise(scores: list[FinalScore]) -> list[FinalSummary]:
    groups: dict[tuple[str, str, str, str], list[FinalScore]] = {}
    for s in scores:
        groups.setdefault((s.split, s.family, s.scenario, s.method), []).append(s)
    out = []
    for (split, family, scenario, method), group in sorted(groups.items()):
        def median(values: list[float | None]) -> float | None:
            kept = [v for v in values if v is not None]
            return float(np.median(kept)) if kept else None

        out.append(FinalSummary(split, family, scenario, method, len(group), median([g.dice for g in group]),
                                median([g.precision for g in group]), median([g.recall for g in group]),
                                median([g.volumetric_similarity for g in group]), median([g.hd95_mm for g in group]),
                                median([g.auc for g in group]), median([abs(g.predicted_ml - g.true_ml) for g in group])))
    return out


def consistency(reperfused: np.ndarray, not_reperfused: np.ndarray) -> float:
    """Share of the reperfused prediction inside the non-reperfused one (1 when it is empty)."""
    n = int(reperfused.sum())
    return 1.0 if n == 0 else float((reperfused & not_reperfused).sum()) / n


INPUTS_TRAINED = {
    "mri": "MRI (DWI, ADC, DSC-PWI; SNR drawn 25-45 per patient) analysed by the service's MRI analysis",
    "ct": "CT perfusion (10 HU noise) analysed by the service's CT perfusion analysis (oSVD, Tmax > 6 s, rCBF < 30 %)",
}
"""What each modality's networks were trained on, for the card."""


def card_text(modality: str, scenario: Scenario, config: FinalTrainConfig, history: History, notes: str) -> CardText:
    """What a final-infarct network says of itself on its card."""
    import torch

    feeds = contract(modality, scenario)
    truth = "reperfused (TICI 2b-3)" if scenario is Scenario.REPERFUSED else "not reperfused"
    names = ", ".join(c.name for c in feeds.channels)
    return CardText(
        architecture=(f"late-fusion U-Net: one encoder branch per input ({names}; "
                      f"widths {list(config.widths)}, 2 convolution + batch normalisation per block, dropout {config.dropout} at the "
                      "deepest level), the branches concatenated at the bottleneck and fused, one decoder with the branches' features "
                      "as skip connections; softmax over background, healthy, lesion, restricted to the brain mask; weighted "
                      "multi-class Dice loss (lesion x8); final infarct = lesion probability >= 0.5; 2D slices"),
        source=(f"seed 001: reperfusion-status-specific CNNs predicting the final infarct from baseline maps (late fusion U-Net), "
                f"compared with the perfusion-diffusion mismatch model; here on {names}"),
        intended_use=(f"{RESEARCH_ONLY} Predicts the final infarct if the patient is {truth}. In the service the prediction "
                      "includes the core the analysis measured (tissue infarcted at imaging stays infarcted whatever happens; where the "
                      "analysis over-calls the core, so does the prediction): the metrics 'model with measured core' are of that, "
                      "'model' of the network alone. Trained on synthetic patients only; retrain on site data before drawing any conclusion."),
        restricted_to="brain mask (input 'brain'): outside it the probability of 'background' is 1",
        training_notes=(f"{INPUTS_TRAINED[modality]}; every training patient against its {truth} final infarct (the phantom knows "
                        f"both). {config.epochs} epochs x {config.steps_per_epoch} steps of {config.batch} slices cropped to "
                        f"{config.crop or 'whole'} pixels, Adam lr {config.learning_rate:g}; best validation epoch {history.best_epoch}; "
                        f"torch {torch.__version__}. {notes}"),
    )


def metric_rows(summaries: list[FinalSummary], scenario: Scenario, noise_hu: float = 0.0) -> tuple[MetricRow, ...]:
    """The card's metrics: per split, family and method (network or mismatch baseline), seed 001's metrics."""
    return tuple(
        MetricRow(split=s.split, family=s.family, noise_hu=noise_hu, method=s.method,
                  cls=f"final infarct, {scenario.value}", patients=s.patients, dice=round(s.dice, 4),
                  hd95_mm=None if s.hd95_mm is None else round(s.hd95_mm, 2), volume_difference_ml=round(s.volume_difference_ml, 2),
                  precision=round(s.precision, 4), recall=round(s.recall, 4),
                  volumetric_similarity=round(s.volumetric_similarity, 4), auc=None if s.auc is None else round(s.auc, 4))
        for s in summaries
    )


def evaluation_cohort(seeds: dict[str, int | list[int]], families: tuple[str, ...], held_out_family: str | None,
                      per_family: int, noise_hu: float) -> list[SampleSpec]:
    """The patients a shipped pair is evaluated on, from its card's ``seeds``: its validation patients,
    its test (held-out) patients, and per family as many more patients as it takes to reach
    ``per_family``, drawn after every seed the card names in that family's block (never trained on,
    never chose anything)."""
    named = {split: sorted(int(s) for s in v) for split, v in seeds.items() if isinstance(v, list)}
    used = {s for v in named.values() for s in v}
    specs = [SampleSpec(family, s, noise_hu, "validation") for family in families for s in named.get("validation", [])
             if FIRST_SEED + families.index(family) * FAMILY_STRIDE <= s < FIRST_SEED + (families.index(family) + 1) * FAMILY_STRIDE]
    for index, family in enumerate(families):
        block = range(FIRST_SEED + index * FAMILY_STRIDE, FIRST_SEED + (index + 1) * FAMILY_STRIDE)
        split = "held-out" if family == held_out_family else "test"
        tested = [s for s in named.get(split, []) if s in block][:per_family]
        after = max([s for s in used if s in block], default=block.start - 1) + 1
        tested += list(range(after, after + per_family - len(tested)))
        specs += [SampleSpec(family, s, noise_hu, split) for s in tested]
    return specs
