"""``python -m models.training train-outcome-crd``: seed 004's CRD outcome model from scratch.

synthetic patients (cached under build/datasets/outcome) -> features -> components and combiner
-> evaluation against the admission ceiling per family -> ONNX (the ResNet), card JSON (the
coefficients), report with nomogram, calibration and decision curves, in models/weights.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from models.training.outcome_crd import CLINICAL, DeepConfig, component_scores, features, fit_crd, probabilities
from models.training.outcome_data import OutcomeCohort, concatenate, family_block, outcome_geometry
from models.training.outcome_metrics import OutcomeScore, score
from models.training.outcome_report import calibration_png, decision_curve_png, nomogram_png, score_table
from service.analysis.outcome_radiomics import feature_names
from service.inference.card import RESEARCH_ONLY
from service.inference.outcome_card import NetworkFile, OutcomeCard, OutcomeEvaluation, write_outcome_card
from service.inference.outcome_inputs import MRI_MAPS

MODEL_NAME = "outcome-crd"
MODEL_VERSION = "0.1.0"


def split(cohort: OutcomeCohort, held_out: bool, test: int) -> dict[str, OutcomeCohort]:
    """Held-out family: all test. Others: the first ``test`` patients test, then A (two thirds) and B."""
    n = len(cohort)
    if held_out:
        return {"held-out": cohort}
    rest = np.arange(test, n)
    cut = test + (2 * len(rest)) // 3
    return {"test": cohort.take(np.arange(test)), "A": cohort.take(np.arange(test, cut)), "B": cohort.take(np.arange(cut, n))}


def run(families: list[str], held_out_family: str, patients: int, test: int, config: DeepConfig, data: Path, weights: Path,
        console: Console) -> Path:
    started, load_start = time.perf_counter(), os.getloadavg()
    command = "python -m models.training " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    parts: dict[str, dict[str, OutcomeCohort]] = {}
    for family in families:
        block = family_block(family, patients, data, jobs=2,
                             on_chunk=lambda f, k, sec: console.print(f"  {f} chunk {k}: {sec:.0f} s"))
        parts[family] = split(block, family == held_out_family, test)
    dataset_s = time.perf_counter() - started
    console.print(f"dataset: {sum(len(c) for p in parts.values() for c in p.values())} patients in {dataset_s / 60:.1f} min")

    spacing = tuple(float(s) for s in outcome_geometry().spacing)
    part_a = concatenate([p["A"] for p in parts.values() if "A" in p])
    part_b = concatenate([p["B"] for p in parts.values() if "B" in p])
    fa, fb = features(part_a, spacing), features(part_b, spacing)
    model = fit_crd(fa, fb, config, on_epoch=lambda e, loss: console.print(f"  ResNet epoch {e}: loss {loss:.3f}") if e % 5 == 0 else None)
    trained_s = time.perf_counter() - started
    console.print(f"fitted in {(trained_s - dataset_s) / 60:.1f} min; LASSO kept {len(model.radiomics.names)} of {len(feature_names(MRI_MAPS))} features")

    scores: list[OutcomeScore] = []
    pooled: dict[str, list[np.ndarray]] = {}
    pooled_poor: list[np.ndarray] = []
    for family, p in parts.items():
        for split_name in ("test", "held-out"):
            if split_name not in p:
                continue
            cohort = p[split_name]
            predictions = probabilities(model, features(cohort, spacing))
            for name, values in predictions.items():
                scores.append(score(name, split_name, family, values, cohort.poor, cohort.p_admission))
                pooled.setdefault(name, []).append(values)
            pooled_poor.append(cohort.poor)
    poor = np.concatenate(pooled_poor)
    merged = {name: np.concatenate(v) for name, v in pooled.items()}

    weights.mkdir(parents=True, exist_ok=True)
    onnx_path, difference = export_deep(model.network, fb.slabs[:4], weights / f"{MODEL_NAME}-resnet.onnx")
    ranges = {"nihss": (0.0, 35.0), "age": (30.0, 95.0), "sex_female": (0.0, 1.0)}
    b_scores = component_scores(model, fb)
    ranges["radiomics"] = (float(np.percentile(b_scores["radiomics"], 2)), float(np.percentile(b_scores["radiomics"], 98)))
    ranges["deep"] = (float(np.percentile(b_scores["deep"], 2)), float(np.percentile(b_scores["deep"], 98)))
    nomogram = nomogram_png(model.clinical, model.combined, ranges, weights / f"{MODEL_NAME}.nomogram.png")
    calibration = calibration_png(merged, poor, weights / f"{MODEL_NAME}.calibration.png")
    decision = decision_curve_png(merged, poor, weights / f"{MODEL_NAME}.decision.png")
    total_s = time.perf_counter() - started
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch on {config.threads} threads; load average "
               f"{load_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    card = OutcomeCard(
        name=MODEL_NAME, version=MODEL_VERSION, intended_use=f"{RESEARCH_ONLY} Trained and tested on synthetic patients only.",
        outcome="P(mRS 3-6 at 90 days)", clinical=model.clinical, clinical_imaging_only=model.clinical_imaging_only,
        radiomics=model.radiomics,
        deep=NetworkFile(file=onnx_path.name, sha256=hashlib.sha256(onnx_path.read_bytes()).hexdigest(), input="slab",
                         input_shape=("batch", 3 * len(MRI_MAPS), 64, 64), output="deep_score", maps=MRI_MAPS, parity=difference),
        combined=model.combined, combined_imaging_only=model.combined_imaging_only,
        evaluation=tuple(OutcomeEvaluation(model=s.model, split=s.split, family=s.family, patients=s.patients, auc=s.auc,
                                           ceiling_auc=s.ceiling_auc, calibration_slope=s.calibration_slope,
                                           calibration_intercept=s.calibration_intercept, brier=s.brier) for s in scores),
        training={"command": command, "families": families, "held_out_family": held_out_family, "patients_per_family": patients,
                  "test_per_family": test, "part_a": len(part_a), "part_b": len(part_b), "seed": config.seed, "epochs": config.epochs,
                  "minutes": round(trained_s / 60, 1), "minutes_with_evaluation": round(total_s / 60, 1), "machine": machine,
                  "clinical_inputs": list(CLINICAL)},
    )
    card_path = write_outcome_card(card, weights / f"{MODEL_NAME}.card.json")
    lines = [f"# {MODEL_NAME} {MODEL_VERSION}: seed 004's clinical-radiomics-deep learning model", "",
             f"**{RESEARCH_ONLY}** Trained and tested on synthetic patients only.", "",
             f"Made by `{command}` in {trained_s / 60:.1f} min (dataset {dataset_s / 60:.1f} min, fitting "
             f"{(trained_s - dataset_s) / 60:.1f} min), {total_s / 60:.1f} min with evaluation and export, on {machine}.",
             f"Families {families}, held out: {held_out_family}; {patients} patients per family; part A {len(part_a)}, "
             f"part B {len(part_b)}. Parity torch / ONNX Runtime of the ResNet: {difference:.1e}.",
             f"Radiomics: numpy/scipy/scikit-image region features (pyradiomics has no wheel here); LASSO kept "
             f"{len(model.radiomics.names)} of {len(feature_names(MRI_MAPS))}: {', '.join(model.radiomics.names)}.",
             "Components and combiners cross-fitted over parts A and B (models/training/outcome_crd.py); the shipped components are fitted on A and B together.", "",
             "## Against the admission ceiling", "",
             "The ceiling is the AUC, on the same patients, of the phantom's own outcome model with reperfusion and "
             "sICH integrated out (service.phantom.clinical.admission_probability).", "",
             *score_table(scores), "",
             f"![nomogram]({nomogram.name})", "", f"![calibration]({calibration.name})", "", f"![decision curve]({decision.name})", ""]
    report = weights / f"{MODEL_NAME}.report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    console.print(f"wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.2f} MB), {card_path}, {report}")
    for s in scores:
        if s.model in ("CRD", "CRD, NIHSS not available"):
            console.print(f"  {s.model:26s} {s.split:8s} {s.family:18s} AUC {s.auc:.3f} ceiling {s.ceiling_auc:.3f} "
                          f"({s.of_ceiling:.2f}) slope {s.calibration_slope:.2f}")
    return report


def export_deep(network, example: np.ndarray, path: Path) -> tuple[Path, float]:
    """The ResNet as ONNX (input ``slab``, output ``deep_score``, dynamic batch) and the largest
    difference of its scores, torch against ONNX Runtime, on ``example``; a test input beside it."""
    import onnxruntime
    import torch

    network.eval()
    batch = torch.export.Dim("batch", min=1, max=256)
    program = torch.onnx.export(network, (torch.from_numpy(example),), dynamo=True, input_names=["slab"], output_names=["deep_score"],
                                dynamic_shapes={"slab": {0: batch}}, opset_version=18, external_data=False)
    program.save(str(path), external_data=False)
    with torch.no_grad():
        reference = network(torch.from_numpy(example)).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["deep_score"], {"slab": example})[0]
    np.savez_compressed(path.with_suffix(".test.npz"), slab=example, deep_score=reference.astype(np.float32))
    return path, float(np.abs(reference - got).max())

