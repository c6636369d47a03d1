"""Training the CT perfusion core/penumbra network (seed 002, slow fusion) on 2D slices of the
cached studies, through the shared loop (``models.training.loop``).

Each step takes a batch of square crops from the training studies' slices (half centred on a
lesion voxel, half anywhere in the brain; mirrored left-right at random and, with augmentation on,
also up-down, each map scaled by a small random factor and given a little noise inside the brain),
withholds NIHSS from a share of them (flag 0), and minimises the focal Tversky loss inside the brain. After each epoch
the validation studies are predicted whole and the checkpoint with the best mean of core and
penumbra Dice is kept. Seeds fix the weights' initialisation, the crops and the dropout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.networks.slow_fusion import SlowFusionNet
from models.training.loop import Forward, History, Recipe, fit, predict_volume, torch_forward
from models.training.losses import focal_tversky
from models.training.metrics import dice
from models.training.card import CardText
from service.inference.card import RESEARCH_ONLY
from service.inference.ctp_inputs import CTP_CONTRACT, NIHSS_MAX


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
    augment: bool = False  # up-down flips, per-map intensity scaling and noise (left-right flips always)
    intensity_scale: float = 0.05  # with augment: each map of a crop times a factor in [1 - s, 1 + s]
    noise_sd: float = 0.02  # with augment: Gaussian noise (normalised units) added inside the brain
    seed: int = 13
    threads: int = 1  # one: on a machine whose cores other work shares, more OpenMP threads wait on each other


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


def augment(maps: np.ndarray, brain: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
            config: TrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One training crop (``maps`` ``[C, H, W]``, ``brain`` and ``labels`` ``[H, W]``) flipped up-down at
    random, each map scaled by a factor in ``1 +- intensity_scale`` and given Gaussian noise of
    ``noise_sd`` inside the brain: scanners and noise differ, and the truth does not move with them."""
    if rng.random() < 0.5:
        maps, brain, labels = maps[:, ::-1], brain[::-1], labels[::-1]
    scale = rng.uniform(1.0 - config.intensity_scale, 1.0 + config.intensity_scale, size=(maps.shape[0], 1, 1))
    noise = rng.normal(0.0, config.noise_sd, size=maps.shape) * brain[None]
    return (maps * scale + noise).astype(np.float32), brain, labels


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

    def batch(self) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        """((maps, brain, clinical), labels, brain)."""
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
            if self.config.augment:
                m, b, l = augment(m, b, l, self.rng, self.config)
            maps.append(m)
            brains.append(b)
            labels.append(l)
            nihss.append(study.nihss)
            known.append(self.rng.random() >= self.config.nihss_withheld)
        brain = torch.from_numpy(np.ascontiguousarray(np.stack(brains))[:, None].astype(np.float32))
        clinical = torch.from_numpy(clinical_rows(np.asarray(nihss, dtype=np.float64), np.asarray(known)))
        return ((torch.from_numpy(np.ascontiguousarray(np.stack(maps))), brain, clinical),
                torch.from_numpy(np.ascontiguousarray(np.stack(labels)).astype(np.int64)), brain)


def predict_study(network: SlowFusionNet, study: Study, nihss_known: bool = True, batch: int = 4,
                  forward: Forward | None = None) -> np.ndarray:
    """Probabilities ``[Z, 3, H, W]`` of a whole study (torch in eval mode, or ``forward``, e.g. the
    exported file on ONNX Runtime); H and W padded as needed."""
    z = study.inputs.shape[0]
    clinical = clinical_rows(np.full(z, study.nihss, dtype=np.float64), np.full(z, nihss_known))
    return predict_volume(forward or torch_forward(network), study.inputs, study.brain, network.size_multiple, (clinical,), batch)


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
    Returns the network with the best validation weights (mean of core and penumbra Dice) and the history."""
    torch.set_num_threads(config.threads)
    network = new_network(config)
    optimiser = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    total = config.epochs * config.steps_per_epoch
    recipe = Recipe(
        network=network, sampler=CropSampler(train_studies, config), loss=focal_tversky, optimiser=optimiser,
        schedule=torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=config.learning_rate, total_steps=total, pct_start=0.1),
        validate=lambda net: validation_scores(net, validation) if validation else {},
        selection=lambda r: (r["validation_dice_core"] + r["validation_dice_penumbra"]) / 2 if validation else -r["train_loss"],
        checkpoint={"config": asdict(config)},
    )
    return fit(recipe, config.epochs, config.steps_per_epoch, folder, config.threads, on_step)


def augmentation(config: TrainConfig) -> str:
    """The crops' augmentation, in words (card and report)."""
    if not config.augment:
        return "left-right flips"
    return (f"left-right and up-down flips, maps scaled by 1 +- {config.intensity_scale:g}, "
            f"noise sd {config.noise_sd:g} inside the brain")


def card_text(config: TrainConfig, history: History, notes: str) -> CardText:
    """What the core/penumbra model says of itself on its card."""
    return CardText(
        architecture=(f"multi-input slow fusion U-Net: {len(CTP_CONTRACT.channels)} VGG-style encoders (widths {list(config.widths)}, "
                      "2 convolutions per level), their features concatenated at every level as the skip connections of one shared "
                      "decoder; NIHSS and its known-flag as constant maps at the bottleneck; softmax over 3 classes, restricted to the "
                      "brain mask; focal Tversky loss (gamma 4/3, alpha 0.7, beta 0.3); 2D slices"),
        source="Tomasetti et al., multi-input segmentation of damaged brain in acute ischemic stroke patients using slow fusion "
               "with skip connection (seed 002)",
        intended_use=f"{RESEARCH_ONLY} Trained on synthetic patients only; retrain on site data before drawing any conclusion.",
        restricted_to="brain mask (input 'brain'): outside it the probability of 'healthy' is 1",
        training_notes=(f"{config.epochs} epochs x {config.steps_per_epoch} steps of {config.batch} crops {config.crop} x {config.crop}, "
                        f"AdamW lr {config.learning_rate:g} one-cycle, NIHSS withheld from {config.nihss_withheld:.0%} of the crops; "
                        f"augmentation {augmentation(config)}; "
                        f"best validation epoch {history.best_epoch}; torch {torch.__version__}. {notes}"),
    )
