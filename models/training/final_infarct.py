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

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.networks.late_fusion import BACKGROUND, HEALTHY, LESION, LateFusionNet
from models.training.losses import LESION_WEIGHT, weighted_dice_loss
from models.training.metrics import dice, hausdorff_95, precision, recall, volumetric_similarity, voxel_auc
from service.inference.final_infarct_inputs import LESION_THRESHOLD, Scenario

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
class History:
    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    seconds: float = 0.0


@dataclass
class FinalStudy:
    """One cached study: network input, brain, both truths, and the mismatch method's masks."""

    key: str
    inputs: np.ndarray  # [Z, C, H, W] float32
    brain: np.ndarray  # [Z, H, W] bool
    truths: dict[Scenario, np.ndarray]  # bool [Z, H, W] each
    core: np.ndarray  # the MRI analysis's ADC core
    penumbra: np.ndarray  # its Tmax lesion minus the core
    spacing_mm: tuple[float, float, float]

    @classmethod
    def from_arrays(cls, key: str, arrays: dict[str, np.ndarray]) -> FinalStudy:
        return cls(key, arrays["inputs"], arrays["brain"].astype(bool),
                   {s: arrays[k].astype(bool) & arrays["brain"].astype(bool) for s, k in TRUTH_KEY.items()},
                   arrays["mismatch_core"].astype(bool), arrays["mismatch_penumbra"].astype(bool),
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

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
        return (torch.from_numpy(np.pad(np.stack(maps), ((0, 0), (0, 0), (0, ph), (0, pw))).astype(np.float32)),
                torch.from_numpy(np.pad(np.stack(brains), ((0, 0), (0, ph), (0, pw)))[:, None].astype(np.float32)),
                torch.from_numpy(np.pad(np.stack(labels), ((0, 0), (0, ph), (0, pw))).astype(np.int64)))


def predict_lesion(network: LateFusionNet, study: FinalStudy, batch: int = 8) -> np.ndarray:
    """Lesion probability ``[Z, H, W]`` of a whole study (torch, eval mode)."""
    network.eval()
    z, _, h, w = study.inputs.shape
    multiple = network.size_multiple
    ph, pw = -h % multiple, -w % multiple
    maps = np.pad(study.inputs, ((0, 0), (0, 0), (0, ph), (0, pw)))
    brain = np.pad(study.brain, ((0, 0), (0, ph), (0, pw)))[:, None].astype(np.float32)
    out = np.zeros((z, h + ph, w + pw), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, z, batch):
            part = slice(start, start + batch)
            out[part] = network(torch.from_numpy(maps[part]), torch.from_numpy(brain[part]))[:, LESION].numpy()
    return out[:, :h, :w]


def train(studies: list[FinalStudy], validation: list[FinalStudy], scenario: Scenario, config: FinalTrainConfig, folder: Path,
          on_step: Callable[[int, int, float], None] | None = None) -> tuple[LateFusionNet, History]:
    """Train from scratch; checkpoints (``last.pt``, ``best.pt``) and ``history.json`` in ``folder``.
    Returns the network with the best validation lesion Dice and the history."""
    torch.set_num_threads(config.threads)
    folder.mkdir(parents=True, exist_ok=True)
    network = new_network(config, studies[0].inputs.shape[1])
    sampler = SliceSampler(studies, scenario, config, network.size_multiple)
    weights = torch.tensor([1.0, 1.0, LESION_WEIGHT])
    optimiser = torch.optim.Adam(network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    history, best, started = History(), -1.0, time.perf_counter()
    for epoch in range(config.epochs):
        network.train()
        losses = []
        for step in range(config.steps_per_epoch):
            maps, brain, labels = sampler.batch()
            loss = weighted_dice_loss(network(maps, brain), labels, weights)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(epoch, step, losses[-1])
        scores = [dice(predict_lesion(network, s) >= LESION_THRESHOLD, s.truths[scenario]) for s in validation]
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)),
                  "validation_dice": float(np.mean(scores)) if scores else float("nan"), "seconds": time.perf_counter() - started}
        history.epochs.append(record)
        score = record["validation_dice"] if scores else -record["train_loss"]
        state = {"network": network.state_dict(), "epoch": epoch + 1, "config": asdict(config), "scenario": scenario.value}
        torch.save(state, folder / "last.pt")
        if score > best:
            best, history.best_epoch = score, epoch + 1
            torch.save(state, folder / "best.pt")
        history.seconds = time.perf_counter() - started
        (folder / "history.json").write_text(json.dumps(asdict(history), indent=2))
    network.load_state_dict(torch.load(folder / "best.pt", weights_only=True)["network"])
    network.eval()
    return network, history


@dataclass(frozen=True)
class FinalScore:
    """One patient, one method (``model`` or ``mismatch``), one scenario: seed 001's metrics."""

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
