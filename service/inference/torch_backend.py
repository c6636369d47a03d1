"""torch: the model's exported program (``torch.export``, ``.pt2``) run eagerly, float32, on the
CPU (or a CUDA device). For debugging and for parity with the other backends; torch is not part
of the service's default install (extra ``train``), so it is imported only here."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.errors import ModelError
from service.inference.card import ModelCard
from service.inference.engine import Backend, CheckedEngine


class TorchEngine(CheckedEngine):
    backend = Backend.TORCH

    def __init__(self, card: ModelCard, program_path: Path, device: str = "cpu") -> None:
        try:
            import torch
        except ImportError as error:
            raise ModelError(f"the torch backend needs torch (extra 'train'): {error}") from error
        try:
            program = torch.export.load(str(program_path))
        except Exception as error:  # torch raises many unrelated classes for a bad archive
            raise ModelError(f"torch cannot load the exported program {program_path}: {error}") from error
        self._torch = torch
        self._device = torch.device(device)
        self._module = program.module().to(self._device)
        self._names = [t.name for t in card.inputs.tensors]
        super().__init__(card, f"{torch.__version__}, {self._device}")

    def _run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        with torch.no_grad():
            output = self._module(*(torch.from_numpy(inputs[name]).to(self._device) for name in self._names))
        return output.float().cpu().numpy()

    def close(self) -> None:
        self._module = None
