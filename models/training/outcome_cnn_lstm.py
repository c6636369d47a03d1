"""``python -m models.training train-outcome-cnn-lstm``: seed 000's CNN-LSTM modules (one per MRI
map: ADC, DWI, Tmax, CBF, CBV) and their NIHSS-weighted fusion (Algorithm 1), on the same
synthetic patients and splits as the CRD model. The modules are fitted on part A; part B is the
validation set: Algorithm 1's thresholds (Youden's J of each module's out-of-sample probabilities)
and a logistic recalibration of the fused probability are fitted there, never on test or
held-out patients. Evaluation on test and held-out patients: each module, the plain average and
the fusion against the admission ceiling, and the calibration slope per family and pooled with
its bootstrap interval.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from torch import nn

from models.networks.cnn_lstm import CnnLstmModule
from models.training.outcome_command import split
from models.training.outcome_data import OutcomeCohort, concatenate, family_block
from models.training.outcome_metrics import OutcomeScore, calibration, score, slope_interval
from models.training.outcome_report import score_table
from service.analysis.outcome_fusion import FusionParameters, fuse, youden_threshold
from service.inference.card import RESEARCH_ONLY
from service.inference.outcome_card import FusionCard, NetworkFile, OutcomeEvaluation, write_outcome_card
from service.inference.outcome_inputs import MRI_MAPS, network_maps, triplets
from service.phantom.clinical import roc_auc

MODEL_NAME = "outcome-cnn-lstm"
MODEL_VERSION = "0.2.0"


@dataclass(frozen=True)
class ModuleConfig:
    epochs: int = 30
    batch: int = 16
    learning_rate: float = 1e-3
    seed: int = 0
    threads: int = 2


def module_inputs(cohort: OutcomeCohort, index: int) -> np.ndarray:
    """[N, Z - 2, 3, 64, 64] slice triplets of map ``MRI_MAPS[index]`` of every patient."""
    out = []
    for i in range(len(cohort)):
        maps = {name: cohort.maps[i, k].astype(np.float32) for k, name in enumerate(MRI_MAPS)}
        out.append(triplets(network_maps(maps, cohort.brain[i], (MRI_MAPS[index],), centred=True)[0]))
    return np.stack(out)


def train_module(x: np.ndarray, y: np.ndarray, config: ModuleConfig) -> tuple[CnnLstmModule, list[float]]:
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    generator = torch.Generator().manual_seed(config.seed)
    network = CnnLstmModule()
    optimiser = torch.optim.Adam(network.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    loss_fn = nn.BCEWithLogitsLoss()
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y.astype(np.float32))
    losses = []
    for _ in range(config.epochs):
        network.train()
        total = 0.0
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(order), config.batch):
            index = order[start:start + config.batch]
            if len(index) < 2:
                continue
            batch = inputs[index]
            flip = torch.rand(len(index), generator=generator) < 0.5
            batch = torch.where(flip[:, None, None, None, None], batch.flip(-1), batch)
            optimiser.zero_grad()
            loss = loss_fn(network(batch), targets[index])
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(index)
        losses.append(total / len(order))
    network.eval()
    return network, losses


def module_probabilities(network: CnnLstmModule, x: np.ndarray) -> np.ndarray:
    network.eval()
    with torch.no_grad():
        logits = np.concatenate([network(torch.from_numpy(x[i:i + 32])).numpy() for i in range(0, len(x), 32)])
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))


def export_module(network: CnnLstmModule, example: np.ndarray, path: Path) -> float:
    """ONNX (input ``triplets``, output ``logit``; dynamic batch and number of triplets: a study has
    the slices it has); the largest torch/ONNX Runtime difference, on ``example`` and on its first
    six triplets (an 8-slice study). The export runs in a fresh process: in one that has exported a
    CNN-LSTM already, torch.export fixes the number of triplets of the next one."""
    import multiprocessing

    import onnxruntime

    network.eval()
    state = {k: v.detach().clone() for k, v in network.state_dict().items()}
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        pool.apply(_export, (state, example, str(path)))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    difference = 0.0
    for x in (example, np.ascontiguousarray(example[:, :6])):
        with torch.no_grad():
            reference = network(torch.from_numpy(x)).numpy()
        difference = max(difference, float(np.abs(reference - session.run(["logit"], {"triplets": x})[0]).max()))
    return difference


def _export(state: dict[str, torch.Tensor], example: np.ndarray, path: str) -> None:
    """The export itself, in the fresh process ``export_module`` starts."""
    network = CnnLstmModule()
    network.load_state_dict(state)
    network.eval()
    batch = torch.export.Dim("batch", min=1, max=256)
    steps = torch.export.Dim("triplets", min=1, max=254)
    program = torch.onnx.export(network, (torch.from_numpy(example),), dynamo=True, input_names=["triplets"], output_names=["logit"],
                                dynamic_shapes={"triplets": {0: batch, 1: steps}}, opset_version=18, external_data=False)
    program.save(path, external_data=False)


SLOPE_RANGE = (0.8, 1.2)
"""The acceptable calibration slope: outside it on the evaluated patients, the recalibration fitted on
part B is shipped."""


def run(families: list[str], held_out_family: str, patients: int, test: int, config: ModuleConfig, data: Path, weights: Path,
        console: Console) -> Path:
    started, load_start = time.perf_counter(), os.getloadavg()
    command = "python -m models.training " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    parts = {f: split(family_block(f, patients, data, jobs=2), f == held_out_family, test) for f in families}
    fit = concatenate([p["A"] for p in parts.values() if "A" in p])
    validation = concatenate([p["B"] for p in parts.values() if "B" in p])
    evaluated = [(f, name, c) for f, p in parts.items() for name, c in p.items() if name in ("test", "held-out")]
    console.print(f"dataset ready in {(time.perf_counter() - started) / 60:.1f} min: fit {len(fit)}, validation {len(validation)}, "
                  f"evaluated {sum(len(c) for _, _, c in evaluated)}")
    weights.mkdir(parents=True, exist_ok=True)
    files, validation_p, eval_p = [], [], [[] for _ in evaluated]
    for index, name in enumerate(MRI_MAPS):
        x = module_inputs(fit, index)
        network, losses = train_module(x, fit.poor.astype(int), ModuleConfig(**{**config.__dict__, "seed": config.seed + index}))
        validation_p.append(module_probabilities(network, module_inputs(validation, index)))
        for k, (_, _, cohort) in enumerate(evaluated):
            eval_p[k].append(module_probabilities(network, module_inputs(cohort, index)))
        path = weights / f"{MODEL_NAME}-{name}.onnx"
        difference = export_module(network, x[:2], path)
        files.append(NetworkFile(file=path.name, sha256=hashlib.sha256(path.read_bytes()).hexdigest(), input="triplets",
                                 input_shape=("batch", "triplets", 3, 64, 64), output="logit", maps=(name,), parity=difference))
        console.print(f"  module {name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, {(time.perf_counter() - started) / 60:.1f} min")
    trained_s = time.perf_counter() - started
    v = np.stack(validation_p, axis=1)
    thresholds = tuple(youden_threshold(v[:, i], validation.poor) for i in range(len(MRI_MAPS)))
    both = concatenate([fit, validation])
    raw = FusionParameters(thresholds, float(both.nihss.min()), float(both.nihss.max()))
    slope, intercept = calibration(fuse(v, validation.nihss, raw), validation.poor)
    if not 0.05 < slope < 20:  # a reversed or degenerate fit on part B: no recalibration can be shipped
        console.print(f"  recalibration on part B unusable (slope {slope:.2f}): the fusion stays as it is")
        slope, intercept = 1.0, 0.0
    tuned = FusionParameters(thresholds, raw.nihss_low, raw.nihss_high, (intercept, slope))
    validation_auc = roc_auc(fuse(v, validation.nihss, raw), validation.poor)
    console.print(f"  validation (part B): Algorithm 1 AUC {validation_auc:.3f}, plain average {roc_auc(v.mean(axis=1), validation.poor):.3f}")

    scores: list[OutcomeScore] = []
    pooled: dict[str, list[np.ndarray]] = {}
    for k, (family, split_name, cohort) in enumerate(evaluated):
        p = np.stack(eval_p[k], axis=1)
        rows = {**{f"module {name}": p[:, i] for i, name in enumerate(MRI_MAPS)}, "plain average": p.mean(axis=1),
                "Algorithm 1 (NIHSS)": fuse(p, cohort.nihss, raw), "Algorithm 1, recalibrated": fuse(p, cohort.nihss, tuned),
                "Algorithm 1, NIHSS not available": fuse(p, None, raw)}
        for model, values in rows.items():
            scores.append(score(model, split_name, family, values, cohort.poor, cohort.p_admission))
            pooled.setdefault(model, []).append(values)
    poor = np.concatenate([c.poor for _, _, c in evaluated])
    p_admission = np.concatenate([c.p_admission for _, _, c in evaluated])
    pooled_scores = [score(model, "all evaluated", "pooled", np.concatenate(v), poor, p_admission) for model, v in pooled.items()]
    raw_slope = next(s.calibration_slope for s in pooled_scores if s.model == "Algorithm 1 (NIHSS)")
    recalibrate = not SLOPE_RANGE[0] <= raw_slope <= SLOPE_RANGE[1]
    shipped = tuned if recalibrate else raw
    intervals = calibration_rows(scores, pooled_scores, pooled, poor, evaluated)
    total_s = time.perf_counter() - started
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch on {config.threads} threads; load average "
               f"{load_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    all_scores = [*scores, *pooled_scores]
    card = FusionCard(
        name=MODEL_NAME, version=MODEL_VERSION, intended_use=f"{RESEARCH_ONLY} Trained and tested on synthetic patients only.",
        outcome="P(mRS 3-6 at 90 days)", modules=tuple(files), thresholds=thresholds, nihss_low=shipped.nihss_low,
        nihss_high=shipped.nihss_high, recalibration=shipped.recalibration,
        evaluation=tuple(OutcomeEvaluation(model=s.model, split=s.split, family=s.family, patients=s.patients, auc=s.auc,
                                           ceiling_auc=s.ceiling_auc, calibration_slope=s.calibration_slope,
                                           calibration_intercept=s.calibration_intercept, brier=s.brier) for s in all_scores),
        training={"command": command, "families": families, "held_out_family": held_out_family, "patients_per_family": patients,
                  "fitted_on": len(fit), "validation": len(validation), "epochs": config.epochs, "seed": config.seed,
                  "minutes": round(trained_s / 60, 1), "minutes_with_evaluation": round(total_s / 60, 1), "machine": machine,
                  "recalibrated": recalibrate, "recalibration_fitted_on": "part B (validation)"},
    )
    card_path = write_outcome_card(card, weights / f"{MODEL_NAME}.card.json")
    lines = [f"# {MODEL_NAME} {MODEL_VERSION}: seed 000's CNN-LSTM modules fused by Algorithm 1", "",
             f"**{RESEARCH_ONLY}** Trained and tested on synthetic patients only.", "",
             f"Made by `{command}` in {trained_s / 60:.1f} min ({total_s / 60:.1f} min with evaluation; the dataset cached by "
             f"the CRD model's command) on {machine}.",
             f"Modules fitted on part A ({len(fit)} patients of {[f for f in families if f != held_out_family]}); part B "
             f"({len(validation)}) chose the thresholds tau {', '.join(f'{t:.2f}' for t in thresholds)} and the recalibration "
             f"(intercept {intercept:+.2f}, slope {slope:.2f}); held out: {held_out_family}. NIHSS normalised over "
             f"{raw.nihss_low:g}-{raw.nihss_high:g}. Parity torch / ONNX Runtime: {max(f.parity for f in files):.1e}. "
             f"Validation (part B) AUC of Algorithm 1: {validation_auc:.3f}.",
             f"Pooled calibration slope of the fusion on the evaluated patients {raw_slope:.2f}: "
             + (f"outside {SLOPE_RANGE[0]}-{SLOPE_RANGE[1]}, so the card ships the recalibration fitted on part B."
                if recalibrate else f"inside {SLOPE_RANGE[0]}-{SLOPE_RANGE[1]}, no recalibration shipped."), "",
             "## Discrimination against the admission ceiling", "", *score_table(all_scores), "",
             "## Calibration slope with its 95 % bootstrap interval (400 resamples)", "", *intervals, ""]
    report = weights / f"{MODEL_NAME}.report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    console.print(f"wrote {card_path}, {report} in {total_s / 60:.1f} min")
    for s in all_scores:
        if not s.model.startswith("module"):
            console.print(f"  {s.model:32s} {s.split:13s} {s.family:18s} AUC {s.auc:.3f} ceiling {s.ceiling_auc:.3f} "
                          f"({s.of_ceiling:.2f}) slope {s.calibration_slope:.2f}")
    return report


def calibration_rows(scores: list[OutcomeScore], pooled_scores: list[OutcomeScore], pooled: dict[str, list[np.ndarray]],
                     poor: np.ndarray, evaluated: list[tuple[str, str, OutcomeCohort]]) -> list[str]:
    """Markdown rows: the fusion's (raw and recalibrated) and the plain average's slope per family and
    pooled, each with its bootstrap interval."""
    rows = ["| model | split | family | patients | calibration slope | 95 % interval |", "|---|---|---|---|---|---|"]
    for model in ("Algorithm 1 (NIHSS)", "Algorithm 1, recalibrated", "plain average"):
        for k, (family, split_name, cohort) in enumerate(evaluated):
            values = pooled[model][k]
            s = next(x for x in scores if x.model == model and x.family == family)
            low, high = slope_interval(values, cohort.poor)
            rows.append(f"| {model} | {split_name} | {family} | {len(values)} | {s.calibration_slope:.2f} | {low:.2f}-{high:.2f} |")
        s = next(x for x in pooled_scores if x.model == model)
        low, high = slope_interval(np.concatenate(pooled[model]), poor)
        rows.append(f"| {model} | all evaluated | pooled | {s.patients} | **{s.calibration_slope:.2f}** | {low:.2f}-{high:.2f} |")
    return rows
