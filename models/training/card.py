"""The model card a training run writes beside its weights (schema: service.inference.card): one
builder for every model, given its contract and what it says of itself."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.export import PARITY_TOLERANCE
from models.training.cohort import CohortPlan
from models.training.loop import History
from service.inference.card import (
    Contract, FilesCard, InputsCard, MetricRow, ModelCard, OutputsCard, ParityCard, Range, TrainingCard, file_ref,
)

SPACING_TOLERANCE = 0.15
"""The card's spacing ranges: what training saw, widened by this fraction."""


@dataclass(frozen=True)
class CardText:
    """What a model says of itself on its card."""

    architecture: str
    source: str
    intended_use: str  # begins with service.inference.card.RESEARCH_ONLY
    restricted_to: str  # where the output is fixed, and to what
    training_notes: str


@dataclass(frozen=True)
class TrainingRun:
    """What one training command did: its cohort, the training patients' voxel sizes, its seed and
    history, the shipped files and their parity, how long it took and where."""

    plan: CohortPlan
    spacings_mm: Sequence[Sequence[float]]  # (slice, row, column) of each training study
    seed: int
    history: History
    files: tuple[Path, Path, Path]  # ONNX, torch program, test input
    parity_difference: float
    command: str
    duration_s: float
    machine: str
    size_multiple: int
    noise_hu: tuple[float, ...]  # the CT noise levels trained and tested on (none for MRI)


def build_card(*, name: str, version: str, contract: Contract, text: CardText, run: TrainingRun,
               metrics: Sequence[MetricRow]) -> ModelCard:
    import torch

    onnx, program, test_input = run.files
    spacing = np.asarray(run.spacings_mm, dtype=np.float64)
    return ModelCard(
        name=name, version=version, task=contract.task, architecture=text.architecture, source=text.source,
        intended_use=text.intended_use,
        files=FilesCard(onnx=file_ref(onnx), exported_program=file_ref(program), test_input=file_ref(test_input)),
        inputs=InputsCard(
            tensors=contract.tensors, channels=contract.channels, clinical=contract.clinical,
            in_plane_spacing_mm=_range(spacing[:, 1:].ravel()), slice_spacing_mm=_range(spacing[:, 0]),
            image_size=Range(low=run.size_multiple, high=1024), size_multiple=run.size_multiple,
        ),
        outputs=OutputsCard(tensor=contract.output, classes=contract.classes, restricted_to=text.restricted_to),
        training=TrainingCard(
            families=run.plan.families, held_out_family=run.plan.held_out_family, noise_hu=run.noise_hu,
            counts={split: len(seeds) for split, seeds in run.plan.seeds().items()},
            seeds={**run.plan.seeds(), "training": run.seed}, command=run.command, duration_s=round(run.duration_s, 1),
            machine=run.machine, epochs=len(run.history.epochs), notes=text.training_notes,
        ),
        metrics=tuple(metrics),
        parity=ParityCard(reference=f"torch {torch.__version__} eager, float32, CPU", max_abs_probability_difference=run.parity_difference,
                          tolerance=PARITY_TOLERANCE),
    )


def _range(values: np.ndarray) -> Range:
    return Range(low=round(float(values.min()) * (1 - SPACING_TOLERANCE), 4), high=round(float(values.max()) * (1 + SPACING_TOLERANCE), 4))
