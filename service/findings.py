"""What one analysis of one study version found: the contract between the stages.

Analysis fills a ``Findings``; results turn it into DICOM objects; delivery and the API read the
vocabularies below. Every stage imports this module and it imports nothing of StrokeGate's (the
geometry type is named for type checkers only), so no stage needs another's internals to talk
about a study's results.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from importlib.metadata import version
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # names for the annotations only: importing this module costs nothing
    import numpy as np
    from pydicom.dataset import Dataset

    from service.imaging.geometry import Geometry

VERSION = version("strokegate")
"""StrokeGate's version as written into results (pyproject.toml's)."""


class SeriesKind(StrEnum):
    """What a received series is, as far as the analyses care (``imaging.classify``)."""

    DWI = "dwi"
    ADC = "adc"
    PWI = "pwi"  # DSC perfusion MRI
    CTP = "ctp"  # CT perfusion, 4D
    CT_MAP = "ct-map"  # a vendor's derived perfusion map
    FLAIR = "flair"
    OTHER = "other"


class Analysis(StrEnum):
    """Which analysis produced a Findings (``analysis.pipeline`` picks it from the series)."""

    MRI_MISMATCH = "mri-perfusion-diffusion-mismatch"
    MRI_DIFFUSION_CORE = "mri-diffusion-core"
    CT_PERFUSION = "ct-perfusion"
    VENDOR_MAPS = "vendor-perfusion-maps"


class MapName(StrEnum):
    """A quantitative map a Findings may carry, in the order its result series are numbered."""

    CBF = "cbf"
    CBV = "cbv"
    MTT = "mtt"
    TTP = "ttp"
    TMAX = "tmax"
    ADC = "adc"

    @property
    def unit(self) -> str:
        """UCUM unit of the map's values."""
        return _MAP_UNITS[self]

    @property
    def title(self) -> str:
        """The name a reader knows it by."""
        return "Tmax" if self is MapName.TMAX else self.value.upper()

    @property
    def place(self) -> int:
        """Offset of its series numbers after the first map's (CBF 0, CBV 1, ... ADC 5)."""
        return list(MapName).index(self)


_MAP_UNITS = {
    MapName.CBF: "ml/100g/min",
    MapName.CBV: "ml/100g",
    MapName.MTT: "s",
    MapName.TTP: "s",
    MapName.TMAX: "s",
    MapName.ADC: "um2/s",  # 1e-6 mm2/s
}


class Measurement(StrEnum):
    """A number a Findings reports; its value is the key used in the API and ``findings.json``."""

    CORE_VOLUME = "core_volume_ml"
    PENUMBRA_VOLUME = "penumbra_volume_ml"
    HYPOPERFUSED_VOLUME = "hypoperfused_volume_ml"
    MISMATCH_VOLUME = "mismatch_volume_ml"
    MISMATCH_RATIO = "mismatch_ratio"
    HYPOPERFUSION_INTENSITY_RATIO = "hypoperfusion_intensity_ratio"
    TARGET_MISMATCH = "target_mismatch"  # 1: DEFUSE 3 target mismatch criteria met, 0: not
    FINAL_IF_REPERFUSED_VOLUME = "predicted_final_reperfused_ml"
    FINAL_IF_NOT_REPERFUSED_VOLUME = "predicted_final_not_reperfused_ml"
    REPERFUSION_SALVAGE = "reperfusion_salvage_ml"  # not-reperfused minus reperfused prediction
    SCENARIO_DICE = "scenario_dice"  # Dice between the two predictions
    RESPONDER = "reperfusion_responder"  # 1: seed 001's responder verdict met, 0: not

    @property
    def unit(self) -> str:
        """Unit of the value: "ml", "ratio" or "1" (a yes/no verdict)."""
        if self.value.endswith("_ml"):
            return "ml"
        return "1" if self in (Measurement.TARGET_MISMATCH, Measurement.RESPONDER) else "ratio"


class SegmentKind(StrEnum):
    """A labelled region a Findings may carry (each becomes one SEG segment)."""

    CORE = "core"
    PENUMBRA = "penumbra"
    FINAL_IF_REPERFUSED = "final_reperfused"  # predicted final infarct if reperfused (learned)
    FINAL_IF_NOT_REPERFUSED = "final_not_reperfused"  # predicted final infarct if not reperfused (learned)


class CoreMethod(StrEnum):
    """Which method's core and penumbra the verdict (volumes, mismatch, target) uses: the threshold
    method (the clinical standard) or a learned model whose segments sit beside it."""

    THRESHOLD = "threshold"
    MODEL = "model"


