"""A one-page picture of a synthetic patient's ground truth: maps, masks and input curves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from service.phantom.truth_files import MAP_UNITS, read_nifti

# Okabe-Ito colours, distinguishable with the common colour-vision deficiencies.
CORE_COLOUR = "#D55E00"  # vermillion
PENUMBRA_COLOUR = "#56B4E9"  # sky blue
OLIGAEMIA_COLOUR = "#F0E442"  # yellow

_MAPS = (("cbf", 0, 80, "viridis"), ("cbv", 0, 6, "viridis"), ("mtt", 0, 14, "magma"), ("tmax", 0, 12, "magma"), ("ttp", None, None, "magma"))


def render_montage(patient_dir: Path, out_png: Path, modality: str = "ct", n_slices: int = 4) -> Path:
    """Write a PNG of the truth in ``patient_dir/truth/<modality>``: rows are slices through the
    lesion, columns tissue labels, CBF, CBV, MTT, Tmax, TTP and the zone masks; below, the AIF
    and VOF curves."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    folder = patient_dir / "truth" / modality
    load = lambda name: read_nifti(folder / f"{name}.nii.gz")[0]  # noqa: E731
    labels, core, penumbra, oligaemia = load("tissue_labels"), load("core"), load("penumbra"), load("oligaemia")
    lesion_per_slice = (core + penumbra).reshape(len(core), -1).sum(axis=1)
    brain_per_slice = (labels > 0).reshape(len(labels), -1).sum(axis=1)
    ranked = np.argsort(-(lesion_per_slice * 1e6 + brain_per_slice))
    slices = sorted(ranked[:n_slices])

    columns = 2 + len(_MAPS)
    fig = Figure(figsize=(2.2 * columns, 2.2 * n_slices + 2.6), dpi=110)
    FigureCanvasAgg(fig)  # its own canvas, not pyplot's shared state
    grid = fig.add_gridspec(n_slices + 1, columns, height_ratios=[1] * n_slices + [1.1])
    maps = {name: load(name) for name, *_ in _MAPS}
    for row, k in enumerate(slices):
        panels = [("tissue labels", labels[k], dict(cmap="gray", vmin=0, vmax=7))]
        for name, lo, hi, cmap in _MAPS:
            vmax = hi if hi is not None else float(np.percentile(maps[name][maps[name] > 0], 99)) if (maps[name] > 0).any() else 1
            panels.append((f"{name.upper()} ({MAP_UNITS[name]})", maps[name][k], dict(cmap=cmap, vmin=lo or 0, vmax=vmax)))
        for col, (title, image, style) in enumerate(panels):
            ax = fig.add_subplot(grid[row, col])
            shown = ax.imshow(image, **style, interpolation="nearest")
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title, fontsize=8)
                if col > 0:
                    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
        ax = fig.add_subplot(grid[row, columns - 1])
        ax.imshow(maps["cbf"][k], cmap="gray", vmin=0, vmax=80, interpolation="nearest")
        zones = oligaemia[k] * 1 + penumbra[k] * 2 + core[k] * 3
        overlay = np.ma.masked_equal(zones, 0)
        ax.imshow(overlay, cmap=ListedColormap([OLIGAEMIA_COLOUR, PENUMBRA_COLOUR, CORE_COLOUR]), vmin=0.5, vmax=3.5, alpha=0.75, interpolation="nearest")
        ax.text(0.02, 0.98, "R", color="white", fontsize=8, va="top", transform=ax.transAxes)
        ax.text(0.98, 0.98, "L", color="white", fontsize=8, va="top", ha="right", transform=ax.transAxes)
        ax.text(0.02, 0.02, f"slice {k + 1}", color="white", fontsize=7, transform=ax.transAxes)
        ax.set_axis_off()
        if row == 0:
            ax.set_title("truth zones", fontsize=8)

    record_path = patient_dir / "truth" / ("ct_perfusion.json" if modality == "ct" else "mr_perfusion.json")
    clinical = json.loads((patient_dir / "truth" / "clinical.json").read_text())
    ax = fig.add_subplot(grid[n_slices, : columns // 2 + 1])
    if record_path.exists():
        record = json.loads(record_path.read_text())
        ax.plot(record["times_s"], record["aif"]["values"], "o-", ms=2, label="AIF", color="#CC79A7")
        ax.plot(record["times_s"], record["vof"]["values"], "s-", ms=2, label="VOF", color="#0072B2")
        ax.set_xlabel("time (s)", fontsize=8)
        ax.set_ylabel(record["units"], fontsize=8)
        ax.legend(fontsize=7)
        ax.tick_params(labelsize=7)
    volumes = (load("core").sum(), load("penumbra").sum())
    voxel_ml = abs(np.linalg.det(read_nifti(folder / "core.nii.gz")[1][:3, :3])) / 1000
    text = (
        f"{patient_dir.name}  ({modality.upper()} truth)\n"
        f"core {volumes[0] * voxel_ml:.1f} mL, penumbra {volumes[1] * voxel_ml:.1f} mL in view\n"
        f"age {clinical['age']}, NIHSS {clinical['nihss']}, side {clinical['lesion_side']}, "
        f"TICI {clinical['tici']}, 90-day mRS {clinical['mrs_90d']}\n"
        "SYNTHETIC PATIENT - research use only, not for diagnosis"
    )
    notes = fig.add_subplot(grid[n_slices, columns // 2 + 1 :])
    notes.set_axis_off()
    notes.text(0.02, 0.95, text, fontsize=8, va="top", transform=notes.transAxes)
    notes.legend(
        handles=[Patch(color=CORE_COLOUR, label="core"), Patch(color=PENUMBRA_COLOUR, label="penumbra (Tmax > 6 s)"), Patch(color=OLIGAEMIA_COLOUR, label="benign oligaemia")],
        loc="lower left", fontsize=8, frameon=False,
    )
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, bbox_inches="tight")
    return out_png
