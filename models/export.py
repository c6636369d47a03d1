"""From a trained torch network to the files the service loads: ONNX (dynamic batch and in-plane
size), a torch.export program (.pt2, for the torch backend: debugging and parity), a small test
input with the reference probabilities, and the parity check torch against ONNX Runtime; for any
model whose inputs a ``Contract`` names (the CT perfusion model's by default)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from service.inference.card import Contract
from service.inference.ctp_inputs import CTP_CONTRACT

PARITY_TOLERANCE = 1e-4
"""Largest probability difference allowed between torch (float32, eager) and ONNX Runtime on CPU."""
OPSET = 18


def _example(contract: Contract, batch: int = 2, size: int = 64) -> tuple[torch.Tensor, ...]:
    """One example of each of ``contract``'s inputs: random maps, an all-brain mask, clinical values."""
    generator = torch.Generator().manual_seed(0)
    example = []
    for tensor in contract.tensors:
        if tensor.name == "maps":
            example.append(torch.randn(batch, len(contract.channels), size, size, generator=generator))
        elif tensor.name == "brain":
            example.append(torch.ones(batch, 1, size, size))
        else:
            example.append(torch.tensor([[0.3, 1.0]] * batch))
    return tuple(example)


def _dynamic_shapes(multiple: int, contract: Contract) -> dict[str, dict[int, object]]:
    batch = torch.export.Dim("batch", min=1, max=256)
    height = torch.export.Dim("height_blocks", min=1, max=1024 // multiple)
    width = torch.export.Dim("width_blocks", min=1, max=1024 // multiple)
    image = {0: batch, 2: multiple * height, 3: multiple * width}
    return {t.name: (image if t.name in ("maps", "brain") else {0: batch}) for t in contract.tensors}


def export_program(network: torch.nn.Module, path: Path, contract: Contract = CTP_CONTRACT) -> Path:
    """``torch.export`` the network (eval mode) with dynamic batch and size; saved as ``.pt2``."""
    network.eval()
    program = torch.export.export(network, _example(contract), dynamic_shapes=_dynamic_shapes(network.size_multiple, contract))
    torch.export.save(program, path)
    return path


def export_onnx(network: torch.nn.Module, path: Path, contract: Contract = CTP_CONTRACT) -> Path:
    """ONNX with inputs ``maps``, ``brain``, ``clinical`` and output ``probabilities``, batch, height
    and width dynamic (height and width multiples of the network's ``size_multiple``), weights inside."""
    network.eval()
    names = [t.name for t in contract.tensors]
    program = torch.onnx.export(
        network, _example(contract), dynamo=True, input_names=names, output_names=[contract.output.name],
        dynamic_shapes=_dynamic_shapes(network.size_multiple, contract), opset_version=OPSET, external_data=False,
    )
    program.save(str(path), external_data=False)
    return path


def onnx_forward(path: Path, contract: Contract = CTP_CONTRACT) -> Callable[..., np.ndarray]:
    """The ONNX file on ONNX Runtime (CPU), one session: the contract's tensors in order -> probabilities."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), onnxruntime.SessionOptions(), providers=["CPUExecutionProvider"])
    names = [t.name for t in contract.tensors]
    return lambda *arrays: session.run([contract.output.name], dict(zip(names, arrays, strict=True)))[0]


def onnx_probabilities(path: Path, inputs: dict[str, np.ndarray], contract: Contract = CTP_CONTRACT) -> np.ndarray:
    return onnx_forward(path, contract)(*(inputs[t.name] for t in contract.tensors))


def torch_probabilities(network: torch.nn.Module, inputs: dict[str, np.ndarray], contract: Contract = CTP_CONTRACT) -> np.ndarray:
    network.eval()
    with torch.no_grad():
        return network(*(torch.from_numpy(inputs[t.name]) for t in contract.tensors)).numpy()


def write_test_input(path: Path, inputs: dict[str, np.ndarray], probabilities: np.ndarray) -> Path:
    """The bundled parity input: the three inputs and the reference probabilities (float32)."""
    np.savez_compressed(path, **inputs, probabilities=probabilities.astype(np.float32))
    return path


def parity(network: torch.nn.Module, onnx_path: Path, inputs: dict[str, np.ndarray], contract: Contract = CTP_CONTRACT) -> float:
    """Largest absolute probability difference, torch eager against ONNX Runtime (CPU)."""
    return float(np.abs(torch_probabilities(network, inputs, contract) - onnx_probabilities(onnx_path, inputs, contract)).max())