class ResultCategory(StrEnum):
    """What a destination can be sent: the SEG, the SR, the summary image, the colour map series
    and the map values (Parametric Maps)."""

    SEG = "seg"
    SR = "sr"
    SUMMARY = "summary"
    MAPS = "maps"
    VALUES = "values"


_RESULT_NAME = re.compile(r"^(SEG|SR|SUMMARY)$|^MAP-([a-z]+)-(\d{3})$|^PM-([a-z]+)$")


@dataclass(frozen=True)
class ResultKind:
    """One result object of a study version: its category, and for map series which map (and, for
    a colour series, which slice, from 1)."""

    category: ResultCategory
    map: MapName | None = None
    index: int | None = None

    def __post_init__(self) -> None:
        per_map = self.category in (ResultCategory.MAPS, ResultCategory.VALUES)
        if per_map != (self.map is not None) or (self.category is ResultCategory.MAPS) != (self.index is not None):
            raise ValueError(f"not a result kind: {self.category} {self.map} {self.index}")

    @property
    def name(self) -> str:
        """Its name in file names and the database: "SEG", "SR", "SUMMARY", "MAP-cbf-001", "PM-cbf"."""
        if self.category is ResultCategory.MAPS:
            return f"MAP-{self.map}-{self.index:03d}"
        if self.category is ResultCategory.VALUES:
            return f"PM-{self.map}"
        return self.category.name

    @classmethod
    def parse(cls, name: str) -> ResultKind:
        """The kind a stored ``name`` stands for."""
        match = _RESULT_NAME.match(name)
        if match is None:
            raise ValueError(f"not a result kind name: {name!r}")
        fixed, colour_map, index, value_map = match.groups()
        if fixed:
            return cls(ResultCategory[fixed])
        if colour_map:
            return cls(ResultCategory.MAPS, MapName(colour_map), int(index))
        return cls(ResultCategory.VALUES, MapName(value_map))

    def __str__(self) -> str:
        return self.name


SEG = ResultKind(ResultCategory.SEG)
SR = ResultKind(ResultCategory.SR)
SUMMARY = ResultKind(ResultCategory.SUMMARY)


class NihssSource(StrEnum):
    """How an NIHSS reached StrokeGate."""

    HL7 = "hl7"  # HL7 v2 ORU^R01 over MLLP
    FHIR = "fhir"  # an Observation found on the FHIR server
    REST = "rest"  # POST /api/nihss
    DICOM_CLI = "dicom/cli"  # given with a study on the command line (strokegate process)

    @property
    def title(self) -> str:
        """How a reader of the report sees it named."""
        return _SOURCE_TITLES[self]


_SOURCE_TITLES = {
    NihssSource.HL7: "HL7 v2 ORU^R01",
    NihssSource.FHIR: "FHIR R4 Observation",
    NihssSource.REST: "StrokeGate REST API",
    NihssSource.DICOM_CLI: "command line",
}

NIHSS_MAX = 42
"""The NIH Stroke Scale total runs from 0 to 42."""

NIHSS_NOT_AVAILABLE = "NIHSS not available: imaging only"
"""What the results say when no NIHSS was known for the patient."""


@dataclass(frozen=True)
class NihssUsed:
    """The NIHSS a result used: its value, where it came from and when it was assessed (naive UTC)."""

    value: int
    source: NihssSource
    source_id: str  # the HL7 message control ID, the FHIR resource id, the REST request's id
    assessed_at: datetime
    received_at: datetime
    record_id: int | None = None  # its row in the database

    def describe(self) -> str:
        """One line for the report, e.g. "NIHSS 14 (HL7 v2 ORU^R01, assessed 2026-12-04 13:02 UTC)"."""
        return f"NIHSS {self.value} ({self.source.title}, assessed {self.assessed_at:%Y-%m-%d %H:%M} UTC)"

    def summary(self) -> dict:
        return {
            "value": self.value, "source": self.source.value, "source_id": self.source_id,
            "assessed_at": self.assessed_at.isoformat(timespec="seconds") + "Z",
            "received_at": self.received_at.isoformat(timespec="seconds") + "Z",
        }


def nihss_summary(nihss: NihssUsed | None) -> dict:
    """The ``nihss`` entry of findings.json and the API: the NIHSS used, or that there was none."""
    if nihss is None:
        return {"available": False, "note": NIHSS_NOT_AVAILABLE}
    return {"available": True, **nihss.summary()}


