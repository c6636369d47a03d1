"""One interface for running a learned model, whatever runs it: load once, predict many times.

``load_engine`` reads the model's card, refuses a file that does not match it (sha256) or a card
that does not match what the caller feeds (``Contract``), picks a backend and loads the model on
it once; ``Engine.predict`` then runs batches, checked against the card, as often as needed (the
split nnU-Net's predictor makes between initialisation and prediction). Backends:

- ``tensorrt``: a TensorRT 10 engine built from the ONNX file (FP16) on first use and cached
  (``tensorrt_backend``); needs an NVIDIA GPU, TensorRT and cuda-python.
- ``onnxruntime``: ONNX Runtime on the CPU, or its TensorRT / CUDA execution providers where the
  installed build has them (``onnxruntime_backend``).
- ``torch``: the exported program (``.pt2``), for debugging and parity (``torch_backend``).

``auto`` takes TensorRT where it can run, else ONNX Runtime, and logs why.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol

import numpy as np

from service.errors import InputError, ModelError
from service.findings import ModelInfo
from service.inference.card import Contract, ModelCard, card_path, check_contract, read_card, verify_file

log = logging.getLogger(__name__)


class Backend(str, Enum):
    AUTO = "auto"
    TENSORRT = "tensorrt"
    ONNXRUNTIME = "onnxruntime"
    TORCH = "torch"


class Engine(Protocol):
    """A loaded model. ``predict`` takes the card's input tensors by name (float32) and returns
    the output tensor; it may be called many times and from one thread at a time."""

    card: ModelCard
    identity: ModelInfo

    def predict(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray: ...

    def close(self) -> None: ...


class CheckedEngine:
    """What every backend shares: inputs checked against the card, the time of each run counted in
    ``strokegate_inference_seconds{model,backend}``. Backends implement ``_run``."""

    backend: Backend

    def __init__(self, card: ModelCard, detail: str) -> None:
        self.card = card
        self.identity = ModelInfo(card.name, card.version, card.files.onnx.sha256, f"{self.backend.value} ({detail})")

    def predict(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        from service.ops import metrics

        arrays = check_inputs(self.card, inputs)
        started = time.perf_counter()
        output = self._run(arrays)
        metrics.INFERENCE_SECONDS.labels(model=self.card.name, backend=self.backend.value).observe(time.perf_counter() - started)
        return output

    def _run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Free what the backend holds (sessions, GPU memory)."""


