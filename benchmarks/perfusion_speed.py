"""Speed and peak memory of the CT perfusion stage on a full-size CTP (512 x 512, 16 slices, 40 frames).

    .venv/bin/python benchmarks/perfusion_speed.py [--runs 3] [--workdir DIR] [--exponential-peer]

The patient (seed 201, 10 HU; no test uses it) is written once as DICOM by the phantom CLI in a
child process, so this process holds only what the analysis needs. Then, per run: ``analyse_ctp``
on the files (reading the 640 DICOM files included, as the service runs it) and the deconvolution
alone (oSVD and the bias correction on the brain curves the analysis fed it). Peak memory is the
process's maximum resident set size (``resource.getrusage``), Python, numpy and pydicom included,
and the peak of Python-tracked allocations during one ``analyse_ctp`` (``tracemalloc``; numpy
reports its buffers to it). ``--exponential-peer`` then times ``analyse_ctp_series`` on the
loaded series with the default residue-family fit of delayed tissue and with the exponential-only
fit (``CtpParameters(residue_shapes=(1.0,))``), alternating, and prints the median ratio.
"""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import typer

from service.analysis.ctp_perfusion import CtpParameters, analyse_ctp, analyse_ctp_series
from service.imaging.perfusion_series import load_ctp
from service.perfusion.ctp import working_factor
from service.perfusion.deconvolution import apply_bias, bias_of, calibrate_bias, deconvolve
from service.phantom.haemodynamics import tissue_curves
from service.phantom.patient import PhantomOptions, ct_bolus, make_patient

app = typer.Typer(add_completion=False)
SEED = 201


def write_phantom(out: Path) -> list[Path]:
    folder = out / f"SGPH{SEED:08d}" / "dicom" / "CT" / "ctp"
    if not folder.exists():
        subprocess.run(
            [str(Path(sys.executable).with_name("strokegate")), "phantom", "--kind", "ctp", "--out", str(out), "--seed", str(SEED),
             "--ct-matrix", "512", "--noise-hu", "10"],
            check=True, stdout=subprocess.DEVNULL,
        )
    return sorted(folder.glob("*.dcm"))


def deconvolution_alone(n_voxels: int) -> float:
    """Seconds for oSVD plus the bias calibration and lookup on ``n_voxels`` curves of this patient."""
    patient = make_patient(SEED, PhantomOptions(noise_hu=10.0))
    aif, _, times, _ = ct_bolus(patient)
    rng = np.random.default_rng(0)
    base, _ = tissue_curves(times, aif, rng.uniform(10, 70, 4096), rng.uniform(3, 12, 4096), rng.uniform(0, 10, 4096))
    curves = base[:, rng.integers(0, 4096, n_voxels)] + rng.normal(0, 1.5, (len(times), n_voxels)).astype(np.float32)
    arterial = aif(times)
    dt = float(times[1] - times[0])
    levels = {"thresholds": CtpParameters().osvd_thresholds}
    started = time.perf_counter()
    fit = deconvolve(curves, arterial, dt, "osvd", **levels)
    apply_bias(fit, *bias_of(fit, calibrate_bias(arterial, dt, "osvd", **levels)))
    return time.perf_counter() - started


@app.command()
def main(runs: int = typer.Option(3, help="timed runs"), workdir: Path | None = typer.Option(None, help="keep the phantom here"),
         exponential_peer: bool = typer.Option(False, help="also time the analysis against its exponential-residue peer")) -> None:
    """Print the median time of the perfusion stage and its peak memory."""
    with tempfile.TemporaryDirectory() as tmp:
        out = workdir or Path(tmp)
        started = time.perf_counter()
        files = write_phantom(out)
        print(f"phantom: {len(files)} files (512 x 512 x 16, 40 frames) in {time.perf_counter() - started:.0f} s")
        totals, stages = [], []
        for run in range(runs):
            started = time.perf_counter()
            findings = analyse_ctp(files, study_uid=None, version=1)
            totals.append(time.perf_counter() - started)
            stages.append(findings.timings_s)
            print(f"run {run + 1}: {totals[-1]:.2f} s  " + ", ".join(f"{k} {v:.2f}" for k, v in findings.timings_s.items()), flush=True)
        tracemalloc.start()
        analyse_ctp(files, study_uid=None, version=1)
        traced_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        series = load_ctp(files)
        factor = working_factor(series.geometry.spacing)  # the analysis runs on ~0.9 mm pixels
        brain_voxels = int(analyse_ctp_series(series.frames, series.times_s, series.geometry).brain.sum()) // factor**2
        if exponential_peer:
            peers = {"residue family": CtpParameters(), "exponential": CtpParameters(residue_shapes=(1.0,))}
            seconds: dict[str, list[float]] = {name: [] for name in peers}
            for run in range(runs):
                for name, parameters in peers.items():
                    started = time.perf_counter()
                    analyse_ctp_series(series.frames, series.times_s, series.geometry, parameters)
                    seconds[name].append(time.perf_counter() - started)
                print(f"pair {run + 1}: " + ", ".join(f"{name} {v[-1]:.2f} s" for name, v in seconds.items()), flush=True)
            ratios = [a / b for a, b in zip(seconds["residue family"], seconds["exponential"], strict=True)]
            print(f"analyse_ctp_series, residue family / exponential residue: median ratio {statistics.median(ratios):.3f} "
                  f"over {runs} alternating pairs (medians {statistics.median(seconds['residue family']):.2f} s / "
                  f"{statistics.median(seconds['exponential']):.2f} s)")
        del series
        alone = [deconvolution_alone(brain_voxels) for _ in range(runs)]
    maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    median_stages = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
    print()
    print(f"analyse_ctp (load 640 DICOM files + motion + mask + AIF + denoising + deconvolution + anatomy-guided detail + thresholds): "
          f"median {statistics.median(totals):.2f} s over {runs} runs (min {min(totals):.2f}, max {max(totals):.2f})")
    print("  median per stage: " + ", ".join(f"{k} {v:.2f} s" for k, v in median_stages.items()))
    print(f"deconvolution alone (oSVD + bias correction, {brain_voxels} brain voxels of the 0.94 mm working grid, 40 frames): "
          f"median {statistics.median(alone):.2f} s")
    print(f"peak memory: {maxrss_mb:.0f} MB resident (whole process); {traced_peak / 2**20:.0f} MB traced during one analyse_ctp")
    print(f"findings: core {findings.measurements['core_volume_ml']:.1f} mL, hypoperfused {findings.measurements['hypoperfused_volume_ml']:.1f} mL")


if __name__ == "__main__":
    app()