@dataclass(frozen=True)
class ModelInfo:
    """A learned model that contributed to a Findings: written into the results' algorithm
    identification and the API."""

    name: str
    version: str
    sha256: str  # of the model file its card names
    backend: str  # what ran it, e.g. "onnxruntime (CPUExecutionProvider)"

    def summary(self) -> dict:
        return {"name": self.name, "version": self.version, "sha256": self.sha256, "backend": self.backend}

    @classmethod
    def from_summary(cls, data: dict) -> ModelInfo:
        return cls(str(data["name"]), str(data["version"]), str(data["sha256"]), str(data["backend"]))


@dataclass(frozen=True)
class OutcomeRecord:
    """The 90-day outcome a Findings reports: P(mRS 3-6 at 90 days) from a learned model, the NIHSS
    it used (None: imaging only), and the imaging components its combiner takes, kept so that a
    later NIHSS recomputes the probability without the maps."""

    probability: float
    model: ModelInfo
    nihss: NihssUsed | None
    radiomics: float  # the radiomics score (LASSO logistic logit)
    deep: float  # the 2.5D ResNet score
    age: float  # the clinical model's other inputs, from the images' header
    sex_female: bool

    @property
    def inputs_used(self) -> str:
        """One line naming what the probability used, e.g. "NIHSS 14 (...), age 72, female, MRI maps"."""
        clinical = self.nihss.describe() if self.nihss is not None else NIHSS_NOT_AVAILABLE
        return f"{clinical}; age {self.age:g}, {'female' if self.sex_female else 'male'}; radiomics and deep score of the MRI maps"

    def summary(self) -> dict:
        return {
            "probability_mrs_3_6_90d": round(self.probability, 4),
            "model": self.model.summary(),
            "nihss": nihss_summary(self.nihss),
            "inputs_used": self.inputs_used,
            "components": {"radiomics": self.radiomics, "deep": self.deep, "age": self.age, "sex_female": self.sex_female},
        }

    @classmethod
    def from_summary(cls, data: dict, nihss: NihssUsed | None) -> OutcomeRecord:
        """The record ``summary()`` wrote (its probability as stored), with ``nihss`` as the NIHSS used."""
        parts = data["components"]
        return cls(float(data["probability_mrs_3_6_90d"]), ModelInfo.from_summary(data["model"]),
                   nihss, float(parts["radiomics"]), float(parts["deep"]), float(parts["age"]), bool(parts["sex_female"]))


@dataclass(frozen=True)
class FusionOutcomeRecord:
    """Seed 000's 90-day outcome: P(mRS 3-6 at 90 days) fused by Algorithm 1 from one CNN-LSTM
    module per map, the NIHSS that weighted the fusion (None: the plain mean, imaging only), and
    each module's probability, kept so that a later NIHSS re-fuses them without the maps."""

    probability: float
    model: ModelInfo
    nihss: NihssUsed | None
    modules: tuple[tuple[str, float], ...]  # (map, module probability), in the card's module order

    @property
    def inputs_used(self) -> str:
        """One line naming what the probability used, e.g. "NIHSS 14 (...); CNN-LSTM modules on ADC, DWI"."""
        clinical = self.nihss.describe() if self.nihss is not None else NIHSS_NOT_AVAILABLE
        maps = ", ".join("Tmax" if name == "tmax" else name.upper() for name, _ in self.modules)
        return f"{clinical}; CNN-LSTM modules on {maps}, fused by Algorithm 1"

    def summary(self) -> dict:
        return {
            "probability_mrs_3_6_90d": round(self.probability, 4),
            "model": self.model.summary(),
            "nihss": nihss_summary(self.nihss),
            "inputs_used": self.inputs_used,
            "modules": {name: p for name, p in self.modules},
        }

    @classmethod
    def from_summary(cls, data: dict, nihss: NihssUsed | None) -> FusionOutcomeRecord:
        """The record ``summary()`` wrote (its probability as stored), with ``nihss`` as the NIHSS used."""
        modules = tuple((str(name), float(p)) for name, p in data["modules"].items())
        if not modules:
            raise ValueError("the stored CNN-LSTM outcome names no module")
        return cls(float(data["probability_mrs_3_6_90d"]), ModelInfo.from_summary(data["model"]),
                   nihss, modules)


@dataclass(frozen=True)
class Algorithm:
    """Identification written into every result object."""

    name: str = "StrokeGate"
    version: str = VERSION
    family: str = "research use only, not for diagnosis"


