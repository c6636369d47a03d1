"""What one analysis of one study version found: the contract between analysis and results."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

import service
from service.imaging.geometry import Geometry


@dataclass(frozen=True)
class Algorithm:
    """Identification written into every result object."""

    name: str = "StrokeGate"
    version: str = service.__version__
    family: str = "research use only, not for diagnosis"


@dataclass
class Segment:
    """One labelled region on the source grid: a boolean [slice, row, column] mask."""

    key: str  # "core", "penumbra", ...
    label: str  # shown to the reader, e.g. "Ischemic core"
    mask: np.ndarray
    volume_ml: float


@dataclass
class Findings:
    """Everything the results need, with no DICOM encoding decisions in it.

    ``source_images`` are the headers (pydicom Datasets, pixel data not needed) of the series the
    segments are drawn on, ordered like the mask's slices; every result references them and copies
    the patient and study identifiers from them.
    """

    study_uid: str
    version: int
    analysis: str  # e.g. "mri-diffusion-core"
    geometry: Geometry
    source_images: list[Dataset]
    segments: list[Segment]
    measurements: dict[str, float]  # name -> value, units in MEASUREMENT_UNITS
    qc_flags: list[str] = field(default_factory=list)
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. "cbf", "tmax", "adc": float32 on the source grid
    parameters: dict[str, float] = field(default_factory=dict)  # thresholds used
    algorithm: Algorithm = field(default_factory=Algorithm)
    timings_s: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-able record (no arrays, no patient identifiers) for the database and the API."""
        return {
            "study_uid": self.study_uid,
            "version": self.version,
            "analysis": self.analysis,
            "measurements": {k: round(float(v), 3) for k, v in self.measurements.items()},
            "segments": {s.key: round(float(s.volume_ml), 3) for s in self.segments},
            "qc_flags": list(self.qc_flags),
            "parameters": dict(self.parameters),
            "algorithm": {"name": self.algorithm.name, "version": self.algorithm.version},
            "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()},
        }


MAP_UNITS = {
    "cbf": "ml/100g/min",
    "cbv": "ml/100g",
    "mtt": "s",
    "ttp": "s",
    "tmax": "s",
    "adc": "um2/s",  # 1e-6 mm2/s
}
"""UCUM units of the quantitative maps a Findings may carry."""

MEASUREMENT_UNITS = {
    "core_volume_ml": "ml",
    "penumbra_volume_ml": "ml",
    "hypoperfused_volume_ml": "ml",
    "mismatch_volume_ml": "ml",
    "mismatch_ratio": "ratio",
    "hypoperfusion_intensity_ratio": "ratio",
    "target_mismatch": "1",  # 1 = target mismatch (DEFUSE 3 criteria met), 0 = not
}
