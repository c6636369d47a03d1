"""The outcome models' training report: the table against the admission ceiling, and the CRD
model's nomogram, calibration curve and decision curve (PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from models.training.outcome_metrics import OutcomeScore, calibration_curve, net_benefit
from service.inference.outcome_card import LinearScore


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)  # its own canvas, not pyplot's shared state
    return figure


def score_table(scores: list[OutcomeScore]) -> list[str]:
    rows = ["| model | split | family | patients | poor | AUC | admission ceiling | AUC / ceiling | calibration slope | intercept | Brier |",
            "|---" * 11 + "|"]
    for s in scores:
        rows.append(f"| {s.model} | {s.split} | {s.family} | {s.patients} | {s.poor_fraction:.2f} | **{s.auc:.3f}** | {s.ceiling_auc:.3f} | "
                    f"{s.of_ceiling:.2f} | {s.calibration_slope:.2f} | {s.calibration_intercept:+.2f} | {s.brier:.3f} |")
    return rows


def calibration_png(predictions: dict[str, np.ndarray], poor: np.ndarray, path: Path) -> Path:
    figure = _figure(4.8, 4.5)
    axis = figure.subplots()
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", label="ideal")
    for name, p in predictions.items():
        predicted, observed, _ = calibration_curve(p, poor)
        axis.plot(predicted, observed, marker="o", label=name)
    axis.set(xlabel="predicted P(mRS 3-6)", ylabel="observed fraction mRS 3-6", title="Calibration (test + held-out)", xlim=(0, 1), ylim=(0, 1))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def decision_curve_png(predictions: dict[str, np.ndarray], poor: np.ndarray, path: Path) -> Path:
    thresholds = np.linspace(0.05, 0.9, 60)
    figure = _figure(5.5, 4.2)
    axis = figure.subplots()
    prevalence = float(np.mean(poor))
    axis.plot(thresholds, prevalence - (1 - prevalence) * thresholds / (1 - thresholds), color="grey", label="treat all")
    axis.axhline(0, color="black", linewidth=0.8, label="treat none")
    for name, p in predictions.items():
        axis.plot(thresholds, net_benefit(p, poor, thresholds), label=name)
    axis.set(xlabel="threshold probability", ylabel="net benefit", title="Decision curve (test + held-out)", ylim=(-0.05, max(prevalence, 0.05) + 0.05))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def nomogram_png(clinical: LinearScore, combined: LinearScore, ranges: dict[str, tuple[float, float]], path: Path) -> Path:
    """Points per predictor (NIHSS, age, sex from the clinical score; rad-score; deep score), their
    total, and the probability it maps to. Points: 100 for the predictor with the widest effect."""
    weight = dict(zip(combined.names, combined.coefficients, strict=True))
    effects: dict[str, tuple[float, float, float]] = {}  # name -> (low, high, logit change per unit)
    for name, mean, scale, coefficient in zip(clinical.names, clinical.mean, clinical.scale, clinical.coefficients, strict=True):
        effects[name] = (*ranges[name], weight["clinical"] * coefficient / scale)
    effects["rad-score"] = (*ranges["radiomics"], weight["radiomics"])
    effects["deep score"] = (*ranges["deep"], weight["deep"])
    span = {n: abs(e[2]) * (e[1] - e[0]) for n, e in effects.items()}
    per_point = max(span.values()) / 100.0
    figure = _figure(8, 0.6 * (len(effects) + 3))
    axis = figure.subplots()
    rows = ["points", *effects, "total points", "P(mRS 3-6)"]
    for row, name in enumerate(rows):
        y = len(rows) - row
        axis.text(-5, y, name, ha="right", va="center", fontsize=8)
        if name == "points":
            ticks = [(p, f"{p:.0f}") for p in range(0, 101, 10)]
        elif name in effects:
            low, high, slope = effects[name]
            values = np.linspace(low, high, 6) if name != "sex_female" else np.array([0.0, 1.0])
            ticks = [(((v - low) if slope >= 0 else (high - v)) * abs(slope) / per_point, f"{v:.0f}" if abs(v) >= 10 or name == "sex_female" else f"{v:.1f}") for v in values]
        elif name == "total points":
            total_max = sum(span.values()) / per_point
            ticks = [(p * 100 / total_max, f"{p:.0f}") for p in np.linspace(0, total_max, 8)]
        else:  # probability against total points
            base = _logit_at_zero(effects, clinical, combined)
            total_max = sum(span.values()) / per_point
            ticks = []
            for probability in (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95):
                points = (np.log(probability / (1 - probability)) - base) / per_point
                if 0 <= points <= total_max:
                    ticks.append((points * 100 / total_max, f"{probability:g}"))
        xs = [t[0] for t in ticks]
        if xs:
            axis.plot([min(xs), max(xs)], [y, y], color="black", linewidth=0.8)
        for x, label in ticks:
            axis.plot([x, x], [y, y + 0.12], color="black", linewidth=0.8)
            axis.text(x, y + 0.18, label, ha="center", va="bottom", fontsize=6)
    axis.set(xlim=(-40, 110), ylim=(0.3, len(rows) + 0.8), title="CRD nomogram: P(mRS 3-6 at 90 days), synthetic patients, research use only")
    axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def _logit_at_zero(effects: dict[str, tuple[float, float, float]], clinical: LinearScore, combined: LinearScore) -> float:
    """The combined logit when every predictor sits at its zero-points end."""
    weight = dict(zip(combined.names, combined.coefficients, strict=True))
    clinical_at = {n: (e[0] if e[2] >= 0 else e[1]) for n, e in effects.items()}
    clinical_score = clinical.score({n: clinical_at[n] for n in clinical.names})[0]
    return float(combined.intercept + weight["clinical"] * clinical_score
                 + weight["radiomics"] * clinical_at["rad-score"] + weight["deep"] * clinical_at["deep score"])
