"""The outcome models' card: the JSON beside the weights that holds the fitted coefficients (the
logistic parts of seed 004's CRD model and seed 000's fusion thresholds), the networks' files and
contracts, the evaluation on held-out synthetic patients, and the research-only notice.
``read_outcome_card`` validates one and refuses (``ModelError``) what the service cannot use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.errors import ModelError
from service.inference.card import RESEARCH_ONLY


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LinearScore(_Strict):
    """intercept + sum(coefficient * (x - mean) / scale) over the named inputs."""

    names: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coefficients: tuple[float, ...]
    intercept: float

    @model_validator(mode="after")
    def _same_lengths(self) -> LinearScore:
        lengths = {len(self.names), len(self.mean), len(self.scale), len(self.coefficients)}
        if len(lengths) != 1:
            raise ValueError("names, mean, scale and coefficients differ in length")
        if any(s <= 0 for s in self.scale):
            raise ValueError("every scale must be positive")
        return self

    def score(self, values: dict[str, float] | np.ndarray) -> np.ndarray:
        """The score of one row (a dict by name) or of rows ([N, len(names)] in names order)."""
        x = np.array([[values[n] for n in self.names]], dtype=np.float64) if isinstance(values, dict) else np.asarray(values, dtype=np.float64)
        return self.intercept + ((x - np.asarray(self.mean)) / np.asarray(self.scale)) @ np.asarray(self.coefficients)


class NetworkFile(_Strict):
    file: str  # ONNX file name beside the card
    sha256: str
    input: str
    input_shape: tuple[int | str, ...]
    output: str
    maps: tuple[str, ...]  # the maps, in channel order (service.inference.outcome_inputs)
    parity: float = Field(ge=0)  # torch against ONNX Runtime on the bundled test input


class OutcomeEvaluation(_Strict):
    model: str
    split: str
    family: str
    patients: int
    auc: float
    ceiling_auc: float
    calibration_slope: float
    calibration_intercept: float
    brier: float


class OutcomeCard(_Strict):
    name: str
    version: str
    intended_use: str
    outcome: str  # what the probability is of
    clinical: LinearScore  # with the NIHSS
    clinical_imaging_only: LinearScore  # without it (NIHSS not available)
    radiomics: LinearScore  # LASSO-selected features (service.analysis.outcome_radiomics names)
    deep: NetworkFile
    combined: LinearScore  # over clinical, radiomics, deep scores -> logit P
    combined_imaging_only: LinearScore
    evaluation: tuple[OutcomeEvaluation, ...]
    training: dict[str, object]

    @model_validator(mode="after")
    def _research_only(self) -> OutcomeCard:
        if RESEARCH_ONLY not in self.intended_use:
            raise ValueError(f"intended_use must say {RESEARCH_ONLY!r}")
        return self


class FusionCard(_Strict):
    """Seed 000's CNN-LSTM modules (one ONNX file per map) and Algorithm 1's learned parameters."""

    name: str
    version: str
    intended_use: str
    outcome: str
    modules: tuple[NetworkFile, ...]  # one per map, in fusion order; each file's ``maps`` names its map
    thresholds: tuple[float, ...]  # tau_i, in module order
    nihss_low: float
    nihss_high: float
    recalibration: tuple[float, float] = (0.0, 1.0)  # (intercept, slope) on the fused logit, fitted on validation patients
    evaluation: tuple[OutcomeEvaluation, ...]
    training: dict[str, object]

    @model_validator(mode="after")
    def _consistent(self) -> FusionCard:
        if RESEARCH_ONLY not in self.intended_use:
            raise ValueError(f"intended_use must say {RESEARCH_ONLY!r}")
        if len(self.thresholds) != len(self.modules):
            raise ValueError("one threshold per module")
        if self.nihss_high <= self.nihss_low:
            raise ValueError("nihss_high must exceed nihss_low")
        if self.recalibration[1] <= 0:
            raise ValueError("the recalibration slope must be positive (it keeps the order of the probabilities)")
        return self


CardT = TypeVar("CardT", bound=BaseModel)


def _read(kind: type[CardT], path: Path, what: str) -> CardT:
    try:
        return kind.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError as error:
        raise ModelError(f"no {what} card at {path}") from error
    except (json.JSONDecodeError, ValidationError) as error:
        raise ModelError(f"{what} card {path} is not valid: {str(error).splitlines()[0]}") from error


def read_outcome_card(path: Path) -> OutcomeCard:
    """Read and validate seed 004's card; ``ModelError`` saying why when it cannot be used."""
    return _read(OutcomeCard, path, "outcome model")


def read_fusion_card(path: Path) -> FusionCard:
    """Read and validate seed 000's card; ``ModelError`` saying why when it cannot be used."""
    return _read(FusionCard, path, "CNN-LSTM outcome model")


def write_outcome_card(card: OutcomeCard | FusionCard, path: Path) -> Path:
    """Write either outcome card as JSON at ``path``."""
    path.write_text(json.dumps(card.model_dump(mode="json"), indent=1) + "\n", encoding="utf-8")
    return path
