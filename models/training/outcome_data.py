"""The outcome models' training data: synthetic patients' admission MRI maps and clinical records.

Each patient of a phantom family is drawn (``make_patient``) and imaged on a small MR grid: the
DWI (b = 1000) and ADC as the scanner measures them (Rician noise, ``diffusion``), and the
perfusion maps CBF, CBV and Tmax from the phantom's truth with multiplicative noise and a slight
blur standing in for the deconvolution's (the DSC series is not simulated and deconvolved per
patient: that would cost ~10 s each for hundreds of patients). The core and the hypoperfused
region are the phantom's zones on this grid (the service's segmentation stands in for them at
inference: on a 3.6 mm grid a voxelwise ADC threshold of the noisy map is mostly noise).
The label is the phantom's 90-day mRS (3-6 poor); its true and admission probabilities are kept
for the ceiling. One ``.npz`` per chunk of 10 patients is cached under the dataset folder.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from models.training.cohort import FAMILIES, FAMILY_STRIDE, FIRST_SEED
from service.phantom import families
from service.phantom.families import draw_design
from service.phantom.patient import _STREAMS, axial_geometry, diffusion, make_patient, truth_on_grid

MRI_MAPS = ("adc", "dwi", "tmax", "cbf", "cbv")
"""The MRI maps of seed 000's modules, in channel order."""
MATRIX, SLICES, FOV_MM, SLICE_MM = 64, 20, 230.0, 6.0
"""The outcome grid: coarse, since an outcome needs the lesion's extent and place, not its edge."""
OUTCOME_DATASET_VERSION = 1
DESIGN_STREAM = _STREAMS["design"]
OUTCOME_SEED_OFFSET = 5_000
"""Outcome patients start 5000 seeds into each family's block, away from the CT model's cohort."""


@dataclass(frozen=True)
class OutcomeCohort:
    """Arrays of a set of patients, first axis the patient."""

    family: np.ndarray  # str
    seed: np.ndarray  # int
    maps: np.ndarray  # float16 [N, 5, Z, Y, X] in MRI_MAPS order, raw units (ADC 1e-6 mm2/s, Tmax s)
    brain: np.ndarray  # bool [N, Z, Y, X]
    core: np.ndarray  # bool [N, Z, Y, X]
    hypoperfused: np.ndarray  # bool [N, Z, Y, X]
    age: np.ndarray
    sex_female: np.ndarray
    nihss: np.ndarray
    onset_to_imaging_min: np.ndarray
    mrs_90d: np.ndarray
    p_true: np.ndarray
    p_admission: np.ndarray
    voxel_ml: float

    @property
    def poor(self) -> np.ndarray:
        return self.mrs_90d >= 3

    def take(self, index: np.ndarray) -> OutcomeCohort:
        fields = {name: getattr(self, name)[index] for name in _ARRAY_FIELDS}
        return OutcomeCohort(**fields, voxel_ml=self.voxel_ml)

    def __len__(self) -> int:
        return len(self.seed)


_ARRAY_FIELDS = ("family", "seed", "maps", "brain", "core", "hypoperfused", "age", "sex_female", "nihss",
                 "onset_to_imaging_min", "mrs_90d", "p_true", "p_admission")


def outcome_geometry():
    return axial_geometry(MATRIX, FOV_MM, SLICES, 5.0, SLICE_MM, centre_z=25.0)


def perfusion_noise(truth_map: np.ndarray, brain: np.ndarray, rng: np.random.Generator, relative: float) -> np.ndarray:
    """A truth map as an analysis would give it: multiplicative noise, blurred by half a voxel."""
    noisy = truth_map * (1.0 + relative * rng.standard_normal(truth_map.shape))
    return np.where(brain, ndimage.gaussian_filter(noisy, (0.0, 0.6, 0.6)), 0.0).astype(np.float32)


def simulate_patient(family: str, seed: int) -> dict[str, np.ndarray | float]:
    """One patient's admission maps, masks and clinical record."""
    patient = make_patient(seed, FAMILIES[family](10.0))
    geometry = outcome_geometry()
    truth = truth_on_grid(patient, geometry)
    dwi = diffusion(patient, truth)
    rng = np.random.default_rng([seed, 77])
    brain = truth.brain
    adc = np.where(brain, dwi["adc"], 0.0)
    tmax = perfusion_noise(truth.tmax, brain, rng, 0.08)
    maps = np.stack([adc, np.where(brain, dwi["b1000"], 0.0), tmax,
                     perfusion_noise(truth.cbf, brain, rng, 0.15), perfusion_noise(truth.cbv, brain, rng, 0.15)])
    c = patient.clinical
    return {
        "maps": maps.astype(np.float16),
        "brain": brain,
        "core": truth.masks["core"],
        "hypoperfused": truth.masks["hypoperfused"],
        "age": float(c.age), "sex_female": float(c.sex == "F"), "nihss": float(c.nihss),
        "onset_to_imaging_min": float(c.onset_to_imaging_min), "mrs_90d": float(c.mrs_90d),
        "p_true": c.p_poor_outcome, "p_admission": c.p_poor_outcome_admission,
        "voxel_ml": geometry.voxel_volume_ml,
    }


