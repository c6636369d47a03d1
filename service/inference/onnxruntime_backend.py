"""ONNX Runtime: on the CPU by default; through its TensorRT or CUDA execution providers where the
installed onnxruntime build has them (onnxruntime-gpu), FP16 engines cached in ``cache_dir``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.errors import ModelError
from service.inference.card import ModelCard
from service.inference.engine import Backend, CheckedEngine

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def providers(available: list[str], cache_dir: Path | None) -> list[str | tuple[str, dict[str, object]]]:
    """The execution providers to ask for, best first: TensorRT (FP16, engine cache), CUDA, CPU."""
    chosen: list[str | tuple[str, dict[str, object]]] = []
    if "TensorrtExecutionProvider" in available:
        options: dict[str, object] = {"trt_fp16_enable": True}
        if cache_dir is not None:
            options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir))
        chosen.append(("TensorrtExecutionProvider", options))
    if "CUDAExecutionProvider" in available:
        chosen.append("CUDAExecutionProvider")
    chosen.append("CPUExecutionProvider")
    return chosen


class OnnxRuntimeEngine(CheckedEngine):
    backend = Backend.ONNXRUNTIME

    def __init__(self, card: ModelCard, onnx_path: Path, cache_dir: Path | None = None, threads: int = 0) -> None:
        import onnxruntime

        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads  # 0: one per core
        # Idle threads sleep instead of spinning: the analysis and the receiver share these cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = onnxruntime.InferenceSession(
                str(onnx_path), options, providers=providers(onnxruntime.get_available_providers(), cache_dir)
            )
        except Exception as error:  # onnxruntime raises its own unrelated classes for bad files
            raise ModelError(f"ONNX Runtime cannot load {onnx_path}: {error}") from error
        names = [i.name for i in self._session.get_inputs()]
        if names != [t.name for t in card.inputs.tensors]:
            raise ModelError(f"{onnx_path} has inputs {names}, its card says {[t.name for t in card.inputs.tensors]}")
        self._output = card.outputs.tensor.name
        super().__init__(card, ", ".join(self._session.get_providers()))

    def _run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self._session.run([self._output], inputs)[0]

    def close(self) -> None:
        self._session = None
