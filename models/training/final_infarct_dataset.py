"""The final-infarct training data (seed 001): synthetic MRI studies through the service's own MRI
analysis, with both counterfactual truths of each patient.

Each patient's MRI study (DWI, ADC, DSC-PWI) is written as DICOM to a temporary folder and
analysed by the service's pipeline (``service.analysis.pipeline.dispatch``, no learned models),
so the inputs (``service.inference.final_infarct_inputs``) are exactly what the service computes.
The phantom knows both final infarcts of every patient (``final_reperfused`` and
``final_not_reperfused``, nested between core and hypoperfused), so each scenario's network is
trained on every training patient against that scenario's truth. ``MRI_DATASET`` caches them
through ``models.training.dataset``; the CT networks train on that module's CT perfusion studies.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from models.training.cohort import FAMILIES, SampleSpec
from models.training.dataset import CT_DATASET, DatasetKind
from service.config import Settings
from service.analysis.pipeline import AnalysisParameters, dispatch, study_series
from service.errors import InputError
from service.findings import MapName, SegmentKind
from service.inference.final_infarct_inputs import MRI_CHANNELS, normalise
from service.phantom.generate import write_patient
from service.phantom.patient import make_patient, mr_geometry, truth_on_grid

DATASET_VERSION = 2
"""Bump when what a cached study holds changes."""
MRI_SOURCES = ("analysis", "perfusion", "imaging", "phantom", "inference/final_infarct_inputs.py", "inference/channels.py")
"""The service's code (under ``service/``) that draws the patients and makes the inputs."""


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
        "threshold_core": core.mask.astype(bool) if core is not None else empty,
        "threshold_penumbra": penumbra.mask.astype(bool) if penumbra is not None else empty,
        "reperfused": np.bool_(patient.clinical.reperfused),
        "spacing_mm": np.asarray(findings.geometry.spacing, dtype=np.float64),
    }


MRI_DATASET = DatasetKind("final-infarct-mri", DATASET_VERSION, analyse, MRI_SOURCES)
"""The MRI final-infarct studies, cached and built by ``models.training.dataset``."""


def dataset_kind(modality: str) -> DatasetKind:
    """The cached studies the ``modality`` final-infarct networks train on: MRI ones (this module),
    or the CT perfusion ones the core/penumbra model shares (they hold both final infarcts too)."""
    if modality == "mri":
        return MRI_DATASET
    if modality == "ct":
        return CT_DATASET
    raise ValueError(f"no final-infarct dataset for {modality!r}: use mri or ct")
