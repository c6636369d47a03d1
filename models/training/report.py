"""The training report: markdown tables (model against the threshold method, per family, noise
level and class) and PNG curves of the training."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from models.training.evaluate import ACCEPTANCE_NOISE_HU, CORE_MARGIN, PENUMBRA_SLACK, Acceptance, Summary, acceptance
from models.training.loop import History


def comparison_table(summaries: list[Summary]) -> list[str]:
    """One row per (split, family, noise, class): Dice, HD95 and |dV| of each method, and the
    model's Dice minus the threshold method's."""
    rows = ["| split | family | noise | class | patients | Dice model | Dice model, NIHSS unknown | Dice threshold | "
            "model - threshold | HD95 model (mm) | HD95 threshold (mm) | abs dV model (mL) | abs dV threshold (mL) |",
            "|---" * 13 + "|"]
    keyed = {(s.split, s.family, s.noise_hu, s.cls, s.method): s for s in summaries}
    for split, family, noise, cls in sorted({(s.split, s.family, s.noise_hu, s.cls) for s in summaries}, key=lambda k: (k[0] != "test", k[1], k[2], k[3] != "core")):
        model, blind, threshold = (keyed.get((split, family, noise, cls, m)) for m in ("model", "model, NIHSS unknown", "threshold"))
        if model is None or threshold is None:
            continue

        def hd(s: Summary | None) -> str:
            return "-" if s is None or s.hd95_mm is None else f"{s.hd95_mm:.1f}"

        rows.append(
            f"| {split} | {family} | {noise:g} HU | {cls} | {model.patients} | **{model.dice:.2f}** | "
            f"{'-' if blind is None else f'{blind.dice:.2f}'} | {threshold.dice:.2f} | {model.dice - threshold.dice:+.2f} | {hd(model)} | {hd(threshold)} | "
            f"{model.volume_difference_ml:.1f} | {threshold.volume_difference_ml:.1f} |"
        )
    return rows


def acceptance_table(checks: list[Acceptance]) -> list[str]:
    """One row per (split, family): the model's Dice minus the threshold method's, and whether the
    acceptance holds."""
    rows = [f"| split | family | core: model - threshold (>= {CORE_MARGIN:+.2f}) | penumbra: model - threshold (>= {-PENUMBRA_SLACK:+.2f}) | holds |",
            "|---|---|---|---|---|"]
    rows += [f"| {c.split} | {c.family} | {c.core_margin:+.3f} | {c.penumbra_margin:+.3f} | {'yes' if c.holds else '**no**'} |" for c in checks]
    return rows


def curves(history: History, path: Path) -> Path:
    epochs = [r["epoch"] for r in history.epochs]
    figure = Figure(figsize=(10, 3.6))
    FigureCanvasAgg(figure)  # its own canvas, not pyplot's shared state
    left, right = figure.subplots(1, 2)
    left.plot(epochs, [r["train_loss"] for r in history.epochs], label="training")
    if history.epochs and "validation_loss" in history.epochs[0]:
        left.plot(epochs, [r["validation_loss"] for r in history.epochs], label="validation")
        right.plot(epochs, [r["validation_dice_core"] for r in history.epochs], label="core", color="#D55E00")
        right.plot(epochs, [r["validation_dice_penumbra"] for r in history.epochs], label="penumbra", color="#56B4E9")
    left.set(xlabel="epoch", ylabel="focal Tversky loss", title="Loss")
    right.set(xlabel="epoch", ylabel="Dice", title="Validation Dice (whole studies)", ylim=(0, 1))
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    if history.best_epoch > 0:
        right.axvline(history.best_epoch, color="grey", linestyle=":", label="kept")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def write_report(path: Path, title: str, header: list[str], summaries: list[Summary], history: History, curves_png: str) -> Path:
    lines = [f"# {title}", "", *header, "", "## Model against the threshold method",
             "", "Medians over patients; truth is the phantom's; the threshold method is the service's CT perfusion analysis "
             "(core rCBF < 30 % within Tmax > 6 s). HD95: 95 % Hausdorff distance; abs dV: |predicted - true volume|.", "",
             *comparison_table(summaries), "", f"## Acceptance at {ACCEPTANCE_NOISE_HU:g} HU", "",
             "Per family (the held-out family's row marked held-out), from the medians above.", "",
             *acceptance_table(acceptance(summaries)), "", "## Training", "",
             f"Best validation epoch {history.best_epoch} of {len(history.epochs)}; {history.seconds / 60:.1f} min of training.", "",
             f"![training curves]({curves_png})", "",
             "| epoch | training loss | validation loss | validation Dice core | validation Dice penumbra | minutes |", "|---|---|---|---|---|---|"]
    for r in history.epochs:
        lines.append(f"| {r['epoch']} | {r['train_loss']:.3f} | {r.get('validation_loss', float('nan')):.3f} | "
                     f"{r.get('validation_dice_core', float('nan')):.3f} | {r.get('validation_dice_penumbra', float('nan')):.3f} | {r['seconds'] / 60:.1f} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