@dataclass
class Segment:
    """One labelled region on the source grid: a boolean [slice, row, column] mask."""

    key: SegmentKind
    label: str  # shown to the reader, e.g. "Ischemic core"
    mask: np.ndarray
    volume_ml: float
    model: ModelInfo | None = None  # the learned model that drew it; None: the threshold method

    def __post_init__(self) -> None:
        self.key = SegmentKind(self.key)

    @property
    def ident(self) -> str:
        """Unique among a Findings' segments: the kind, and for a model's segment the model's name."""
        return self.key.value if self.model is None else f"{self.key.value}-{self.model.name}"


@dataclass
class Findings:
    """Everything the results need, with no DICOM encoding decisions in it.

    ``source_images`` are the headers (pydicom Datasets, pixel data not needed) of the series the
    segments are drawn on, ordered like the mask's slices; every result references them and copies
    the patient and study identifiers from them.
    """

    study_uid: str
    version: int
    analysis: Analysis
    geometry: Geometry
    source_images: list[Dataset]
    segments: list[Segment]
    measurements: dict[Measurement, float]
    qc_flags: list[str] = field(default_factory=list)
    maps: dict[MapName, np.ndarray] = field(default_factory=dict)  # float32 on the source grid, in MapName.unit
    parameters: dict[str, float] = field(default_factory=dict)  # thresholds used
    algorithm: Algorithm = field(default_factory=Algorithm)
    models: list[ModelInfo] = field(default_factory=list)
    core_method: CoreMethod = CoreMethod.THRESHOLD  # whose segments the measurements and verdict use
    timings_s: dict[str, float] = field(default_factory=dict)
    nihss: NihssUsed | None = None  # the clinical input the results name; None: imaging only
    dwi: np.ndarray | None = None  # highest-b DWI on the source grid: an input of learned models, not a result series
    brain: np.ndarray | None = None  # CT perfusion: the analysis's brain mask (bool) on the source grid, an input of learned models
    mip: np.ndarray | None = None  # CT perfusion: the series' temporal maximum (HU) on the source grid, an input of learned models
    outcome: OutcomeRecord | None = None  # the 90-day outcome (learned models on, MRI with perfusion): seed 004's CRD
    outcome_cnn_lstm: FusionOutcomeRecord | None = None  # the same from seed 000's CNN-LSTM modules and Algorithm 1

    def __post_init__(self) -> None:
        """Names given as plain strings become the vocabularies' members (ValueError if unknown)."""
        self.analysis = Analysis(self.analysis)
        self.core_method = CoreMethod(self.core_method)
        self.measurements = {Measurement(k): v for k, v in self.measurements.items()}
        self.maps = {MapName(k): v for k, v in self.maps.items()}

    @property
    def outcomes(self) -> tuple[OutcomeRecord | FusionOutcomeRecord, ...]:
        """The 90-day outcomes the results report, one per model that made one (CRD first)."""
        return tuple(o for o in (self.outcome, self.outcome_cnn_lstm) if o is not None)

    def uses(self, segment: Segment) -> bool:
        """Whether ``segment`` is a core or penumbra drawn by the method the measurements and the verdict
        use (the predicted final infarcts, learned either way, never are)."""
        return segment.key in (SegmentKind.CORE, SegmentKind.PENUMBRA) and (segment.model is not None) == (self.core_method is CoreMethod.MODEL)

    def segment(self, kind: SegmentKind) -> Segment | None:
        """The segment of ``kind`` the verdict uses, if there is one."""
        return next((s for s in self.segments if s.key is kind and self.uses(s)), None)

    def summary(self) -> dict:
        """JSON-able record (no arrays, no patient identifiers) for the database and the API."""
        return {
            "study_uid": self.study_uid,
            "version": self.version,
            "analysis": self.analysis.value,
            "measurements": {Measurement(k).value: round(float(v), 3) for k, v in self.measurements.items()},
            "core_method": self.core_method.value,
            "segments": {s.ident: round(float(s.volume_ml), 3) for s in self.segments},
            "qc_flags": list(self.qc_flags),
            "parameters": dict(self.parameters),
            "algorithm": {"name": self.algorithm.name, "version": self.algorithm.version},
            "models": [m.summary() for m in self.models],
            "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()},
            "nihss": nihss_summary(self.nihss),
            "outcome": self.outcome.summary() if self.outcome is not None else None,
            "outcome_cnn_lstm": self.outcome_cnn_lstm.summary() if self.outcome_cnn_lstm is not None else None,
        }