CHUNK = 10
"""Patients per cached file: a chunk is the unit of work of one process."""


def design_order(family: str, seeds: list[int]) -> list[int]:
    """``seeds`` sorted by the head model their design asks for (anatomy, cortex, artery radius):
    the phantom caches the last two head models, and building one costs far more than a patient."""
    variation = families.FAMILIES[family].variation

    def key(seed: int) -> tuple[str, float, float]:
        design = draw_design(variation, np.random.default_rng([seed, DESIGN_STREAM]))
        return (design.anatomy, design.cortex_mm, design.artery_radius_mm)

    return sorted(seeds, key=lambda s: (key(s), s))


def _chunk_path(folder: Path, family: str, count: int, index: int) -> Path:
    return folder / f"v{OUTCOME_DATASET_VERSION}" / f"{family}-{count}-{index}.npz"


def build_chunk(family: str, seeds: list[int], path: Path) -> tuple[Path, float]:
    """Simulate (or find cached) the patients ``seeds`` of ``family`` into ``path``."""
    if path.is_file():
        return path, 0.0
    started = time.perf_counter()
    rows = [simulate_patient(family, seed) for seed in seeds]
    arrays = {key: np.stack([np.asarray(r[key]) for r in rows]) for key in rows[0] if key != "voxel_ml"}
    arrays["seed"] = np.asarray(seeds)
    arrays["voxel_ml"] = np.float64(rows[0]["voxel_ml"])
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial.npz")
    np.savez_compressed(partial, **arrays)
    partial.replace(path)  # a crash leaves no half-written chunk
    return path, time.perf_counter() - started


def first_seed(family: str) -> int:
    return FIRST_SEED + list(FAMILIES).index(family) * FAMILY_STRIDE + OUTCOME_SEED_OFFSET


def family_block(family: str, count: int, folder: Path, jobs: int = 1,
                 on_chunk: Callable[[str, int, float], None] | None = None) -> OutcomeCohort:
    """The first ``count`` outcome patients of ``family``, in seed order (built in chunks of
    patients that share a head model)."""
    ordered = design_order(family, list(range(first_seed(family), first_seed(family) + count)))
    chunks = [ordered[i:i + CHUNK] for i in range(0, count, CHUNK)]
    paths = [_chunk_path(folder, family, count, k) for k in range(len(chunks))]
    if jobs <= 1:
        for k, (seeds, path) in enumerate(zip(chunks, paths, strict=True)):
            seconds = build_chunk(family, seeds, path)[1]
            if on_chunk is not None:
                on_chunk(family, k, seconds)
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(build_chunk, family, seeds, path): k for k, (seeds, path) in enumerate(zip(chunks, paths, strict=True))}
            for future in as_completed(futures):
                if on_chunk is not None:
                    on_chunk(family, futures[future], future.result()[1])
    cohort = concatenate([_load_chunk(path, family) for path in paths])
    return cohort.take(np.argsort(cohort.seed, kind="stable"))


def _load_chunk(path: Path, family: str) -> OutcomeCohort:
    with np.load(path) as data:
        values = {key: data[key] for key in data.files}
    n = len(values["seed"])
    return OutcomeCohort(family=np.full(n, family), seed=values["seed"], maps=values["maps"], brain=values["brain"],
                         core=values["core"], hypoperfused=values["hypoperfused"], age=values["age"],
                         sex_female=values["sex_female"], nihss=values["nihss"],
                         onset_to_imaging_min=values["onset_to_imaging_min"], mrs_90d=values["mrs_90d"].astype(int),
                         p_true=values["p_true"], p_admission=values["p_admission"], voxel_ml=float(values["voxel_ml"]))


def concatenate(cohorts: list[OutcomeCohort]) -> OutcomeCohort:
    fields = {name: np.concatenate([getattr(c, name) for c in cohorts]) for name in _ARRAY_FIELDS}
    return OutcomeCohort(**fields, voxel_ml=cohorts[0].voxel_ml)
