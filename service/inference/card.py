"""Model cards: the JSON file beside every weight file, and the checks made on it at load.

A card says what the model takes (tensors, channels in order with their units and normalisation,
the voxel spacing and image sizes it was trained on), what it gives (the classes), how it was made
(phantom families, counts, seeds, the command), how well it did on held-out patients, and that it
is for research only. ``read_card`` validates a card; ``check_contract`` compares it with what the
service would feed the model, and ``verify_files`` compares the files with their sha256. Each
refusal is a ``ModelError`` that says why.
"""

from __future__ import annotations

import hashlib
import json
from enum import Enum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from service.errors import ModelError

CARD_SUFFIX = ".card.json"
"""A model ``name.onnx`` has its card in ``name.card.json`` beside it."""

RESEARCH_ONLY = "Research use only. Not for diagnosis."


class Normalisation(str, Enum):
    """How the service scales one input channel before the model sees it (``ctp_inputs.normalise``)."""

    RATIO_TO_BRAIN_MEDIAN = "ratio_to_brain_median"  # x / median(x over the brain)
    OFFSET_FROM_BRAIN_MEDIAN = "offset_from_brain_median"  # (x - median(x over the brain)) / scale
    SCALE = "scale"  # x / scale


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputChannel(_Strict):
    """One channel of the image input, in the order the model takes them."""

    name: str  # "cbf", "cbv", "ttp", "tmax", "mip"
    unit: str  # before normalisation, e.g. "mL/100 g/min"
    normalisation: Normalisation
    scale: float = Field(1.0, gt=0)
    clip: tuple[float, float]  # the normalised value is clipped to this range
    outside_brain: Literal["zero", "kept"]  # set to 0 outside the brain mask, or kept (the MIP)


class TensorSpec(_Strict):
    """A graph input or output: name, element type, shape (ints, or names of free dimensions)."""

    name: str
    dtype: Literal["float32"]
    shape: tuple[int | str, ...]


class Range(_Strict):
    low: float
    high: float

    def holds(self, value: float) -> bool:
        return self.low <= value <= self.high


class InputsCard(_Strict):
    tensors: tuple[TensorSpec, ...]
    channels: tuple[InputChannel, ...]
    clinical: tuple[str, ...]  # meaning of each column of the clinical input, in order
    in_plane_spacing_mm: Range
    slice_spacing_mm: Range
    image_size: Range  # height and width, pixels
    size_multiple: int = Field(ge=1)  # height and width are padded to a multiple of this


class OutputsCard(_Strict):
    tensor: TensorSpec
    classes: tuple[str, ...]  # index -> class name
    restricted_to: str  # e.g. "brain mask: outside it, probability 1 for the first class"


class FileRef(_Strict):
    name: str  # beside the card
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class FilesCard(_Strict):
    onnx: FileRef
    exported_program: FileRef | None = None  # torch.export program (.pt2) for the torch backend
    test_input: FileRef  # .npz: inputs and the reference probabilities, for parity checks


class TrainingCard(_Strict):
    families: tuple[str, ...]
    held_out_family: str | None
    noise_hu: tuple[float, ...]
    counts: dict[str, int]  # patients per split: train, validation, test, held_out
    seeds: dict[str, int | list[int]]  # seeds of the patients per split, and of the training
    command: str  # the command that made this file
    duration_s: float  # dataset and training, on the machine below
    machine: str
    epochs: int
    notes: str = ""


class MetricRow(_Strict):
    split: str  # "test" or "held-out"
    family: str
    noise_hu: float
    method: Literal["model", "model, NIHSS unknown", "model with measured core", "threshold", "mismatch"]
    cls: str = Field(alias="class")
    patients: int
    dice: float
    hd95_mm: float | None  # None where neither mask has a voxel in any patient
    volume_difference_ml: float  # median of |V_pred - V_true|
    precision: float | None = None  # seed 001's further metrics, where the report has them
    recall: float | None = None
    volumetric_similarity: float | None = None
    auc: float | None = None  # voxel AUC

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ParityCard(_Strict):
    reference: str  # what made the test input's probabilities (e.g. "torch 2.13.0 eager, float32")
    max_abs_probability_difference: float  # measured at export: ONNX Runtime against the reference
    tolerance: float


