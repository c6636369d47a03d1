"""The model card a training run writes beside its weights (schema: service.inference.card)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.export import PARITY_TOLERANCE
from models.training.cohort import CohortPlan, SampleSpec
from models.training.evaluate import Summary
from models.training.loop import History, Study, TrainConfig
from service.inference.card import (
    RESEARCH_ONLY, FilesCard, InputsCard, MetricRow, ModelCard, OutputsCard, ParityCard, Range, TrainingCard, file_ref,
)
from service.inference.ctp_inputs import CTP_CONTRACT

SPACING_TOLERANCE = 0.15
"""The card's spacing ranges: what training saw, widened by this fraction."""


def build_card(*, name: str, version: str, plan: CohortPlan, studies: dict[SampleSpec, Study], config: TrainConfig,
               history: History, summaries: list[Summary], files: tuple[Path, Path, Path], parity_difference: float,
               command: str, duration_s: float, machine: str, size_multiple: int, notes: str) -> ModelCard:
    onnx, program, test_input = files
    trained = [s for spec, s in studies.items() if spec.split == "train"]
    spacing = np.array([s.extra["spacing_mm"] for s in trained])
    counts: dict[str, int] = {}
    for split, seeds in plan.seeds().items():
        counts[split] = len(seeds)
    import torch

    return ModelCard(
        name=name,
        version=version,
        task=CTP_CONTRACT.task,
        architecture=(f"multi-input slow fusion U-Net: {len(CTP_CONTRACT.channels)} VGG-style encoders (widths {list(config.widths)}, "
                      "2 convolutions per level), their features concatenated at every level as the skip connections of one shared "
                      "decoder; NIHSS and its known-flag as constant maps at the bottleneck; softmax over 3 classes, restricted to the "
                      "brain mask; focal Tversky loss (gamma 4/3, alpha 0.7, beta 0.3); 2D slices"),
        source="Tomasetti et al., multi-input segmentation of damaged brain in acute ischemic stroke patients using slow fusion "
               "with skip connection (seed 002)",
        intended_use=f"{RESEARCH_ONLY} Trained on synthetic patients only; retrain on site data before drawing any conclusion.",
        files=FilesCard(onnx=file_ref(onnx), exported_program=file_ref(program), test_input=file_ref(test_input)),
        inputs=InputsCard(
            tensors=CTP_CONTRACT.tensors, channels=CTP_CONTRACT.channels, clinical=CTP_CONTRACT.clinical,
            in_plane_spacing_mm=_range(spacing[:, 1:].ravel()), slice_spacing_mm=_range(spacing[:, 0]),
            image_size=Range(low=size_multiple, high=1024), size_multiple=size_multiple,
        ),
        outputs=OutputsCard(tensor=CTP_CONTRACT.output, classes=CTP_CONTRACT.classes,
                            restricted_to="brain mask (input 'brain'): outside it the probability of 'healthy' is 1"),
        training=TrainingCard(
            families=plan.families, held_out_family=plan.held_out_family, noise_hu=plan.noise_hu, counts=counts,
            seeds={**plan.seeds(), "training": config.seed}, command=command, duration_s=round(duration_s, 1), machine=machine,
            epochs=len(history.epochs),
            notes=(f"{config.epochs} epochs x {config.steps_per_epoch} steps of {config.batch} crops {config.crop} x {config.crop}, "
                   f"AdamW lr {config.learning_rate:g} one-cycle, NIHSS withheld from {config.nihss_withheld:.0%} of the crops; "
                   f"best validation epoch {history.best_epoch}; torch {torch.__version__}. {notes}"),
        ),
        metrics=tuple(
            MetricRow(split=s.split, family=s.family, noise_hu=s.noise_hu, method=s.method, cls=s.cls, patients=s.patients,
                      dice=round(s.dice, 4), hd95_mm=None if s.hd95_mm is None else round(s.hd95_mm, 2),
                      volume_difference_ml=round(s.volume_difference_ml, 2))
            for s in summaries
        ),
        parity=ParityCard(reference=f"torch {torch.__version__} eager, float32, CPU", max_abs_probability_difference=parity_difference,
                          tolerance=PARITY_TOLERANCE),
    )


def _range(values: np.ndarray) -> Range:
    return Range(low=round(float(values.min()) * (1 - SPACING_TOLERANCE), 4), high=round(float(values.max()) * (1 + SPACING_TOLERANCE), 4))
