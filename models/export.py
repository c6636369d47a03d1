"""From a trained torch network to the files the service loads: ONNX (dynamic batch and in-plane
size), a torch.export program (.pt2, for the torch backend: debugging and parity), a small test
input with the reference probabilities, and the parity check torch against ONNX Runtime."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from service.inference.ctp_inputs import CTP_CONTRACT

PARITY_TOLERANCE = 1e-4
"""Largest probability difference allowed between torch (float32, eager) and ONNX Runtime on CPU."""
OPSET = 18


def _example(network: torch.nn.Module, batch: int = 2, size: int = 64) -> tuple[torch.Tensor, ...]:
    channels = len(CTP_CONTRACT.channels)
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(batch, channels, size, size, generator=generator), torch.ones(batch, 1, size, size),
            torch.tensor([[0.3, 1.0]] * batch))


def _dynamic_shapes(multiple: int) -> dict[str, dict[int, object]]:
    batch = torch.export.Dim("batch", min=1, max=256)
    height = torch.export.Dim("height_blocks", min=1, max=1024 // multiple)
    width = torch.export.Dim("width_blocks", min=1, max=1024 // multiple)
    image = {0: batch, 2: multiple * height, 3: multiple * width}
    return {"maps": image, "brain": image, "clinical": {0: batch}}


def export_program(network: torch.nn.Module, path: Path) -> Path:
    """``torch.export`` the network (eval mode) with dynamic batch and size; saved as ``.pt2``."""
    network.eval()
    program = torch.export.export(network, _example(network), dynamic_shapes=_dynamic_shapes(network.size_multiple))
    torch.export.save(program, path)
    return path


def export_onnx(network: torch.nn.Module, path: Path) -> Path:
    """ONNX with inputs ``maps``, ``brain``, ``clinical`` and output ``probabilities``, batch, height
    and width dynamic (height and width multiples of the network's ``size_multiple``), weights inside."""
    network.eval()
    names = [t.name for t in CTP_CONTRACT.tensors]
    program = torch.onnx.export(
        network, _example(network), dynamo=True, input_names=names, output_names=[CTP_CONTRACT.output.name],
        dynamic_shapes=_dynamic_shapes(network.size_multiple), opset_version=OPSET, external_data=False,
    )
    program.save(str(path), external_data=False)
    return path


def onnx_forward(path: Path) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """The ONNX file on ONNX Runtime (CPU), one session: (maps, brain, clinical) -> probabilities."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), onnxruntime.SessionOptions(), providers=["CPUExecutionProvider"])
    names = [t.name for t in CTP_CONTRACT.tensors]
    return lambda *arrays: session.run([CTP_CONTRACT.output.name], dict(zip(names, arrays, strict=True)))[0]


def onnx_probabilities(path: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    return onnx_forward(path)(*(inputs[t.name] for t in CTP_CONTRACT.tensors))


def torch_probabilities(network: torch.nn.Module, inputs: dict[str, np.ndarray]) -> np.ndarray:
    network.eval()
    with torch.no_grad():
        return network(*(torch.from_numpy(inputs[t.name]) for t in CTP_CONTRACT.tensors)).numpy()


def write_test_input(path: Path, inputs: dict[str, np.ndarray], probabilities: np.ndarray) -> Path:
    """The bundled parity input: the three inputs and the reference probabilities (float32)."""
    np.savez_compressed(path, **inputs, probabilities=probabilities.astype(np.float32))
    return path


def parity(network: torch.nn.Module, onnx_path: Path, inputs: dict[str, np.ndarray]) -> float:
    """Largest absolute probability difference, torch eager against ONNX Runtime (CPU)."""
    return float(np.abs(torch_probabilities(network, inputs) - onnx_probabilities(onnx_path, inputs)).max())
