"""The training data: synthetic patients through the service's own analyses, one cached ``.npz``
per study, for every learned model.

A ``DatasetKind`` says what a cached study of one kind holds (its ``analyse`` function), its
version and which service sources made it; ``build`` makes (or finds cached) the studies of a
cohort with a few processes. One ``.npz`` per study is cached under the dataset folder (ignored by
git), in a folder named by the kind's version and the fingerprint of the analysis that made it, so
that a changed analysis (or phantom) never reuses studies it did not make.

The CT perfusion kind (``CT_DATASET``, the core/penumbra model's and the CT final-infarct
networks'): each study is simulated as arrays (the phantom's frames, quantised to the integer HU a scanner
stores, exactly what the DICOM path reads back) and analysed by ``analyse_ctp_series``, the
function the service runs after loading DICOM; the model inputs are then made by
``service.inference.ctp_inputs``, as the service makes them. Writing and reading the DICOM files
would cost ~7 s a study and change nothing (tests/unit/test_training.py checks that the
maps agree). It holds both final-infarct truths of the patient beside the core/penumbra labels.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

import service

from models.training.cohort import FAMILIES, SampleSpec
from service.analysis.ctp_model import model_inputs
from service.analysis.ctp_perfusion import CtpParameters, analyse_ctp_series
from service.errors import InputError
from service.imaging.geometry import Geometry
from service.inference.ctp_inputs import normalise
from service.phantom.patient import Truth, ct_geometry, ct_perfusion, make_patient, truth_on_grid

CT_INTERCEPT, CT_BITS = -1024.0, 12
"""How the phantom's CT perfusion series is stored as DICOM (service.phantom.generate)."""
DATASET_VERSION = 3
"""Bump when what a cached CT study holds changes."""
ANALYSIS_SOURCES = ("perfusion", "imaging", "phantom", "analysis/ctp_perfusion.py", "analysis/ctp_model.py", "inference/ctp_inputs.py")
"""The service's code (under ``service/``) that draws the patients and makes the maps and inputs."""


@dataclass(frozen=True)
class Simulated:
    frames: np.ndarray  # [T, Z, Y, X] HU, integer-valued as stored
    times_s: np.ndarray
    geometry: Geometry
    truth: Truth
    nihss: int


def simulate(spec: SampleSpec) -> Simulated:
    """The CT perfusion study of ``spec`` as the service would read it from DICOM."""
    patient = make_patient(spec.seed, FAMILIES[spec.family](spec.noise_hu))
    geometry = ct_geometry(patient)
    truth = truth_on_grid(patient, geometry)
    series = ct_perfusion(patient, truth)
    top = 2**CT_BITS - 1
    frames = np.stack([np.clip(np.rint(frame - CT_INTERCEPT), 0, top) + CT_INTERCEPT for frame in series.frames]).astype(np.float32)
    return Simulated(frames, np.asarray(series.times, dtype=np.float64), geometry, truth, int(patient.clinical.nihss))


def analyse(simulated: Simulated, parameters: CtpParameters = CtpParameters()) -> dict[str, np.ndarray]:
    """The service's analysis and model inputs of one simulated study, and its truth, as arrays."""
    result = analyse_ctp_series(simulated.frames, simulated.times_s, simulated.geometry, parameters)
    fed = model_inputs(simulated.frames, result.maps, result.brain)
    truth = simulated.truth
    labels = np.zeros(result.brain.shape, dtype=np.uint8)
    labels[truth.masks["penumbra"]] = 1
    labels[truth.masks["core"]] = 2
    return {
        "inputs": normalise(fed.maps, fed.mip, fed.brain),  # what the service feeds the model
        "brain": result.brain,
        "labels": labels,  # truth: 0 healthy or outside, 1 penumbra, 2 core
        "truth_brain": truth.brain,
        "threshold_core": result.core,
        "threshold_penumbra": result.penumbra,
        "final_reperfused": truth.masks["final_reperfused"] & truth.brain,
        "final_not_reperfused": truth.masks["final_not_reperfused"] & truth.brain,
        "nihss": np.int16(simulated.nihss),
        "spacing_mm": np.asarray(simulated.geometry.spacing, dtype=np.float64),
    }


def analyse_ct(spec: SampleSpec) -> dict[str, np.ndarray]:
    """One CT perfusion study of the cohort, simulated and analysed (``CT_DATASET``)."""
    return analyse(simulate(spec))


@dataclass(frozen=True)
class DatasetKind:
    """One kind of cached study: what ``analyse`` makes of a cohort's ``SampleSpec``, the version of
    what it holds, and the service sources (under ``service/``) and parameters that made it."""

    name: str
    version: int
    analyse: Callable[[SampleSpec], dict[str, np.ndarray]]
    sources: tuple[str, ...]
    parameters: object = None


CT_DATASET = DatasetKind("ctp", DATASET_VERSION, analyse_ct, ANALYSIS_SOURCES, CtpParameters())


@cache
def source_fingerprint(sources: tuple[str, ...], parameters: object = None, root: Path | None = None) -> str:
    """sha256 (12 hex digits) of ``sources`` under ``root`` (the service's package by default)
    and the parameters' repr: which analysis a cached study came from."""
    root = Path(service.__file__).parent if root is None else root
    digest = hashlib.sha256(repr(parameters).encode())
    for name in sources:
        path = root / name
        for source in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(source.relative_to(root).as_posix().encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:12]


def analysis_fingerprint(parameters: CtpParameters = CtpParameters(), root: Path | None = None) -> str:
    """The CT perfusion analysis's fingerprint (``ANALYSIS_SOURCES`` and ``parameters``)."""
    return source_fingerprint(ANALYSIS_SOURCES, parameters, root)


def dataset_folder(folder: Path, kind: DatasetKind = CT_DATASET) -> Path:
    """Where the studies of ``kind``, made by today's analysis, are cached under ``folder``."""
    return folder / f"v{kind.version}-{source_fingerprint(kind.sources, kind.parameters)}"


def sample_path(folder: Path, spec: SampleSpec, kind: DatasetKind = CT_DATASET) -> Path:
    return dataset_folder(folder, kind) / f"{spec.key}.npz"


def build_sample(spec: SampleSpec, folder: Path, kind: DatasetKind = CT_DATASET) -> tuple[SampleSpec, Path | None, float, str]:
    """Build (or find cached) one study; returns (spec, path or None if the analysis refused it,
    seconds, reason)."""
    path = sample_path(folder, spec, kind)
    if path.is_file():
        return spec, path, 0.0, "cached"
    started = time.perf_counter()
    try:
        arrays = kind.analyse(spec)
    except InputError as error:
        return spec, None, time.perf_counter() - started, str(error)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial.npz")
    np.savez_compressed(partial, **arrays)
    partial.replace(path)  # a crash leaves no half-written study behind
    return spec, path, time.perf_counter() - started, "built"


def build(specs: Iterable[SampleSpec], folder: Path, jobs: int = 1,
          on_done: Callable[[SampleSpec, Path | None, float, str], None] | None = None,
          kind: DatasetKind = CT_DATASET) -> dict[SampleSpec, Path]:
    """Build every study of ``kind`` (``jobs`` processes); the studies the analysis refused are left
    out (``on_done`` hears of each, with the reason)."""
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
            record(build_sample(spec, folder, kind))
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for future in as_completed([pool.submit(build_sample, spec, folder, kind) for spec in specs]):
                record(future.result())
    return {spec: built[spec] for spec in specs if spec in built}


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {key: data[key] for key in data.files}
