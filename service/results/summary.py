"""Findings -> one summary image per analysis, as an RGB Secondary Capture any viewer shows.

Many PACS viewers display neither SEG nor SR, so the summary carries the result on its own: a
montage of the slices with the core and the rest of the hypoperfused tissue in two colours of the
Okabe-Ito colour-blind-safe palette over the CBF (CT perfusion) or ADC (MRI) map, the volumes,
mismatch, HIR, the target-mismatch verdict, the QC flags, the algorithm and its thresholds, R/L
markers and a research-use banner. Where seed 001's networks ran, a panel below the montage shows
both predicted final infarcts (if reperfused, if not) side by side over the same slices. No patient identifier is burnt into the pixels: the viewer
shows the patient from the header.
"""

from __future__ import annotations

import copy
import io
import textwrap

import highdicom as hd
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from pydicom.dataset import Dataset

from service.findings import (
    NIHSS_NOT_AVAILABLE, Analysis, Findings, FusionOutcomeRecord, MapName, NihssUsed, OutcomeRecord, Segment, SegmentKind,
)
from service.results import identity

SUMMARY_SERIES_NUMBER = 903
VERMILLION = (213 / 255, 94 / 255, 0.0)
SKY_BLUE = (86 / 255, 180 / 255, 233 / 255)
SEGMENT_COLOURS = {SegmentKind.CORE: VERMILLION, SegmentKind.PENUMBRA: SKY_BLUE}
SEGMENT_LEGEND = {SegmentKind.CORE: "Ischemic core", SegmentKind.PENUMBRA: "Hypoperfused beyond the core (penumbra)"}
BACKGROUND = {Analysis.CT_PERFUSION: MapName.CBF, Analysis.VENDOR_MAPS: MapName.CBF}  # otherwise the diffusion map
LINES = [  # core and penumbra volumes are in the legend
    ("hypoperfused_volume_ml", "Hypoperfused (Tmax > {tmax:g} s)", "{:.1f} mL"),
    ("mismatch_volume_ml", "Mismatch volume", "{:.1f} mL"),
    ("mismatch_ratio", "Mismatch ratio", "{:.1f}"),
    ("hypoperfusion_intensity_ratio", "HIR (Tmax>10 s / Tmax>6 s)", "{:.2f}"),
]
BLUISH_GREEN, REDDISH_PURPLE = (0.0, 158 / 255, 115 / 255), (204 / 255, 121 / 255, 167 / 255)
SCENARIO_KINDS = (SegmentKind.FINAL_IF_REPERFUSED, SegmentKind.FINAL_IF_NOT_REPERFUSED)
SCENARIO_COLOURS = {SegmentKind.FINAL_IF_REPERFUSED: BLUISH_GREEN, SegmentKind.FINAL_IF_NOT_REPERFUSED: REDDISH_PURPLE}
SCENARIO_TITLES = {SegmentKind.FINAL_IF_REPERFUSED: "Final infarct\nif reperfused", SegmentKind.FINAL_IF_NOT_REPERFUSED: "Final infarct\nif not reperfused"}
PANEL_SLICES = 6
WIDTH_PX, HEIGHT_PX, DPI = 1600, 1000, 100
MAX_TILES = 16


def background_map(findings: Findings) -> tuple[MapName, np.ndarray]:
    """The map the montage is drawn on; ValueError if the analysis kept none."""
    preferred = BACKGROUND.get(findings.analysis, MapName.ADC)
    for name in (preferred, MapName.CBF, MapName.TMAX, MapName.ADC):
        if name in findings.maps:
            return name, findings.maps[name]
    raise ValueError(f"{findings.analysis}: no map to draw the summary on (have {sorted(findings.maps)})")


