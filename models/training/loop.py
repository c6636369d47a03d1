"""The one training loop of StrokeGate's segmentation networks, and whole-study prediction.

A ``Recipe`` holds what differs between models (their contract): the freshly seeded network, the
sampler of training batches (the network's inputs, the truth's class labels, the brain mask),
the loss, the optimiser (and its schedule), and how an epoch is validated and scored. ``fit``
runs epochs of steps, validates after each, keeps ``last.pt`` and ``best.pt`` checkpoints and
``history.json``, and returns the network with the best validation weights.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch


@dataclass
class History:
    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    seconds: float = 0.0


class Sampler(Protocol):
    def batch(self) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        """(the network's inputs, labels ``[N, H, W]`` int64, brain ``[N, 1, H, W]`` 0/1)."""


@dataclass
class Recipe:
    """What one model's training is made of."""

    network: torch.nn.Module
    sampler: Sampler
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (probabilities, labels, brain)
    optimiser: torch.optim.Optimizer
    validate: Callable[[torch.nn.Module], dict[str, float]]  # the epoch's validation record entries ({} when none)
    selection: Callable[[dict[str, float]], float]  # an epoch's record -> its score (higher is better)
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None
    checkpoint: dict[str, Any] = field(default_factory=dict)  # saved with each checkpoint (the config, ...)


def fit(recipe: Recipe, epochs: int, steps_per_epoch: int, folder: Path, threads: int = 1,
        on_step: Callable[[int, int, float], None] | None = None) -> tuple[torch.nn.Module, History]:
    """Train ``recipe.network`` from scratch; checkpoints (``last.pt``, ``best.pt``) and ``history.json``
    go to ``folder``. Returns the network with the best validation weights (eval mode) and the history."""
    torch.set_num_threads(threads)
    folder.mkdir(parents=True, exist_ok=True)
    network, optimiser = recipe.network, recipe.optimiser
    history, best, started = History(), -float("inf"), time.perf_counter()
    for epoch in range(epochs):
        network.train()
        losses = []
        for step in range(steps_per_epoch):
            feeds, labels, brain = recipe.sampler.batch()
            loss = recipe.loss(network(*feeds), labels, brain)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if recipe.schedule is not None:
                recipe.schedule.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(epoch, step, losses[-1])
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), **recipe.validate(network),
                  "seconds": time.perf_counter() - started}
        history.epochs.append(record)
        score = recipe.selection(record)
        state = {"network": network.state_dict(), "optimiser": optimiser.state_dict(), "epoch": epoch + 1, **recipe.checkpoint}
        torch.save(state, folder / "last.pt")
        if score > best:
            best, history.best_epoch = score, epoch + 1
            torch.save(state, folder / "best.pt")
        history.seconds = time.perf_counter() - started
        (folder / "history.json").write_text(json.dumps(asdict(history), indent=2))
    network.load_state_dict(torch.load(folder / "best.pt", weights_only=True)["network"])
    network.eval()
    return network, history


Forward = Callable[..., np.ndarray]
"""(maps, brain, *per-slice inputs) -> probabilities, as numpy arrays: the network run by some backend."""


def torch_forward(network: torch.nn.Module) -> Forward:
    """The network in eval mode, without gradients, numpy in and out."""
    network.eval()

    def forward(*arrays: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return network(*(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)).numpy()

    return forward


def predict_volume(forward: Forward, inputs: np.ndarray, brain: np.ndarray, multiple: int,
                   per_slice: Sequence[np.ndarray] = (), batch: int = 4) -> np.ndarray:
    """Probabilities ``[Z, classes, H, W]`` of a whole study: ``inputs`` ``[Z, C, H, W]`` and ``brain``
    ``[Z, H, W]`` padded to ``multiple``, run ``batch`` slices at a time with each ``per_slice``
    array's rows (e.g. the clinical input), cropped back."""
    z, _, h, w = inputs.shape
    ph, pw = -h % multiple, -w % multiple
    maps = np.pad(inputs, ((0, 0), (0, 0), (0, ph), (0, pw))).astype(np.float32, copy=False)
    brains = np.pad(brain, ((0, 0), (0, ph), (0, pw)))[:, None].astype(np.float32)
    parts = []
    for start in range(0, z, batch):
        part = slice(start, start + batch)
        parts.append(forward(maps[part], brains[part], *(a[part] for a in per_slice)))
    return np.concatenate(parts)[:, :, :h, :w]
