"""The final-infarct training data (seed 001): synthetic MRI studies through the service's own MRI
analysis, with both counterfactual truths of each patient.

Each patient's MRI study (DWI, ADC, DSC-PWI) is written as DICOM to a temporary folder and
analysed by the service's pipeline (``service.analysis.pipeline.dispatch``, no learned models),
so the inputs (``service.inference.final_infarct_inputs``) are exactly what the service computes.
The phantom knows both final infarcts of every patient (``final_reperfused`` and
``final_not_reperfused``, nested between core and hypoperfused), so each scenario's network is
trained on every training patient against that scenario's truth. One ``.npz`` per study is
cached under the dataset folder (ignored by git).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import replace
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from models.training.cohort import FAMILIES, SampleSpec
from service.config import Settings
from service.analysis.pipeline import AnalysisParameters, dispatch, study_series
from service.errors import InputError
from service.findings import MapName, SegmentKind
from service.inference.final_infarct_inputs import MRI_CHANNELS, normalise
from service.phantom.generate import write_patient
from service.phantom.patient import make_patient, mr_geometry, truth_on_grid

DATASET_VERSION = 1
"""Bump when what a cached study holds changes."""



def analysis_parameters() -> AnalysisParameters:
    """The service's default thresholds (ADC < 620e-6 mm2/s, Tmax > 6 s, ...), without learned models."""
    return replace(AnalysisParameters.from_settings(Settings(learned_models=False)), models=None)


def mri_inputs(findings_maps: dict, dwi: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The network's input volumes and brain mask from the MRI Findings' maps and DWI: the brain
    is where the diffusion analysis has an ADC (0 outside its mask)."""
    volumes = {"dwi": dwi, "adc": findings_maps[MapName.ADC], "tmax": findings_maps[MapName.TMAX],
               "cbf": findings_maps[MapName.CBF], "cbv": findings_maps[MapName.CBV]}
    return volumes, np.asarray(findings_maps[MapName.ADC]) > 0


def analyse(spec: SampleSpec) -> dict[str, np.ndarray]:
    """The service's MRI analysis of one synthetic patient, the network input, both truths and
    the mismatch method's core and penumbra, as arrays."""
    options = FAMILIES[spec.family](spec.noise_hu)
    patient = make_patient(spec.seed, options)
    with tempfile.TemporaryDirectory(prefix="sg-final-") as folder:
        write_patient(spec.seed, "mri", Path(folder), options)
        series = study_series(sorted(Path(folder).rglob("*.dcm")))
        findings = dispatch(series, 1, analysis_parameters(), None, None)
    if findings.dwi is None or MapName.TMAX not in findings.maps:
        raise InputError("the MRI analysis gave no DWI or no perfusion maps")
    volumes, brain = mri_inputs(findings.maps, findings.dwi)
    truth = truth_on_grid(patient, mr_geometry(patient))
    if truth.masks["core"].shape != brain.shape:
        raise InputError(f"truth grid {truth.masks['core'].shape} differs from the analysis grid {brain.shape}")
    core = findings.segment(SegmentKind.CORE)
    penumbra = findings.segment(SegmentKind.PENUMBRA)
    empty = np.zeros(brain.shape, dtype=bool)
    return {
        "inputs": normalise(volumes, brain, MRI_CHANNELS),
        "brain": brain,
        "final_reperfused": truth.masks["final_reperfused"] & truth.brain,
        "final_not_reperfused": truth.masks["final_not_reperfused"] & truth.brain,
        "truth_core": truth.masks["core"],
        "truth_brain": truth.brain,
        "mismatch_core": core.mask.astype(bool) if core is not None else empty,
        "mismatch_penumbra": penumbra.mask.astype(bool) if penumbra is not None else empty,
        "reperfused": np.bool_(patient.clinical.reperfused),
        "spacing_mm": np.asarray(findings.geometry.spacing, dtype=np.float64),
    }


def sample_path(folder: Path, spec: SampleSpec) -> Path:
    return folder / f"v{DATASET_VERSION}" / f"{spec.key}.npz"


def build_sample(spec: SampleSpec, folder: Path) -> tuple[SampleSpec, Path | None, float, str]:
    """Build (or find cached) one study; (spec, path or None if the analysis refused it, seconds, reason)."""
    path = sample_path(folder, spec)
    if path.is_file():
        return spec, path, 0.0, "cached"
    started = time.perf_counter()
    try:
        arrays = analyse(spec)
    except InputError as error:
        return spec, None, time.perf_counter() - started, str(error)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial.npz")
    np.savez_compressed(partial, **arrays)
    partial.replace(path)
    return spec, path, time.perf_counter() - started, "built"


def build(specs: Iterable[SampleSpec], folder: Path, jobs: int = 1,
          on_done: Callable[[SampleSpec, Path | None, float, str], None] | None = None) -> dict[SampleSpec, Path]:
    """Build every study (``jobs`` processes); refused studies are left out (``on_done`` hears why)."""
    specs = list(specs)
    built: dict[SampleSpec, Path] = {}

    def record(result: tuple[SampleSpec, Path | None, float, str]) -> None:
        spec, path, seconds, reason = result
        if path is not None:
            built[spec] = path
        if on_done is not None:
            on_done(spec, path, seconds, reason)

    if jobs <= 1:
        for spec in specs:
            record(build_sample(spec, folder))
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for future in as_completed([pool.submit(build_sample, spec, folder) for spec in specs]):
                record(future.result())
    return {spec: built[spec] for spec in specs if spec in built}
