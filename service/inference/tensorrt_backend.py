"""TensorRT 10: an FP16 engine built from the model's ONNX file on first use, cached on disk.

The plan is keyed by the ONNX file's sha256, the TensorRT version, the GPU's name and its compute
capability (``plan_name``): a plan runs only on the TensorRT and GPU that built it, so any change
of these builds a new one. The optimisation profile spans the card's image sizes (``profile``).
TensorRT and cuda-python (``pip install strokegate[tensorrt]``) are imported here only, lazily:
neither installs without NVIDIA's libraries, so this module is never imported where they are absent.

Written against TensorRT 10's Python API (named I/O tensors, ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``) and cuda-python's runtime bindings.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np

from service.errors import ModelError
from service.inference.card import ModelCard
from service.inference.engine import Backend, CheckedEngine

log = logging.getLogger(__name__)

OPT_BATCH = 4
"""Batch (slices) the profile is tuned for; the profile allows 1 to MAX_BATCH."""
MAX_BATCH = 32
OPT_SIZE = 256
"""Image height and width the profile is tuned for (a 256 x 256 CT perfusion slice)."""
WORKSPACE_BYTES = 1 << 30


def _cudart():  # noqa: ANN202
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def _check(result: tuple) -> object:
    """cuda-python calls return (error, value...): raise on an error, return the value(s)."""
    cudart = _cudart()
    error, *values = result
    if error != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA error {error}")
    return values[0] if len(values) == 1 else tuple(values)


def gpu() -> tuple[str, tuple[int, int]]:
    """Name and compute capability of CUDA device 0; RuntimeError when there is none."""
    cudart = _cudart()
    count = _check(cudart.cudaGetDeviceCount())
    if not count:
        raise RuntimeError("no CUDA device")
    properties = _check(cudart.cudaGetDeviceProperties(0))
    name = properties.name.decode(errors="replace") if isinstance(properties.name, bytes) else str(properties.name)
    return name.strip("\x00 "), (int(properties.major), int(properties.minor))


def gpu_description() -> str:
    import tensorrt

    name, (major, minor) = gpu()
    return f"TensorRT {tensorrt.__version__} on {name} (compute capability {major}.{minor})"


def plan_name(model: str, onnx_sha256: str, tensorrt_version: str, gpu_name: str, capability: tuple[int, int]) -> str:
    """The cached plan's file name: one per (ONNX file, TensorRT version, GPU model, capability)."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")
    return f"{model}-{onnx_sha256[:16]}-trt{tensorrt_version}-{slug}-sm{capability[0]}{capability[1]}-fp16.plan"


def profile(card: ModelCard) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape of each input: batch 1 / OPT_BATCH / MAX_BATCH, images from the card's
    smallest size to its largest (multiples of its size multiple), tuned for OPT_SIZE."""
    multiple = card.inputs.size_multiple
    low = int(np.ceil(card.inputs.image_size.low / multiple) * multiple)
    high = int(card.inputs.image_size.high // multiple * multiple)
    opt = min(max(OPT_SIZE, low), high)
    sizes = {"batch": (1, OPT_BATCH, MAX_BATCH), "height": (low, opt, high), "width": (low, opt, high)}
    shapes = {}
    for tensor in card.inputs.tensors:
        dims = [sizes[d] if isinstance(d, str) else (d, d, d) for d in tensor.shape]
        shapes[tensor.name] = tuple(tuple(int(dim[k]) for dim in dims) for k in range(3))
    return shapes  # type: ignore[return-value]


def build_plan(onnx_path: Path, card: ModelCard, logger: object) -> bytes:
    """Parse the ONNX file and build a serialised FP16 engine with the card's optimisation profile."""
    import tensorrt as trt

    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if builder.platform_has_fast_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    optimisation = builder.create_optimization_profile()
    for name, (low, opt, high) in profile(card).items():
        optimisation.set_shape(name, low, opt, high)
    config.add_optimization_profile(optimisation)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ModelError(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
    return bytes(plan)


class TensorRTEngine(CheckedEngine):
    backend = Backend.TENSORRT

    def __init__(self, card: ModelCard, onnx_path: Path, cache_dir: Path) -> None:
        try:
            import tensorrt as trt
        except ImportError as error:
            raise ModelError(f"the TensorRT backend needs TensorRT (extra 'tensorrt'): {error}") from error
        cudart = _cudart()
        self._trt, self._cudart = trt, cudart
        gpu_name, capability = gpu()
        self._logger = trt.Logger(trt.Logger.WARNING)
        path = cache_dir / plan_name(card.name, card.files.onnx.sha256, trt.__version__, gpu_name, capability)
        plan = path.read_bytes() if path.is_file() else None
        runtime = trt.Runtime(self._logger)
        engine = runtime.deserialize_cuda_engine(plan) if plan else None
        if engine is None:  # no plan yet, or one this TensorRT cannot read: build and cache it
            log.info("building the TensorRT engine of %s (FP16) on %s; cached as %s", card.name, gpu_name, path)
            plan = build_plan(onnx_path, card, self._logger)
            cache_dir.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
            partial.write_bytes(plan)
            partial.replace(path)
            engine = runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise ModelError(f"TensorRT cannot load the engine it built for {card.name}")
        self._runtime, self._engine = runtime, engine
        self._context = engine.create_execution_context()
        self._stream = _check(cudart.cudaStreamCreate())
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if self._inputs != [t.name for t in card.inputs.tensors] or self._outputs != [card.outputs.tensor.name]:
            raise ModelError(f"the TensorRT engine of {card.name} has inputs {self._inputs} and outputs {self._outputs}, "
                             "not what its card says")
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        super().__init__(card, f"TensorRT {trt.__version__}, {gpu_name}, FP16")

    def _device_buffer(self, name: str, nbytes: int) -> int:
        pointer, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if pointer:
                _check(self._cudart.cudaFree(pointer))
            pointer = _check(self._cudart.cudaMalloc(nbytes))
            self._buffers[name] = (pointer, nbytes)
        return pointer

    def _run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        trt, cudart, context = self._trt, self._cudart, self._context
        to_device, to_host = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name in self._inputs:
            array = np.ascontiguousarray(inputs[name], dtype=trt.nptype(self._engine.get_tensor_dtype(name)))
            if not context.set_input_shape(name, array.shape):
                raise ModelError(f"TensorRT refused shape {array.shape} for input {name} (outside the engine's profile)")
            pointer = self._device_buffer(name, array.nbytes)
            _check(cudart.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, to_device, self._stream))
            context.set_tensor_address(name, pointer)
        name = self._outputs[0]
        output = np.empty(tuple(context.get_tensor_shape(name)), dtype=trt.nptype(self._engine.get_tensor_dtype(name)))
        pointer = self._device_buffer(name, output.nbytes)
        context.set_tensor_address(name, pointer)
        if not context.execute_async_v3(self._stream):
            raise ModelError(f"TensorRT failed to run {self.card.name}")
        _check(cudart.cudaMemcpyAsync(output.ctypes.data, pointer, output.nbytes, to_host, self._stream))
        _check(cudart.cudaStreamSynchronize(self._stream))
        return output.astype(np.float32, copy=False)

    def close(self) -> None:
        for pointer, _ in self._buffers.values():
            self._cudart.cudaFree(pointer)
        self._buffers.clear()
        if self._stream is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        self._context = self._engine = None
