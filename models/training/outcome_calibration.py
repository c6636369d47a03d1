"""``python -m models.training outcome-calibration``: both shipped outcome models, run through the
service's own code (ONNX Runtime, the cards), on the test and held-out patients of the cached
outcome dataset: AUC against the admission ceiling and the calibration slope per family and pooled,
each slope with its 95 % bootstrap interval. A Markdown table in models/weights.

The models are not refitted here: this checks the shipped files on the patients their training
command kept apart, with the same splits (``outcome_command.split``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from models.training.outcome_command import split
from models.training.outcome_data import MRI_MAPS, OutcomeCohort, concatenate, family_block, outcome_geometry
from models.training.outcome_metrics import calibration, slope_interval
from service.analysis.outcome_cnn_lstm import DEFAULT_FUSION_CARD, CnnLstmOutcomeModel
from service.analysis.outcome_model import DEFAULT_CARD, CrdOutcomeModel, OutcomeInputs
from service.findings import NihssSource, NihssUsed
from service.phantom.clinical import roc_auc

SLOPE_RANGE = (0.8, 1.2)


def study_inputs(cohort: OutcomeCohort, index: int, with_nihss: bool = True) -> OutcomeInputs:
    """One patient of the dataset as the service's outcome models take a study."""
    from datetime import datetime

    maps = {name: cohort.maps[index, k].astype(np.float32) for k, name in enumerate(MRI_MAPS)}
    nihss = NihssUsed(int(cohort.nihss[index]), NihssSource.REST, "dataset", datetime(2026, 1, 1), datetime(2026, 1, 1)) \
        if with_nihss else None
    spacing = tuple(float(s) for s in outcome_geometry().spacing)
    return OutcomeInputs(maps, cohort.brain[index], cohort.core[index], cohort.hypoperfused[index], spacing,
                         float(cohort.age[index]), bool(cohort.sex_female[index]), nihss)


def run(families: list[str], held_out_family: str, patients: int, test: int, data: Path, weights: Path, console: Console) -> Path:
    started, load_start = time.perf_counter(), os.getloadavg()
    crd, fusion = CrdOutcomeModel(weights / DEFAULT_CARD.name), CnnLstmOutcomeModel(weights / DEFAULT_FUSION_CARD.name)
    evaluated: list[tuple[str, str, OutcomeCohort]] = []
    for family in families:
        parts = split(family_block(family, patients, data, jobs=2), family == held_out_family, test)
        evaluated += [(family, name, c) for name, c in parts.items() if name in ("test", "held-out")]
    models = {f"{crd.info.name} {crd.info.version}": lambda s: crd.predict(s).probability,
              f"{fusion.info.name} {fusion.info.version}": lambda s: fusion.predict(s).probability}
    predictions: dict[str, list[np.ndarray]] = {name: [] for name in models}
    for _, _, cohort in evaluated:
        inputs = [study_inputs(cohort, i) for i in range(len(cohort))]
        for name, predict in models.items():
            predictions[name].append(np.array([predict(s) for s in inputs]))
    rows = ["| model | split | family | patients | AUC | admission ceiling | AUC / ceiling | calibration slope | 95 % interval | intercept |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    pooled_slopes = {}
    for name in models:
        for k, (family, split_name, cohort) in enumerate(evaluated):
            rows.append(_row(name, split_name, family + (" (held out)" if split_name == "held-out" else ""),
                             predictions[name][k], cohort.poor, cohort.p_admission))
        everyone = concatenate([c for _, _, c in evaluated])
        p = np.concatenate(predictions[name])
        rows.append(_row(name, "all evaluated", "pooled", p, everyone.poor, everyone.p_admission, bold=True))
        pooled_slopes[name] = calibration(p, everyone.poor)[0]
    verdict = "; ".join(f"{name}: pooled slope {slope:.2f} " + ("inside" if SLOPE_RANGE[0] <= slope <= SLOPE_RANGE[1] else "OUTSIDE")
                        + f" {SLOPE_RANGE[0]}-{SLOPE_RANGE[1]}" for name, slope in pooled_slopes.items())
    minutes = (time.perf_counter() - started) / 60
    lines = ["# The shipped outcome models on the test and held-out patients", "",
             "**Research use only. Not for diagnosis.** Synthetic patients only.", "",
             f"Through the service's code (ONNX Runtime and the cards in {weights}), {len(everyone)} patients "
             f"(test: the first {test} of each training family; held out: all {patients} of {held_out_family}), "
             f"with each patient's NIHSS. Bootstrap: 400 resamples of the patients. {minutes:.1f} min, load average "
             f"{load_start[0]:.1f} at the start.", "", verdict + ".", "", *rows, ""]
    out = weights / "outcome-calibration.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    console.print(verdict)
    for row in rows[2:]:
        console.print(row)
    return out


def _row(name: str, split_name: str, family: str, p: np.ndarray, poor: np.ndarray, p_admission: np.ndarray, bold: bool = False) -> str:
    slope, intercept = calibration(p, poor)
    low, high = slope_interval(p, poor)
    auc, ceiling = roc_auc(p, poor), roc_auc(p_admission, poor)
    shown = f"**{slope:.2f}**" if bold else f"{slope:.2f}"
    return (f"| {name} | {split_name} | {family} | {len(p)} | {auc:.3f} | {ceiling:.3f} | {auc / ceiling:.2f} | {shown} | "
            f"{low:.2f}-{high:.2f} | {intercept:+.2f} |")