def montage_slices(volume: np.ndarray, masks: list[np.ndarray], count: int = MAX_TILES) -> list[int]:
    """Up to ``count`` slice indices spread over the slices with tissue, always keeping the slice
    where the lesion is largest."""
    with_tissue = [k for k in range(volume.shape[0]) if np.any(volume[k] > 0)] or list(range(volume.shape[0]))
    chosen = {with_tissue[round(i)] for i in np.linspace(0, len(with_tissue) - 1, min(count, len(with_tissue)))}
    if masks:
        lesion = np.sum([m.reshape(m.shape[0], -1).sum(axis=1) for m in masks], axis=0)
        if lesion.max() > 0:
            largest = int(np.argmax(lesion))
            if largest not in chosen and len(chosen) >= count:
                chosen.remove(min(chosen, key=lambda k: abs(k - largest)))
            chosen.add(largest)
    return sorted(chosen)


def method_lines(findings: Findings) -> list[str]:
    """Where a learned model drew segments beside the threshold method: which method the volumes
    and the verdict use, and the other method's volumes."""
    segments = [s for s in findings.segments if s.key in SEGMENT_COLOURS]  # the predicted final infarcts have their own panel
    if not any(s.model is not None for s in segments):
        return []
    used = next((s.model for s in segments if findings.uses(s) and s.model is not None), None)
    lines = [f"Verdict by: {'model ' + used.name + ' ' + used.version if used else 'threshold method'}"]
    others = [s for s in segments if not findings.uses(s)]
    if others:
        by = "threshold method" if others[0].model is None else f"model {others[0].model.name}"
        lines.append(f"By {by}: " + ", ".join(f"{s.key.value} {s.volume_ml:.1f} mL" for s in others))
    return lines


PARAMETER_LABELS: dict[str, tuple[str, str]] = {
    # parameter -> how a reader reads it: (label, value format with its unit)
    "core_rcbf": ("Core", "CBF < {:.0%} of contralateral"),
    "reference_cbf": ("Contralateral CBF", "{:.1f} mL/100 g/min"),
    "tmax_threshold_s": ("Hypoperfusion", "Tmax > {:g} s"),
    "adc_threshold": ("Core", "ADC < {:g} x 10^-6 mm2/s"),
    "min_lesion_ml": ("Smallest lesion kept", "{:g} mL"),
    "vessel_cbv": ("Vessels left out", "CBV > {:g} mL/100 g"),
    "aif_partial_volume_scale": ("AIF partial-volume correction", "x {:.2f}"),
    "max_core_ml": ("DEFUSE 3 core", "< {:g} mL"),
    "min_mismatch_ratio": ("DEFUSE 3 mismatch ratio", ">= {:g}"),
    "min_mismatch_ml": ("DEFUSE 3 mismatch", ">= {:g} mL"),
}
"""Analysis parameters as the summary image shows them (others: their name in words and value)."""


def parameter_line(name: str, value: float) -> str:
    """One parameter as a reader reads it, with its unit: ``Hypoperfusion: Tmax > 6 s``."""
    label, fmt = PARAMETER_LABELS.get(name, (name.replace("_", " ").capitalize(), "{:g}"))
    return f"{label}: {fmt.format(value)}"


def outcome_line(outcome: OutcomeRecord | FusionOutcomeRecord) -> str:
    """One model's 90-day outcome as the summary shows it, with the model's short name and the
    NIHSS it used (or that it had none), short enough for one line of the text column (the SR
    names the model in full)."""
    used = f"NIHSS {outcome.nihss.value}, {outcome.nihss.source.title}" if outcome.nihss is not None else "no NIHSS, imaging only"
    short = outcome.model.name.removeprefix("outcome-").upper()
    return f"P(mRS 3-6 at 90 d) {100 * outcome.probability:.0f}% {short}: {used}"


