"""The final-infarct report (seed 001): each network against the mismatch baseline per family,
with the seed's metrics, and the consistency of the two scenarios' predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.training.final_infarct import FinalSummary, History


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _bold(network: float, baseline: float) -> tuple[str, str]:
    """Both values to two decimals, the higher in bold (neither when they tie at that precision)."""
    a, b = f"{network:.2f}", f"{baseline:.2f}"
    return (f"**{a}**", b) if float(a) > float(b) else (a, f"**{b}**") if float(b) > float(a) else (a, b)


SPLIT_ORDER = {"test": 0, "held-out": 1, "validation": 2}


def comparison_table(summaries: list[FinalSummary]) -> list[str]:
    """One row per (split, family, scenario): the network's and the baseline's medians, and the
    network's with the measured core added (``including_core``) where it was scored."""
    rows = ["| split | family | scenario | patients | Dice network | Dice mismatch | VS network | VS mismatch | precision network | "
            "precision mismatch | recall network | recall mismatch | HD95 network (mm) | HD95 mismatch (mm) | AUC network | AUC mismatch | "
            "Dice network with core | VS network with core |",
            "|---" * 18 + "|"]
    keyed = {(s.split, s.family, s.scenario, s.method): s for s in summaries}
    order = sorted({(s.split, s.family, s.scenario) for s in summaries}, key=lambda k: (SPLIT_ORDER.get(k[0], 3), k[2], k[1]))
    for split, family, scenario in order:
        model, baseline = keyed.get((split, family, scenario, "model")), keyed.get((split, family, scenario, "mismatch"))
        if model is None or baseline is None:
            continue
        constrained = keyed.get((split, family, scenario, "model with measured core"))
        dice, vs = _bold(model.dice, baseline.dice), _bold(model.volumetric_similarity, baseline.volumetric_similarity)
        rows.append(f"| {split} | {family} | {scenario} | {model.patients} | {dice[0]} | {dice[1]} | "
                    f"{vs[0]} | {vs[1]} | {model.precision:.2f} | "
                    f"{baseline.precision:.2f} | {model.recall:.2f} | {baseline.recall:.2f} | {_number(model.hd95_mm, 1)} | "
                    f"{_number(baseline.hd95_mm, 1)} | {_number(model.auc)} | {_number(baseline.auc)} | "
                    f"{_number(constrained.dice if constrained else None)} | "
                    f"{_number(constrained.volumetric_similarity if constrained else None)} |")
    return rows


BASELINES = {
    "mri": "the service's MRI analysis (the ADC core if reperfused, core plus Tmax > 6 s penumbra if not)",
    "ct": "the service's CT perfusion analysis (the rCBF < 30 % core if reperfused, core plus Tmax > 6 s penumbra if not)",
}