class ModelCard(_Strict):
    schema_version: Literal[1] = 1
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    version: str
    task: str
    architecture: str
    source: str  # the paper the architecture follows
    intended_use: str
    files: FilesCard
    inputs: InputsCard
    outputs: OutputsCard
    training: TrainingCard
    metrics: tuple[MetricRow, ...]
    parity: ParityCard

    @field_validator("intended_use")
    @classmethod
    def _research_only(cls, value: str) -> str:
        if "research use only" not in value.lower() or "not for diagnosis" not in value.lower():
            raise ValueError(f"intended_use must say {RESEARCH_ONLY!r}")
        return value


def card_path(model_file: Path) -> Path:
    """The card of ``name.onnx`` (or ``name.pt2``): ``name.card.json`` in the same folder."""
    return model_file.with_name(model_file.name.split(".")[0] + CARD_SUFFIX)


def read_card(path: Path) -> ModelCard:
    """Parse and validate a card; ModelError with the reason when it is missing or malformed."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ModelError(f"model card {path} cannot be read: {error.strerror or error}") from error
    try:
        return ModelCard.model_validate(json.loads(text))
    except (json.JSONDecodeError, ValidationError) as error:
        first = str(error).splitlines()
        raise ModelError(f"model card {path} is not valid: {' '.join(first[:3])}") from error


def write_card(card: ModelCard, path: Path) -> None:
    path.write_text(json.dumps(card.model_dump(mode="json", by_alias=True), indent=2) + "\n", encoding="utf-8")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_ref(path: Path) -> FileRef:
    return FileRef(name=path.name, sha256=sha256_of(path), bytes=path.stat().st_size)


def verify_file(folder: Path, ref: FileRef) -> Path:
    """The file ``ref`` names in ``folder``, after checking it is there and its sha256 is the card's."""
    path = folder / ref.name
    if not path.is_file():
        raise ModelError(f"{path} is missing (named by its model card)")
    actual = sha256_of(path)
    if actual != ref.sha256:
        raise ModelError(f"{path} does not match its model card: sha256 {actual[:12]}... but the card says {ref.sha256[:12]}...")
    return path


class Contract(BaseModel):
    """What the service feeds a model and reads back: the card must say the same."""

    model_config = ConfigDict(frozen=True)

    task: str
    tensors: tuple[TensorSpec, ...]
    channels: tuple[InputChannel, ...]
    clinical: tuple[str, ...]
    output: TensorSpec
    classes: tuple[str, ...]


def check_contract(card: ModelCard, contract: Contract) -> None:
    """ModelError naming the first difference between what ``card`` takes and ``contract`` feeds."""
    name = f"model {card.name} {card.version}"
    if card.task != contract.task:
        raise ModelError(f"{name} is for task {card.task!r}, the service needs {contract.task!r}")
    if card.inputs.tensors != contract.tensors:
        raise ModelError(f"{name} takes inputs {_tensors(card.inputs.tensors)}; the service feeds {_tensors(contract.tensors)}")
    if len(card.inputs.channels) != len(contract.channels):
        raise ModelError(f"{name} takes {len(card.inputs.channels)} channels "
                         f"({', '.join(c.name for c in card.inputs.channels)}); the service feeds "
                         f"{len(contract.channels)} ({', '.join(c.name for c in contract.channels)})")
    for index, (theirs, ours) in enumerate(zip(card.inputs.channels, contract.channels)):
        if theirs != ours:
            raise ModelError(f"{name}: input channel {index} is {_channel(theirs)} on the card, "
                             f"but the service feeds {_channel(ours)}")
    if card.inputs.clinical != contract.clinical:
        raise ModelError(f"{name} takes clinical inputs {list(card.inputs.clinical)}; the service feeds {list(contract.clinical)}")
    if card.outputs.tensor != contract.output:
        raise ModelError(f"{name} gives {_tensors([card.outputs.tensor])}; the service reads {_tensors([contract.output])}")
    if card.outputs.classes != contract.classes:
        raise ModelError(f"{name} gives classes {list(card.outputs.classes)}; the service reads {list(contract.classes)}")


def _tensors(specs: tuple[TensorSpec, ...] | list[TensorSpec]) -> str:
    return ", ".join(f"{t.name} {t.dtype} {list(t.shape)}" for t in specs)


def _channel(c: InputChannel) -> str:
    return (f"{c.name} ({c.unit}, {c.normalisation.value}, scale {c.scale:g}, clip {list(c.clip)}, "
            f"outside the brain {c.outside_brain})")
