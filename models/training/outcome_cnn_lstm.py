"""``python -m models.training train-outcome-cnn-lstm``: seed 000's CNN-LSTM modules (one per MRI
map: ADC, DWI, Tmax, CBF, CBV) and their NIHSS-weighted fusion (Algorithm 1), on the same
synthetic patients and splits as the CRD model. Modules and Algorithm 1's thresholds are fitted
on parts A and B together (no combiner to keep apart); evaluation on test and held-out patients,
the fusion against the plain average of the modules.
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
from models.training.outcome_metrics import OutcomeScore, score
from models.training.outcome_report import score_table
from service.analysis.outcome_fusion import FusionParameters, fuse, youden_threshold
from service.inference.card import RESEARCH_ONLY
from service.inference.outcome_card import FusionCard, NetworkFile, OutcomeEvaluation, write_fusion_card
from service.inference.outcome_inputs import MRI_MAPS, network_maps, triplets

MODEL_NAME = "outcome-cnn-lstm"
MODEL_VERSION = "0.1.0"


@dataclass(frozen=True)
class ModuleConfig:
    epochs: int = 12
    batch: int = 16
    learning_rate: float = 1e-3
    seed: int = 0
    threads: int = 2


def module_inputs(cohort: OutcomeCohort, index: int) -> np.ndarray:
    """[N, Z - 2, 3, 64, 64] slice triplets of map ``MRI_MAPS[index]`` of every patient."""
    out = []
    for i in range(len(cohort)):
        maps = {name: cohort.maps[i, k].astype(np.float32) for k, name in enumerate(MRI_MAPS)}
        out.append(triplets(network_maps(maps, cohort.brain[i], (MRI_MAPS[index],))[0]))
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
    """ONNX (input ``triplets``, output ``logit``, dynamic batch); the largest torch/ONNX Runtime difference."""
    import onnxruntime

    network.eval()
    batch = torch.export.Dim("batch", min=1, max=256)
    program = torch.onnx.export(network, (torch.from_numpy(example),), dynamo=True, input_names=["triplets"], output_names=["logit"],
                                dynamic_shapes={"triplets": {0: batch}}, opset_version=18, external_data=False)
    program.save(str(path), external_data=False)
    with torch.no_grad():
        reference = network(torch.from_numpy(example)).numpy()
    got = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logit"], {"triplets": example})[0]
    return float(np.abs(reference - got).max())


def run(families: list[str], held_out_family: str, patients: int, test: int, config: ModuleConfig, data: Path, weights: Path,
        console: Console) -> Path:
    started, load_start = time.perf_counter(), os.getloadavg()
    command = "python -m models.training " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    parts = {f: split(family_block(f, patients, data, jobs=2), f == held_out_family, test) for f in families}
    fit = concatenate([c for p in parts.values() for name, c in p.items() if name in ("A", "B")])
    evaluated = [(f, name, c) for f, p in parts.items() for name, c in p.items() if name in ("test", "held-out")]
    weights.mkdir(parents=True, exist_ok=True)
    modules, train_p, eval_p, files = [], [], [[] for _ in evaluated], []
    for index, name in enumerate(MRI_MAPS):
        x = module_inputs(fit, index)
        network, losses = train_module(x, fit.poor.astype(int), ModuleConfig(**{**config.__dict__, "seed": config.seed + index}))
        console.print(f"  module {name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        train_p.append(module_probabilities(network, x))
        for k, (_, _, cohort) in enumerate(evaluated):
            eval_p[k].append(module_probabilities(network, module_inputs(cohort, index)))
        path = weights / f"{MODEL_NAME}-{name}.onnx"
        difference = export_module(network, x[:2], path)
        files.append(NetworkFile(file=path.name, sha256=hashlib.sha256(path.read_bytes()).hexdigest(), input="triplets",
                                 input_shape=("batch", "triplets", 3, 64, 64), output="logit", maps=(name,), parity=difference))
        modules.append(network)
    trained_s = time.perf_counter() - started
    train_matrix = np.stack(train_p, axis=1)
    thresholds = tuple(youden_threshold(train_matrix[:, i], fit.poor) for i in range(len(MRI_MAPS)))
    parameters = FusionParameters(thresholds, float(fit.nihss.min()), float(fit.nihss.max()))
    scores: list[OutcomeScore] = []
    for k, (family, split_name, cohort) in enumerate(evaluated):
        p = np.stack(eval_p[k], axis=1)
        for i, name in enumerate(MRI_MAPS):
            scores.append(score(f"module {name}", split_name, family, p[:, i], cohort.poor, cohort.p_admission))
        scores.append(score("plain average", split_name, family, p.mean(axis=1), cohort.poor, cohort.p_admission))
        scores.append(score("Algorithm 1 (NIHSS)", split_name, family, fuse(p, cohort.nihss, parameters), cohort.poor, cohort.p_admission))
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch on {config.threads} threads; load average {load_start[0]:.1f} at the start"
    card = FusionCard(
        name=MODEL_NAME, version=MODEL_VERSION, intended_use=f"{RESEARCH_ONLY} Trained and tested on synthetic patients only.",
        outcome="P(mRS 3-6 at 90 days)", modules=tuple(files), thresholds=thresholds, nihss_low=parameters.nihss_low,
        nihss_high=parameters.nihss_high,
        evaluation=tuple(OutcomeEvaluation(model=s.model, split=s.split, family=s.family, patients=s.patients, auc=s.auc,
                                           ceiling_auc=s.ceiling_auc, calibration_slope=s.calibration_slope,
                                           calibration_intercept=s.calibration_intercept, brier=s.brier) for s in scores),
        training={"command": command, "families": families, "held_out_family": held_out_family, "patients_per_family": patients,
                  "fitted_on": len(fit), "epochs": config.epochs, "seed": config.seed, "minutes": round(trained_s / 60, 1), "machine": machine},
    )
    card_path = write_fusion_card(card, weights / f"{MODEL_NAME}.card.json")
    lines = [f"# {MODEL_NAME} {MODEL_VERSION}: seed 000's CNN-LSTM modules fused by Algorithm 1", "",
             f"**{RESEARCH_ONLY}** Trained and tested on synthetic patients only.", "",
             f"Made by `{command}` in {trained_s / 60:.1f} min (dataset cached by the CRD model's command) on {machine}.",
             f"Fitted on {len(fit)} patients of {[f for f in families if f != held_out_family]}; held out: {held_out_family}. "
             f"Thresholds tau {', '.join(f'{t:.2f}' for t in thresholds)}; NIHSS normalised over {parameters.nihss_low:g}-{parameters.nihss_high:g}. "
             f"Parity torch / ONNX Runtime: {max(f.parity for f in files):.1e}.", "", *score_table(scores), ""]
    report = weights / f"{MODEL_NAME}.report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    console.print(f"wrote {card_path}, {report} in {trained_s / 60:.1f} min")
    for s in scores:
        if s.model in ("plain average", "Algorithm 1 (NIHSS)"):
            console.print(f"  {s.model:22s} {s.split:8s} {s.family:18s} AUC {s.auc:.3f} ceiling {s.ceiling_auc:.3f} ({s.of_ceiling:.2f}) slope {s.calibration_slope:.2f}")
    return report