def write_report(path: Path, title: str, header: list[str], summaries: list[FinalSummary], history: History,
                 modality: str = "mri") -> Path:
    lines = [f"# {title}", "", *header, "", "## Network against the perfusion-diffusion mismatch baseline", "",
             "Medians over patients; truth is the phantom's final infarct of this scenario; the baseline is seed 001's mismatch "
             f"model on {BASELINES[modality]}. VS: "
             "volumetric similarity; HD95: 95 % Hausdorff distance; AUC: voxel AUC (the baseline's from its binary mask). "
             "'with core': the network's prediction with the analysis's measured core added (the measured core is infarcted "
             "whatever happens). Validation rows are the patients that chose the checkpoint and whether the service adds the core; "
             "the held-out family chooses nothing.", "",
             *comparison_table(summaries), "", "## Training", "",
             f"Best validation epoch {history.best_epoch} of {len(history.epochs)}; {history.seconds / 60:.1f} min of training.", "",
             "| epoch | training loss | validation lesion Dice | minutes |", "|---|---|---|---|"]
    for r in history.epochs:
        lines.append(f"| {r['epoch']} | {r['train_loss']:.3f} | {r['validation_dice']:.3f} | {r['seconds'] / 60:.1f} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


ConsistencyRow = tuple  # (spec, core mL, truth if reperfused mL, reperfused mL, not reperfused mL, share inside,
#                          the same three with the measured core added)


def consistency_table(rows: list[ConsistencyRow], summaries: list[FinalSummary], modality: str) -> tuple[list[str], str]:
    """The consistency markdown of a shipped pair (per patient, the networks alone and with the
    measured core) and its one-paragraph summary; then both scenarios per family, three ways."""
    def small(core_ml: float, *volumes: float) -> bool:
        return any(v < 0.8 * core_ml for v in volumes)

    n = max(1, len(rows))
    alone = [r[5] for r in rows] or [1.0]
    with_core = [r[8] for r in rows] or [1.0]
    below = sum(small(r[1], r[3], r[4]) for r in rows)
    below_core = sum(small(r[1], r[6], r[7]) for r in rows)
    truth_below = sum(r[2] < 0.8 * r[1] for r in rows)
    summary = (f"{len(rows)} test and held-out patients. The networks alone: the reperfused prediction lies inside the non-reperfused "
               f"one for a median {np.median(alone):.0%} of its voxels (lowest {min(alone):.0%}); {below} patients ({below / n:.0%}) have "
               f"a prediction smaller than 80 % of the measured core. With the measured core added (as the service reports them): median "
               f"{np.median(with_core):.0%} (lowest {min(with_core):.0%}); {below_core} patients ({below_core / n:.0%}). The truth itself "
               f"(final infarct if reperfused) is smaller than 80 % of the measured core in {truth_below} patients ({truth_below / n:.0%}).")
    lines = [f"# {modality.upper()} final-infarct networks: consistency of the two scenarios", "",
             "**Research use only. Not for diagnosis.** Synthetic patients only. Made by "
             f"`python -m models.training final-infarct-consistency --modality {modality}` with the shipped networks (ONNX Runtime).", "",
             summary, "",
             "| patient | split | measured core (mL) | truth if reperfused (mL) | reperfused (mL) | not reperfused (mL) | inside | "
             "smaller than 80 % of the core | with core: reperfused (mL) | with core: not reperfused (mL) | with core: inside | "
             "with core: smaller than 80 % |", "|---" * 12 + "|"]
    for spec, core_ml, truth_ml, a, b, share, ac, bc, share_core in sorted(rows, key=lambda r: r[0].key):
        lines.append(f"| {spec.key} | {spec.split} | {core_ml:.1f} | {truth_ml:.1f} | {a:.1f} | {b:.1f} | {share:.0%} | "
                     f"{'yes' if small(core_ml, a, b) else 'no'} | {ac:.1f} | {bc:.1f} | {share_core:.0%} | {'yes' if small(core_ml, ac, bc) else 'no'} |")
    lines += ["", "## Each scenario per family: the network alone, with the measured core, and the mismatch baseline", "",
              "Medians over patients. Validation patients chose the checkpoint and whether the service adds the core; the held-out "
              "family chose nothing.", "",
              "| split | family | scenario | patients | Dice network | Dice with core | Dice mismatch | VS network | VS with core | VS mismatch |",
              "|---" * 10 + "|"]
    keyed = {(s.split, s.family, s.scenario, s.method): s for s in summaries}
    for split, family, scenario in sorted({(s.split, s.family, s.scenario) for s in summaries},
                                          key=lambda k: (SPLIT_ORDER.get(k[0], 3), k[2], k[1])):
        got = [keyed.get((split, family, scenario, m)) for m in ("model", "model with measured core", "mismatch")]
        if any(g is None for g in got):
            continue
        model, core, baseline = got
        lines.append(f"| {split} | {family} | {scenario} | {model.patients} | {model.dice:.2f} | {core.dice:.2f} | {baseline.dice:.2f} | "
                     f"{model.volumetric_similarity:.2f} | {core.volumetric_similarity:.2f} | {baseline.volumetric_similarity:.2f} |")
    return lines, summary
