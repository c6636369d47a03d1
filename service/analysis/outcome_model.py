"""Seed 004's CRD outcome model in the service: a study's MRI maps, masks and clinical record ->
P(mRS 3-6 at 90 days), with the model's identification and the inputs it used.

The card (``models/weights/outcome-crd.card.json``) holds the logistic coefficients; the ResNet
runs through ONNX Runtime. Without an NIHSS the model's imaging-only combiner is used (age and
sex, radiomics, deep score), and the result says so ("NIHSS not available: imaging only").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import numpy as np

from service.analysis.outcome_radiomics import feature_names, region_features
from service.errors import InputError, ModelError
from service.findings import NIHSS_NOT_AVAILABLE, ModelInfo, NihssUsed, OutcomeRecord
from service.inference.outcome_card import OutcomeCard, read_outcome_card
from service.inference.outcome_inputs import MRI_MAPS, lesion_slice, network_maps, slab_25d

DEFAULT_CARD = Path(__file__).resolve().parents[2] / "models" / "weights" / "outcome-crd.card.json"


@dataclass(frozen=True)
class OutcomeInputs:
    """What the outcome model reads of one study (maps on the study's grid, [Z, Y, X])."""

    maps: dict[str, np.ndarray]  # MRI_MAPS: ADC (1e-6 mm2/s), DWI, Tmax (s), CBF, CBV
    brain: np.ndarray
    core: np.ndarray
    hypoperfused: np.ndarray
    spacing_mm: tuple[float, float, float]
    age: float
    sex_female: bool
    nihss: NihssUsed | None


@dataclass(frozen=True)
class OutcomePrediction:
    probability: float  # P(mRS 3-6 at 90 days)
    model: ModelInfo
    nihss: NihssUsed | None  # None: imaging only
    scores: dict[str, float]  # clinical, radiomics, deep: the combiner's inputs

    @property
    def inputs_used(self) -> str:
        return self.nihss.describe() if self.nihss is not None else NIHSS_NOT_AVAILABLE


class CrdOutcomeModel:
    """Loaded once; ``predict`` keeps no state and ONNX Runtime's ``run`` is thread-safe, so one
    instance serves a process's worker threads."""

    def __init__(self, card_path: Path = DEFAULT_CARD) -> None:
        import onnxruntime

        self.card: OutcomeCard = read_outcome_card(card_path)
        onnx_path = card_path.parent / self.card.deep.file
        try:
            data = onnx_path.read_bytes()
        except FileNotFoundError as error:
            raise ModelError(f"the outcome model's network {onnx_path} is missing") from error
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.card.deep.sha256:
            raise ModelError(f"{onnx_path.name} does not match its card (sha256 {digest[:12]}, card {self.card.deep.sha256[:12]})")
        if tuple(self.card.deep.maps) != MRI_MAPS:
            raise ModelError(f"the outcome card's maps {self.card.deep.maps} are not the service's {MRI_MAPS}")
        unknown = set(self.card.radiomics.names) - set(feature_names(MRI_MAPS))
        if unknown:
            raise ModelError(f"the outcome card names radiomics features the service does not compute: {sorted(unknown)[:3]}")
        self.session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        self.info = ModelInfo(self.card.name, self.card.version, digest, "onnxruntime (CPUExecutionProvider)")

    def predict(self, study: OutcomeInputs) -> OutcomePrediction:
        missing = [m for m in MRI_MAPS if m not in study.maps]
        if missing:
            raise InputError(f"the outcome model needs the maps {missing}, which this study lacks")
        shape = study.brain.shape
        if any(np.shape(study.maps[m]) != shape for m in MRI_MAPS) or study.core.shape != shape or study.hypoperfused.shape != shape:
            raise InputError("the outcome model's maps and masks differ in shape")
        if shape[0] < 1 or not study.brain.any():
            raise InputError("the outcome model needs a brain mask with at least one voxel")
        maps = {m: np.asarray(study.maps[m], dtype=np.float32) for m in MRI_MAPS}
        features = region_features(maps, study.brain, study.core, study.hypoperfused, study.spacing_mm)
        names = feature_names(MRI_MAPS)
        radiomics = float(self.card.radiomics.score(features[[names.index(n) for n in self.card.radiomics.names]][None, :])[0])
        slab = slab_25d(network_maps(maps, study.brain), lesion_slice(study.hypoperfused, study.core))[None]
        deep = float(self.session.run([self.card.deep.output], {self.card.deep.input: slab})[0][0])
        probability, clinical = combine(self.card, radiomics, deep, study.age, study.sex_female, study.nihss)
        return OutcomePrediction(probability, self.info, study.nihss,
                                 {"clinical": clinical, "radiomics": radiomics, "deep": deep})


def combine(card: OutcomeCard, radiomics: float, deep: float, age: float, sex_female: bool,
            nihss: NihssUsed | None) -> tuple[float, float]:
    """(P(mRS 3-6 at 90 days), clinical score) from the imaging scores and the clinical record: the
    card's full combiner with an NIHSS, its imaging-only combiner without. The same arithmetic for
    a fresh prediction and for a late NIHSS (``recompute``)."""
    record = {"age": float(age), "sex_female": float(sex_female)}
    if nihss is not None:
        clinical = float(card.clinical.score({**record, "nihss": float(nihss.value)})[0])
        combiner = card.combined
    else:
        clinical = float(card.clinical_imaging_only.score(record)[0])
        combiner = card.combined_imaging_only
    logit = float(combiner.score(np.array([[clinical, radiomics, deep]]))[0])
    return float(1.0 / (1.0 + np.exp(-logit))), clinical


def recompute(card: OutcomeCard, record: OutcomeRecord, nihss: NihssUsed | None) -> OutcomeRecord:
    """The outcome ``record`` with ``nihss`` as the clinical input: the stored imaging components
    combined again (no maps needed). ModelError when the card is not the model that made it."""
    if card.name != record.model.name or card.version != record.model.version:
        raise ModelError(f"the outcome was made by {record.model.name} {record.model.version}, "
                         f"the loaded card is {card.name} {card.version}")
    probability, _ = combine(card, record.radiomics, record.deep, record.age, record.sex_female, nihss)
    return replace(record, probability=probability, nihss=nihss)


def to_record(prediction: OutcomePrediction, age: float, sex_female: bool) -> OutcomeRecord:
    """The Findings' outcome record of a prediction (its imaging components kept for a later NIHSS)."""
    return OutcomeRecord(prediction.probability, prediction.model, prediction.nihss,
                         prediction.scores["radiomics"], prediction.scores["deep"], float(age), bool(sex_female))


@cache
def outcome_model(card_path: Path = DEFAULT_CARD) -> CrdOutcomeModel:
    """The model of ``card_path``, loaded once per process (an ONNX session is costly to open)."""
    return CrdOutcomeModel(card_path)


@cache
def outcome_card(card_path: Path = DEFAULT_CARD) -> OutcomeCard:
    """The card alone (what ``recompute`` needs), read once per process."""
    return read_outcome_card(card_path)
