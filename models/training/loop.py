"""Training the slow-fusion network on 2D slices of the cached studies.

Each step takes a batch of square crops from the training studies' slices (half centred on a
lesion voxel, half anywhere in the brain; mirrored left-right at random), withholds NIHSS from
a share of them (flag 0), and minimises the focal Tversky loss inside the brain. After each epoch
the validation studies are predicted whole and the checkpoint with the best mean of core and
penumbra Dice is kept. Seeds fix the weights' initialisation, the crops and the dropout.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.networks.slow_fusion import SlowFusionNet
from models.training.losses import focal_tversky
from models.training.metrics import dice
from service.inference.ctp_inputs import NIHSS_MAX


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 8
    steps_per_epoch: int = 150
    batch: int = 8
    crop: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    lesion_fraction: float = 0.5  # crops centred on a true lesion voxel
    nihss_withheld: float = 0.3  # share of crops trained without NIHSS (flag 0)
    widths: tuple[int, ...] = (8, 16, 32, 64)
    seed: int = 13
    threads: int = 1  # one: on a machine whose cores other work shares, more OpenMP threads wait on each other


@dataclass
class History:
    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    seconds: float = 0.0


@dataclass
class Study:
    """One cached study in memory: model inputs and what it is compared with."""

    key: str
    inputs: np.ndarray  # [Z, C, H, W] float32
    brain: np.ndarray  # [Z, H, W] bool
    labels: np.ndarray  # [Z, H, W] uint8
    nihss: int
    extra: dict[str, np.ndarray] = field(default_factory=dict)


def new_network(config: TrainConfig) -> SlowFusionNet:
    torch.manual_seed(config.seed)
    return SlowFusionNet(widths=config.widths)


def clinical_rows(nihss: np.ndarray, known: np.ndarray) -> np.ndarray:
    return np.stack([np.where(known, nihss / NIHSS_MAX, 0.0), known.astype(np.float64)], axis=1).astype(np.float32)


class CropSampler:
    """Random training crops from the slices with brain of the training studies."""

    def __init__(self, studies: list[Study], config: TrainConfig) -> None:
        self.studies, self.config = studies, config
        self.rng = np.random.default_rng(config.seed)
        self.slices = [(i, z) for i, s in enumerate(studies) for z in range(s.brain.shape[0]) if s.brain[z].sum() >= 50]
        self.lesion_slices = [(i, z) for i, z in self.slices if (studies[i].labels[z] > 0).any()]
        if not self.slices:
            raise ValueError("no training slice holds brain")

    def batch(self) -> tuple[torch.Tensor, ...]:
        c, n = self.config.crop, self.config.batch
        maps, brains, labels, nihss, known = [], [], [], [], []
        for _ in range(n):
            on_lesion = self.lesion_slices and self.rng.random() < self.config.lesion_fraction
            pool = self.lesion_slices if on_lesion else self.slices
            i, z = pool[self.rng.integers(len(pool))]
            study = self.studies[i]
            where = np.argwhere(study.labels[z] > 0) if on_lesion else np.argwhere(study.brain[z])
            cy, cx = where[self.rng.integers(len(where))]
            h, w = study.brain.shape[1:]
            y0 = int(np.clip(cy - c // 2 + self.rng.integers(-c // 4, c // 4 + 1), 0, max(h - c, 0)))
            x0 = int(np.clip(cx - c // 2 + self.rng.integers(-c // 4, c // 4 + 1), 0, max(w - c, 0)))
            window = (slice(y0, y0 + c), slice(x0, x0 + c))
            m, b, l = study.inputs[z][(slice(None), *window)], study.brain[z][window], study.labels[z][window]
            if self.rng.random() < 0.5:
                m, b, l = m[..., ::-1], b[..., ::-1], l[..., ::-1]
            maps.append(m)
            brains.append(b)
            labels.append(l)
            nihss.append(study.nihss)
            known.append(self.rng.random() >= self.config.nihss_withheld)
        return (
            torch.from_numpy(np.ascontiguousarray(np.stack(maps))),
            torch.from_numpy(np.ascontiguousarray(np.stack(brains))[:, None].astype(np.float32)),
            torch.from_numpy(clinical_rows(np.asarray(nihss, dtype=np.float64), np.asarray(known))),
            torch.from_numpy(np.ascontiguousarray(np.stack(labels)).astype(np.int64)),
        )


Forward = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""(maps, brain, clinical) -> probabilities, as numpy arrays: the network run by some backend."""