def check_inputs(card: ModelCard, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inputs as contiguous float32 arrays, in the card's order; ValueError for a wrong name,
    rank or fixed dimension (a bug), InputError for an image size the model does not take."""
    expected = {t.name: t for t in card.inputs.tensors}
    if set(inputs) != set(expected):
        raise ValueError(f"model {card.name} takes inputs {sorted(expected)}, got {sorted(inputs)}")
    arrays, sizes = {}, {}
    for name, spec in expected.items():
        array = np.ascontiguousarray(inputs[name], dtype=np.float32)
        if array.ndim != len(spec.shape):
            raise ValueError(f"input {name} must have {len(spec.shape)} dimensions {list(spec.shape)}, got shape {array.shape}")
        for size, dim in zip(array.shape, spec.shape):
            if isinstance(dim, int) and size != dim:
                raise ValueError(f"input {name} must have shape {list(spec.shape)}, got {array.shape}")
            if isinstance(dim, str) and sizes.setdefault(dim, size) != size:
                raise ValueError(f"inputs disagree on {dim}: {sizes[dim]} and {size} (input {name})")
        arrays[name] = array
    for dim in ("height", "width"):
        if dim in sizes:
            size = sizes[dim]
            if not card.inputs.image_size.holds(size) or size % card.inputs.size_multiple:
                raise InputError(f"model {card.name} takes images of {card.inputs.image_size.low:g}-{card.inputs.image_size.high:g} "
                                 f"pixels, multiples of {card.inputs.size_multiple}; got {dim} {size}")
    return arrays


@dataclass(frozen=True)
class Availability:
    backend: Backend
    available: bool
    reason: str  # what is there, or why not


def tensorrt_availability() -> Availability:
    if importlib.util.find_spec("tensorrt") is None:
        return Availability(Backend.TENSORRT, False, "TensorRT is not installed (optional extra 'tensorrt'; needs an NVIDIA GPU)")
    try:
        from service.inference.tensorrt_backend import gpu_description

        return Availability(Backend.TENSORRT, True, gpu_description())
    except (ImportError, RuntimeError, OSError) as error:
        return Availability(Backend.TENSORRT, False, f"TensorRT is installed but cannot run: {error}")


def onnxruntime_availability() -> Availability:
    try:
        import onnxruntime
    except ImportError as error:
        return Availability(Backend.ONNXRUNTIME, False, f"ONNX Runtime is not installed: {error}")
    return Availability(Backend.ONNXRUNTIME, True, f"onnxruntime {onnxruntime.__version__}, providers {', '.join(onnxruntime.get_available_providers())}")


def torch_availability() -> Availability:
    if importlib.util.find_spec("torch") is None:
        return Availability(Backend.TORCH, False, "torch is not installed (extra 'train': torch==2.13.0)")
    import torch

    return Availability(Backend.TORCH, True, f"torch {torch.__version__}")


def available_backends() -> list[Availability]:
    """Each concrete backend, whether it can run here, and why (or why not)."""
    return [tensorrt_availability(), onnxruntime_availability(), torch_availability()]


AVAILABILITY = {Backend.TENSORRT: tensorrt_availability, Backend.ONNXRUNTIME: onnxruntime_availability,
                Backend.TORCH: torch_availability}
"""How to find out whether each concrete backend can run here (importing it: torch takes seconds)."""


def choose_backend(requested: Backend | str, card: ModelCard) -> tuple[Backend, str]:
    """The backend to load ``card``'s model on, and why; ModelError when the one asked for cannot run.
    Only the backends that could be chosen are looked at (auto never imports torch)."""
    requested = Backend(requested)
    if requested is Backend.TORCH and card.files.exported_program is None:
        raise ModelError(f"model {card.name} has no exported torch program: the torch backend cannot run it")
    if requested is not Backend.AUTO:
        state = AVAILABILITY[requested]()
        if not state.available:
            raise ModelError(f"inference backend {requested.value} was asked for but cannot run here: {state.reason}")
        return requested, f"asked for; {state.reason}"
    states: dict[Backend, Availability] = {}
    for backend in (Backend.TENSORRT, Backend.ONNXRUNTIME):
        states[backend] = AVAILABILITY[backend]()
        if states[backend].available:
            passed = [f"{b.value}: {states[b].reason}" for b in (Backend.TENSORRT,) if b is not backend]
            return backend, "; ".join([f"auto chose {backend.value}: {states[backend].reason}", *(f"not {p}" for p in passed)])
    raise ModelError("no inference backend can run here: " + "; ".join(f"{a.backend.value}: {a.reason}" for a in states.values()))


def load_engine(model_file: Path, backend: Backend | str = Backend.AUTO, *, contract: Contract | None = None,
                cache_dir: Path | None = None) -> Engine:
    """Load ``model_file`` (an ``.onnx`` with its card beside it) on ``backend`` once.

    Refused with a ModelError that says why: no or invalid card, a file whose sha256 is not the
    card's, a card whose inputs or outputs differ from ``contract``, no backend that can run it.
    ``cache_dir`` holds TensorRT plans (built on first use).
    """
    card = read_card(card_path(model_file))
    if contract is not None:
        check_contract(card, contract)
    folder = model_file.parent
    onnx_path = verify_file(folder, card.files.onnx)
    chosen, reason = choose_backend(backend, card)
    log.info("model %s %s: inference backend %s (%s)", card.name, card.version, chosen.value, reason)
    if chosen is Backend.TENSORRT:
        from service.inference.tensorrt_backend import TensorRTEngine

        return TensorRTEngine(card, onnx_path, cache_dir or folder / "engines")
    if chosen is Backend.ONNXRUNTIME:
        from service.inference.onnxruntime_backend import OnnxRuntimeEngine

        return OnnxRuntimeEngine(card, onnx_path, cache_dir)
    from service.inference.torch_backend import TorchEngine

    if card.files.exported_program is None:
        raise ModelError(f"model {card.name} has no exported torch program: the torch backend cannot run it")
    return TorchEngine(card, verify_file(folder, card.files.exported_program))


def shipped_models(folder: Path) -> list[Path]:
    """The ONNX files in ``folder`` that have a card beside them."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.onnx") if card_path(p).is_file())
