"""The model card a final-infarct training run (seed 001) writes beside its weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.export import PARITY_TOLERANCE
from models.training.card import SPACING_TOLERANCE
from models.training.cohort import CohortPlan
from models.training.final_infarct import FinalStudy, FinalSummary, FinalTrainConfig, History
from service.inference.card import (
    RESEARCH_ONLY, FilesCard, InputsCard, MetricRow, ModelCard, OutputsCard, ParityCard, Range, TrainingCard, file_ref,
)
from service.inference.final_infarct_inputs import Scenario, contract


def build_final_card(*, name: str, version: str, scenario: Scenario, plan: CohortPlan, trained: list[FinalStudy],
                     config: FinalTrainConfig, history: History, summaries: list[FinalSummary], files: tuple[Path, Path, Path],
                     parity_difference: float, command: str, duration_s: float, machine: str, size_multiple: int,
                     notes: str) -> ModelCard:
    import torch

    onnx, program, test_input = files
    feeds = contract("mri", scenario)
    spacing = np.array([s.spacing_mm for s in trained])
    counts = {split: len(seeds) for split, seeds in plan.seeds().items()}
    truth = "reperfused (TICI 2b-3)" if scenario is Scenario.REPERFUSED else "not reperfused"
    return ModelCard(
        name=name, version=version, task=feeds.task,
        architecture=(f"late-fusion U-Net: one encoder branch per input ({', '.join(c.name for c in feeds.channels)}; "
                      f"widths {list(config.widths)}, 2 convolution + batch normalisation per block, dropout {config.dropout} at the "
                      "deepest level), the branches concatenated at the bottleneck and fused, one decoder with the branches' features "
                      "as skip connections; softmax over background, healthy, lesion, restricted to the brain mask; weighted "
                      "multi-class Dice loss (lesion x8); final infarct = lesion probability >= 0.5; 2D slices"),
        source="seed 001: reperfusion-status-specific CNNs predicting the final infarct from baseline DWI, ADC, Tmax, CBF and CBV "
               "(late fusion U-Net), compared with the perfusion-diffusion mismatch model",
        intended_use=(f"{RESEARCH_ONLY} Predicts the final infarct if the patient is {truth}. Trained on synthetic patients only; "
                      "retrain on site data before drawing any conclusion."),
        files=FilesCard(onnx=file_ref(onnx), exported_program=file_ref(program), test_input=file_ref(test_input)),
        inputs=InputsCard(
            tensors=feeds.tensors, channels=feeds.channels, clinical=feeds.clinical,
            in_plane_spacing_mm=_range(spacing[:, 1:].ravel()), slice_spacing_mm=_range(spacing[:, 0]),
            image_size=Range(low=size_multiple, high=1024), size_multiple=size_multiple,
        ),
        outputs=OutputsCard(tensor=feeds.output, classes=feeds.classes,
                            restricted_to="brain mask (input 'brain'): outside it the probability of 'background' is 1"),
        training=TrainingCard(
            families=plan.families, held_out_family=plan.held_out_family, noise_hu=(), counts=counts,
            seeds={**plan.seeds(), "training": config.seed}, command=command, duration_s=round(duration_s, 1), machine=machine,
            epochs=len(history.epochs),
            notes=(f"MRI (DWI, ADC, DSC-PWI; SNR drawn 25-45 per patient) analysed by the service's MRI analysis; every training "
                   f"patient against its {truth} final infarct (the phantom knows both). {config.epochs} epochs x "
                   f"{config.steps_per_epoch} steps of {config.batch} slices cropped to {config.crop or 'whole'} pixels, Adam lr {config.learning_rate:g}; best validation "
                   f"epoch {history.best_epoch}; torch {torch.__version__}. {notes}"),
        ),
        metrics=tuple(
            MetricRow(split=s.split, family=s.family, noise_hu=0.0, method="model" if s.method == "model" else "mismatch",
                      cls=f"final infarct, {scenario.value}", patients=s.patients, dice=round(s.dice, 4),
                      hd95_mm=None if s.hd95_mm is None else round(s.hd95_mm, 2), volume_difference_ml=round(s.volume_difference_ml, 2),
                      precision=round(s.precision, 4), recall=round(s.recall, 4),
                      volumetric_similarity=round(s.volumetric_similarity, 4), auc=None if s.auc is None else round(s.auc, 4))
            for s in summaries
        ),
        parity=ParityCard(reference=f"torch {torch.__version__} eager, float32, CPU", max_abs_probability_difference=parity_difference,
                          tolerance=PARITY_TOLERANCE),
    )


def _range(values: np.ndarray) -> Range:
    return Range(low=round(float(values.min()) * (1 - SPACING_TOLERANCE), 4), high=round(float(values.max()) * (1 + SPACING_TOLERANCE), 4))
