"""Fit the low-flow CBF calibration (service/perfusion/low_flow_calibration.json) on synthetic patients.

    nice -n 10 .venv/bin/python benchmarks/calibrate_low_flow.py --patients 3 --jobs 2   # ~10 min on 2 cores

Patients come from the tuning families only (service.phantom.families.tuning_families: never the
held-out one) and from seeds 1001 on, which neither benchmarks/perfusion_accuracy.py (101-199)
nor any test uses. Each is analysed as the service does, without the low-flow correction, at 5, 10
and 20 HU. In its delayed tissue (true Tmax > 6 s, inside both brains) the measured rCBF (CBF over
the analysis's contralateral reference) is binned by the true rCBF (CBF over the phantom's
reference): per patient the median of each bin with at least MIN_VOXELS voxels, then per noise
level the median over patients; the noise level's node is the median of its patients' frame
noise (low_flow.frame_noise_hu, as the analysis measures it). Bins no patient filled are
interpolated from their neighbours.
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import typer

from models.training.cohort import SampleSpec
from models.training.dataset import simulate
from service.analysis.ctp_perfusion import CtpParameters, analyse_ctp_series
from service.errors import InputError
from service.perfusion.low_flow import CALIBRATION_FILE, LowFlowCalibration
from service.phantom.families import tuning_families
from service.phantom.patient import lesion_plan

app = typer.Typer(add_completion=False)

FIRST_SEED = 1001
NOISES = (5.0, 10.0, 20.0)
TRUE_RCBF = tuple(np.round(np.arange(0.05, 1.0001, 0.025), 4))
MIN_VOXELS = 10
DELAYED_TMAX_S = 6.0


def calibration_seeds(n: int) -> list[int]:
    """The first ``n`` seeds from FIRST_SEED whose patient has a stroke."""
    return [s for s in range(FIRST_SEED, FIRST_SEED + 10 * n + 20) if lesion_plan(s).volumes_ml["hypoperfused"] > 0][:n]


def patient_curve(job: tuple[str, int, float]) -> tuple[str, int, float, float, np.ndarray] | None:
    """(family, seed, noise, frame noise, median measured rCBF per TRUE_RCBF bin, nan where empty)."""
    family, seed, noise = job
    study = simulate(SampleSpec(family, seed, noise, "train"))
    truth = study.truth
    try:
        result = analyse_ctp_series(study.frames, study.times_s, study.geometry, CtpParameters(low_flow_correction=False))
    except InputError as error:
        print(f"  {family} {seed} {noise:g} HU: failed: {error}", flush=True)
        return None
    delayed = truth.brain & result.brain & (truth.tmax > DELAYED_TMAX_S)
    true = truth.cbf[delayed] / truth.cbf_reference
    measured = result.maps["cbf"][delayed] / result.reference_cbf
    grid = np.asarray(TRUE_RCBF)
    half = 0.5 * float(grid[1] - grid[0])
    medians = np.full(grid.size, np.nan)
    for i, centre in enumerate(grid):
        pick = np.abs(true - centre) <= half
        if pick.sum() >= MIN_VOXELS:
            medians[i] = float(np.median(measured[pick]))
    print(f"  {family} {seed} {noise:g} HU: frame noise {result.frame_noise_hu:.1f} HU, {int(delayed.sum())} delayed voxels", flush=True)
    return family, seed, noise, result.frame_noise_hu, medians


def _fill(values: np.ndarray) -> np.ndarray:
    good = np.isfinite(values)
    if not good.any():
        raise typer.BadParameter("no delayed tissue in the calibration patients; add patients")
    index = np.arange(values.size)
    return np.interp(index, index[good], values[good])


@app.command()
def main(
    patients: int = typer.Option(3, help="patients (with a stroke) per tuning family"),
    jobs: int = typer.Option(2, help="patients analysed in parallel"),
    out: Path = typer.Option(CALIBRATION_FILE, help="where to write the calibration (JSON)"),
) -> None:
    """Measure the analysis's low-flow rCBF against the truth and write the calibration table."""
    started = time.perf_counter()
    seeds = calibration_seeds(patients)
    families = tuning_families()
    work = [(f, s, n) for n in NOISES for f in families for s in seeds]
    print(f"families {families}, seeds {seeds}, noise {list(NOISES)} HU: {len(work)} analyses", flush=True)
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = [r for r in pool.map(patient_curve, work) if r is not None]
    nodes, rows = [], []
    for noise in NOISES:
        group = [r for r in results if r[2] == noise]
        if not group:
            continue
        with np.errstate(all="ignore"):
            stacked = np.vstack([r[4] for r in group])
            row = np.nanmedian(np.where(np.isfinite(stacked), stacked, np.nan), axis=0) if np.isfinite(stacked).any() else stacked[0]
        nodes.append(float(np.median([r[3] for r in group])))
        rows.append(_fill(row))
    order = np.argsort(nodes)
    calibration = LowFlowCalibration(
        np.asarray(TRUE_RCBF), np.asarray(nodes)[order], np.vstack(rows)[order],
        source=f"benchmarks/calibrate_low_flow.py --patients {patients}: families {', '.join(families)}; seeds {seeds}; "
               f"noise {', '.join(f'{n:g}' for n in NOISES)} HU",
    )
    out.write_text(calibration.to_json() + "\n")
    print("true rCBF:     " + " ".join(f"{v:5.2f}" for v in calibration.true_rcbf))
    for node, row in zip(calibration.noise_hu, calibration.measured):
        print(f"{node:5.1f} HU read: " + " ".join(f"{v:5.2f}" for v in row))
    print(f"wrote {out} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    app()