def text_lines(findings: Findings) -> list[str]:
    """The measurements, verdict, QC flags and provenance, in reading order."""
    m = findings.measurements
    tmax = findings.parameters.get("tmax_threshold_s", 6.0)
    lines = [label.format(tmax=tmax) + ": " + fmt.format(m[key]) for key, label, fmt in LINES if key in m]
    if "target_mismatch" in m:
        lines.append("Target mismatch (DEFUSE 3): " + ("YES" if m["target_mismatch"] >= 0.5 else "NO"))
    if "reperfusion_responder" in m:
        lines.append(f"Final infarct: {m['predicted_final_reperfused_ml']:.1f} mL if reperfused, "
                     f"{m['predicted_final_not_reperfused_ml']:.1f} if not")
        lines.append(f"Reperfusion saves {m['reperfusion_salvage_ml']:.1f} mL; Dice {m['scenario_dice']:.2f}; "
                     "responder: " + ("YES" if m["reperfusion_responder"] >= 0.5 else "NO"))
    lines += method_lines(findings)
    lines += [outcome_line(outcome) for outcome in findings.outcomes]
    lines.append("")
    lines.append("QC: " + ("; ".join(findings.qc_flags) if findings.qc_flags else "no flags"))
    lines.append("")
    lines.append(f"{findings.algorithm.name} {findings.algorithm.version}, {findings.analysis}, result v{findings.version}")
    order = list(PARAMETER_LABELS)
    numeric = [(name, value) for name, value in findings.parameters.items() if isinstance(value, (int, float))]
    numeric.sort(key=lambda item: (order.index(item[0]) if item[0] in order else len(order), item[0]))
    lines += [parameter_line(name, value) for name, value in numeric]
    return lines