def predict_study(network: SlowFusionNet, study: Study, nihss_known: bool = True, batch: int = 4,
                  forward: Forward | None = None) -> np.ndarray:
    """Probabilities ``[Z, 3, H, W]`` of a whole study (torch in eval mode, or ``forward``, e.g. the
    exported file on ONNX Runtime); H and W padded as needed."""
    network.eval()
    z, _, h, w = study.inputs.shape
    multiple = network.size_multiple
    ph, pw = -h % multiple, -w % multiple
    maps = np.pad(study.inputs, ((0, 0), (0, 0), (0, ph), (0, pw)))
    brain = np.pad(study.brain, ((0, 0), (0, ph), (0, pw)))[:, None].astype(np.float32)
    clinical = clinical_rows(np.full(z, study.nihss, dtype=np.float64), np.full(z, nihss_known))
    out = np.zeros((z, network.classes, h + ph, w + pw), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, z, batch):
            part = slice(start, start + batch)
            if forward is not None:
                out[part] = forward(maps[part], brain[part], clinical[part])
            else:
                out[part] = network(torch.from_numpy(maps[part]), torch.from_numpy(brain[part]), torch.from_numpy(clinical[part])).numpy()
    return out[:, :, :h, :w]


def validation_scores(network: SlowFusionNet, studies: list[Study]) -> dict[str, float]:
    core, penumbra, losses = [], [], []
    for study in studies:
        probabilities = predict_study(network, study)
        classes = probabilities.argmax(axis=1)
        core.append(dice(classes == 2, study.labels == 2))
        penumbra.append(dice(classes == 1, study.labels == 1))
        with torch.no_grad():
            losses.append(float(focal_tversky(torch.from_numpy(probabilities), torch.from_numpy(study.labels.astype(np.int64)),
                                              torch.from_numpy(study.brain[:, None].astype(np.float32)))))
    return {"validation_loss": float(np.mean(losses)), "validation_dice_core": float(np.mean(core)),
            "validation_dice_penumbra": float(np.mean(penumbra))}


def train(train_studies: list[Study], validation: list[Study], config: TrainConfig, folder: Path,
          on_step: Callable[[int, int, float], None] | None = None) -> tuple[SlowFusionNet, History]:
    """Train from scratch; checkpoints (``last.pt``, ``best.pt``) and ``history.json`` go to ``folder``.
    Returns the network with the best validation weights and the history."""
    torch.set_num_threads(config.threads)
    folder.mkdir(parents=True, exist_ok=True)
    network = new_network(config)
    sampler = CropSampler(train_studies, config)
    optimiser = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    total = config.epochs * config.steps_per_epoch
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=config.learning_rate, total_steps=total, pct_start=0.1)
    history, best, started = History(), -1.0, time.perf_counter()
    for epoch in range(config.epochs):
        network.train()
        losses = []
        for step in range(config.steps_per_epoch):
            maps, brain, clinical, labels = sampler.batch()
            loss = focal_tversky(network(maps, brain, clinical), labels, brain)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(epoch, step, losses[-1])
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), **(validation_scores(network, validation) if validation else {}),
                  "seconds": time.perf_counter() - started}
        history.epochs.append(record)
        score = (record.get("validation_dice_core", 0.0) + record.get("validation_dice_penumbra", 0.0)) / 2 if validation else -record["train_loss"]
        state = {"network": network.state_dict(), "optimiser": optimiser.state_dict(), "epoch": epoch + 1, "config": asdict(config)}
        torch.save(state, folder / "last.pt")
        if score > best:
            best, history.best_epoch = score, epoch + 1
            torch.save(state, folder / "best.pt")
        history.seconds = time.perf_counter() - started
        (folder / "history.json").write_text(json.dumps(asdict(history), indent=2))
    network.load_state_dict(torch.load(folder / "best.pt", weights_only=True)["network"])
    network.eval()
    return network, history