def render_summary(findings: Findings) -> np.ndarray:
    """The summary as an RGB array (rows, columns, 3) of uint8, legible at viewer sizes."""
    name, volume = background_map(findings)
    segments = [s for s in findings.segments if findings.uses(s) and s.key in SEGMENT_COLOURS]
    slices = montage_slices(volume, [s.mask for s in segments])
    columns = int(np.ceil(np.sqrt(len(slices))))
    rows = int(np.ceil(len(slices) / columns))
    values = volume[volume > 0]
    top = float(np.percentile(values, 99)) if values.size else 1.0
    figure = Figure(figsize=(WIDTH_PX / DPI, HEIGHT_PX / DPI), dpi=DPI, facecolor="black")
    FigureCanvasAgg(figure)  # a figure of its own, not pyplot's shared state: workers draw at once safely
    figure.text(0.5, 0.975, identity.RESEARCH_USE_ONLY, ha="center", va="top", color="black", fontsize=20,
                weight="bold", bbox={"facecolor": (240 / 255, 228 / 255, 66 / 255), "edgecolor": "none", "pad": 6})
    left_marker, right_marker = side_markers(findings)
    scenarios = [next((s for s in findings.segments if s.key is kind), None) for kind in SCENARIO_KINDS]
    panel = all(s is not None for s in scenarios)
    grid = figure.add_gridspec(rows, columns, left=0.01, right=0.62, top=0.91, bottom=0.38 if panel else 0.02, wspace=0.02, hspace=0.02)
    for index, k in enumerate(slices):
        axes = figure.add_subplot(grid[index // columns, index % columns])
        axes.imshow(volume[k], cmap="gray", vmin=0, vmax=top, interpolation="nearest")
        for segment in segments:
            colour = SEGMENT_COLOURS[segment.key]
            axes.imshow(np.ma.masked_where(~segment.mask[k], segment.mask[k]), cmap=ListedColormap([colour]),
                        alpha=0.6, interpolation="nearest", vmin=0, vmax=1)
        axes.set_axis_off()
        axes.text(0.02, 0.98, left_marker, transform=axes.transAxes, color="white", fontsize=11, va="top")
        axes.text(0.98, 0.98, right_marker, transform=axes.transAxes, color="white", fontsize=11, va="top", ha="right")
        axes.text(0.02, 0.02, f"{k + 1}", transform=axes.transAxes, color="white", fontsize=9)
    if panel:
        _scenario_panel(figure, volume, top, [s for s in scenarios if s is not None], (left_marker, right_marker))
    title = {Analysis.CT_PERFUSION: "CT perfusion", Analysis.VENDOR_MAPS: "Perfusion maps"}.get(findings.analysis, "MRI")
    figure.text(0.64, 0.90, f"StrokeGate - {title}", color="white", fontsize=22, weight="bold", va="top")
    figure.text(0.64, 0.85, f"background: {name.title} ({name.unit})", color="white", fontsize=13, va="top")
    y = 0.80
    for segment in segments:
        figure.patches.append(Rectangle((0.64, y - 0.022), 0.018, 0.026, color=SEGMENT_COLOURS[segment.key],
                                            transform=figure.transFigure, figure=figure))
        figure.text(0.665, y, f"{SEGMENT_LEGEND[segment.key]}: {segment.volume_ml:.1f} mL", color="white",
                    fontsize=14, va="top")
        y -= 0.045
    for line in text_lines(findings):
        figure.text(0.64, y, line, color="white", fontsize=14 if y > 0.4 else 11, va="top", wrap=True)
        y -= 0.04 if y > 0.4 else 0.032
    buffer = io.BytesIO()
    figure.savefig(buffer, format="rgba", dpi=DPI, facecolor="black")
    rgba = np.frombuffer(buffer.getvalue(), dtype=np.uint8).reshape(HEIGHT_PX, WIDTH_PX, 4)
    return np.ascontiguousarray(rgba[..., :3])


def _scenario_panel(figure: Figure, volume: np.ndarray, top: float, scenarios: list[Segment], markers: tuple[str, str]) -> None:
    """Seed 001's two predicted final infarcts side by side, one row each, over the same slices
    (those where the non-reperfused prediction is largest), at the bottom of the montage."""
    slices = montage_slices(volume, [scenarios[-1].mask], count=PANEL_SLICES)
    if len(slices) > PANEL_SLICES:
        slices = slices[:PANEL_SLICES]
    grid = figure.add_gridspec(2, len(slices), left=0.09, right=0.62, top=0.355, bottom=0.02, wspace=0.02, hspace=0.04)
    for row, segment in enumerate(scenarios):
        figure.text(0.005, 0.30 - row * 0.17, SCENARIO_TITLES[segment.key] + f"\n{segment.volume_ml:.1f} mL", color="white",
                    fontsize=11, va="top")
        for column, k in enumerate(slices):
            axes = figure.add_subplot(grid[row, column])
            axes.imshow(volume[k], cmap="gray", vmin=0, vmax=top, interpolation="nearest")
            axes.imshow(np.ma.masked_where(~segment.mask[k], segment.mask[k]), cmap=ListedColormap([SCENARIO_COLOURS[segment.key]]),
                        alpha=0.6, interpolation="nearest", vmin=0, vmax=1)
            axes.set_axis_off()
            axes.text(0.02, 0.98, markers[0], transform=axes.transAxes, color="white", fontsize=9, va="top")
            axes.text(0.98, 0.98, markers[1], transform=axes.transAxes, color="white", fontsize=9, va="top", ha="right")
            axes.text(0.02, 0.02, f"{k + 1}", transform=axes.transAxes, color="white", fontsize=8)


def build_summary(findings: Findings) -> Dataset:
    """The summary Secondary Capture, in the source study, with a deterministic UID per version."""
    pixels = render_summary(findings)
    source = findings.source_images[0]
    sc = hd.sc.SCImage.from_ref_dataset(
        source, pixels, hd.PhotometricInterpretationValues.RGB, 8, hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=identity.result_uid(findings.study_uid, findings.version, "summary-series"),
        series_number=SUMMARY_SERIES_NUMBER,
        sop_instance_uid=identity.result_uid(findings.study_uid, findings.version, "summary"),
        instance_number=1,
        manufacturer=identity.MANUFACTURER,
        patient_orientation=("L", "P"),
    )
    sc.SeriesDescription = f"StrokeGate summary v{findings.version} ({identity.RESEARCH_USE_ONLY})"[:64]
    sc.ImageComments = identity.RESEARCH_USE_ONLY
    sc.BurnedInAnnotation = "YES"
    sc.Laterality = None  # unpaired body part; the General Series module wants it present
    sc.ManufacturerModelName = identity.MANUFACTURER_MODEL_NAME
    sc.SoftwareVersions = identity.SOFTWARE_VERSIONS
    return sc


def side_markers(findings: Findings) -> tuple[str, str]:
    """Patient side at the image's left and right edges (radiological convention: R on the left)."""
    x = findings.geometry.row_direction[0]
    if abs(x) < 0.5:
        return "", ""
    return ("R", "L") if x > 0 else ("L", "R")


REVISION_TEXT_LEFT, REVISION_TEXT_TOP = 0.63, 0.085
"""Where a revision redraws the summary: the text column right of the montage, below the banner."""


def stored_imaging_lines(stored: dict) -> list[str]:
    """The imaging results as the stored findings (``Findings.summary()``) hold them: segment
    volumes and the measurements the summary shows, for a revision's summary."""
    lines = [f"{ident.replace('_', ' ').capitalize()}: {float(ml):.1f} mL" for ident, ml in (stored.get("segments") or {}).items()]
    measurements = stored.get("measurements") or {}
    tmax = float((stored.get("parameters") or {}).get("tmax_threshold_s", 6.0))
    lines += [label.format(tmax=tmax) + ": " + fmt.format(float(measurements[key])) for key, label, fmt in LINES if key in measurements]
    if "target_mismatch" in measurements:
        lines.append("Target mismatch (DEFUSE 3): " + ("YES" if float(measurements["target_mismatch"]) >= 0.5 else "NO"))
    return lines


def revise_summary(previous: Dataset, study_uid: str, version: int, revision: int, nihss: NihssUsed | None,
                   outcomes: list[OutcomeRecord | FusionOutcomeRecord], imaging: list[str], qc_flags: list[str]) -> Dataset:
    """The next version of the summary ``previous`` (``build_summary``'s or a revision's) for a new
    NIHSS: the montage and the banner kept pixel for pixel (the imaging did not change), the text
    column redrawn with the NIHSS and each model's outcome, then the ``imaging`` results and QC
    flags as first reported. Same series, a new SOP Instance UID (``summary-r<revision>``),
    Instance Number ``revision``. ValueError when ``previous`` is not a summary of our size."""
    if revision < 2:
        raise ValueError(f"revision {revision}: revision 1 is the summary build_summary made")
    pixels = previous.pixel_array
    if pixels.shape != (HEIGHT_PX, WIDTH_PX, 3):
        raise ValueError(f"the previous summary is {pixels.shape}, not a {HEIGHT_PX} x {WIDTH_PX} RGB summary")
    left, top = int(WIDTH_PX * REVISION_TEXT_LEFT), int(HEIGHT_PX * REVISION_TEXT_TOP)
    width, height = WIDTH_PX - left, HEIGHT_PX - top
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="black")
    FigureCanvasAgg(figure)
    lines = [(f"StrokeGate - clinical update {revision}", 20, "bold"), (f"Result v{version}: the NIHSS changed", 13, "normal"),
             ("", 13, "normal"), (nihss.describe() if nihss is not None else NIHSS_NOT_AVAILABLE, 13, "normal"),
             *((outcome_line(o), 14, "bold") for o in outcomes), ("", 13, "normal"),
             ("Imaging results unchanged:", 13, "normal"), *((line, 13, "normal") for line in imaging), ("", 11, "normal"),
             ("QC: " + ("; ".join(qc_flags) if qc_flags else "no flags"), 11, "normal")]
    y = 0.98
    for text, size, weight in lines:
        per_line = int(width / ((0.7 if weight == "bold" else 0.62) * size * DPI / 72))  # characters across the column
        for part in textwrap.wrap(text, per_line) or [""]:
            figure.text(0.02, y, part, color="white", fontsize=size, weight=weight, va="top")
            y -= 1.4 * size * DPI / 72 / height
    buffer = io.BytesIO()
    figure.savefig(buffer, format="rgba", dpi=DPI, facecolor="black")
    column = np.frombuffer(buffer.getvalue(), dtype=np.uint8).reshape(height, width, 4)[..., :3]
    revised = np.array(pixels, dtype=np.uint8, copy=True)
    revised[top:, left:] = column
    report = copy.deepcopy(previous)
    report.PixelData = np.ascontiguousarray(revised).tobytes()
    identity.stamp_revision(report, study_uid, version, "summary", revision)
    return report
