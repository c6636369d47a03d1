"""Speed of the learned models per study, by backend: the CT perfusion core/penumbra model
(256 x 256 x 16), both MRI final-infarct networks of seed 001 together (128 x 128 x 20) and both
CT ones together (256 x 256 x 16).

    .venv/bin/python benchmarks/inference_speed.py            # 9 runs per backend, medians
    .venv/bin/python benchmarks/inference_speed.py --runs 5

Times ``predict_core_penumbra`` (normalisation, 16 slices in batches of 4, argmax) on the shipped
model with ONNX Runtime on the CPU, against torch eager (the exported program, float32) in the same
run, the runs alternating so that both see the same load; where a CUDA GPU and torch are present,
also torch on the GPU in FP32 and FP16. Each backend is warmed up once first. Prints medians and
the ratio; nothing is hard-coded.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import typer

from service.config import Settings
from service.inference.card import ModelCard
from service.inference.ctp_core_penumbra import predict_core_penumbra
from service.inference.ctp_inputs import CTP_CONTRACT
from service.inference.engine import Backend, load_engine
from service.inference.final_infarct import predict_final_infarct
from service.inference.final_infarct_inputs import Scenario, contract, model_name

app = typer.Typer(add_completion=False)

SHAPE = (16, 256, 256)
SPACING = (5.0, 0.9375, 0.9375)


def study(seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Maps of plausible values over an elliptical brain (the speed does not depend on the values)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    brain = ((y - 128) / 90.0) ** 2 + ((x - 128) / 75.0) ** 2 <= 1.0
    brain = np.broadcast_to(brain, SHAPE).copy()
    maps = {"cbf": rng.uniform(5, 70, SHAPE), "cbv": rng.uniform(0.5, 6, SHAPE), "ttp": rng.uniform(15, 30, SHAPE),
            "tmax": rng.uniform(0, 12, SHAPE)}
    maps = {k: np.where(brain, v, 0).astype(np.float32) for k, v in maps.items()}
    mip = np.where(brain, rng.uniform(30, 90, SHAPE), 1100.0).astype(np.float32)
    return maps, mip, brain


class GpuTorch:
    """The exported program on a CUDA device, FP32 or FP16, behind the Engine's predict."""

    def __init__(self, program_path: str, card: ModelCard, half: bool) -> None:
        import torch

        self.torch, self.card, self.half = torch, card, half
        module = torch.export.load(program_path).module().to("cuda")
        self.module = module.half() if half else module

    def predict(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        torch = self.torch
        dtype = torch.float16 if self.half else torch.float32
        with torch.no_grad():
            out = self.module(*(torch.from_numpy(inputs[t.name]).to("cuda", dtype) for t in CTP_CONTRACT.tensors))
        return out.float().cpu().numpy()


@app.command()
def main(runs: int = typer.Option(9, help="timed runs per backend")) -> None:
    model = Settings().models_dir / "ctp-core-penumbra.onnx"
    maps, mip, brain = study()
    engines: dict[str, object] = {"onnxruntime (CPU)": load_engine(model, Backend.ONNXRUNTIME, contract=CTP_CONTRACT)}
    try:
        engines["torch eager (CPU, float32)"] = load_engine(model, Backend.TORCH, contract=CTP_CONTRACT)
        import torch

        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        if torch.cuda.is_available():
            card = engines["onnxruntime (CPU)"].card  # type: ignore[attr-defined]
            program = str(model.with_name(card.files.exported_program.name))
            engines[f"torch CUDA FP32 ({torch.cuda.get_device_name(0)})"] = GpuTorch(program, card, half=False)
            engines["torch CUDA FP16"] = GpuTorch(program, card, half=True)
    except Exception as error:  # torch absent or unusable: ONNX Runtime alone
        print(f"torch not measured: {error}")
    times: dict[str, list[float]] = {name: [] for name in engines}
    run: dict[str, Callable[[], object]] = {
        name: (lambda e=engine: predict_core_penumbra(e, maps, mip, brain, 12, SPACING))  # type: ignore[misc]
        for name, engine in engines.items()
    }
    for name in engines:
        run[name]()  # warm-up
    for k in range(runs):
        order = list(engines) if k % 2 == 0 else list(reversed(engines))
        for name in order:
            started = time.perf_counter()
            run[name]()
            times[name].append(time.perf_counter() - started)
    print(f"per study {SHAPE[0]} x {SHAPE[1]} x {SHAPE[2]}, {runs} runs, load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores")
    print_table(times)
    volumes, brain = mri_study()
    final_infarct_times(runs, "mri", volumes, brain, MRI_SPACING)
    maps, mip, brain = study()
    final_infarct_times(runs, "ct", {**maps, "mip": mip}, brain, SPACING)


def print_table(times: dict[str, list[float]]) -> None:
    """Median and range per backend, and the ratio to ONNX Runtime's median, as a markdown table."""
    base = statistics.median(times["onnxruntime (CPU)"])
    print("| backend | median | range | ratio to ONNX Runtime |")
    print("|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} s | {min(values):.2f}-{max(values):.2f} s | {median / base:.2f}x |")


MRI_SHAPE = (20, 128, 128)
MRI_SPACING = (6.0, 1.796875, 1.796875)


def mri_study(seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """DWI, ADC, Tmax, CBF, CBV of plausible values over an elliptical brain."""
    rng = np.random.default_rng(seed)
    _, y, x = np.ogrid[: MRI_SHAPE[0], : MRI_SHAPE[1], : MRI_SHAPE[2]]
    brain = np.broadcast_to(((y - 64) / 45.0) ** 2 + ((x - 64) / 38.0) ** 2 <= 1.0, MRI_SHAPE).copy()
    ranges = {"dwi": (200, 900), "adc": (400, 1200), "tmax": (0, 12), "cbf": (5, 70), "cbv": (0.5, 6)}
    return {k: np.where(brain, rng.uniform(*r, MRI_SHAPE), 0).astype(np.float32) for k, r in ranges.items()}, brain


def final_infarct_times(runs: int, modality: str, volumes: dict[str, np.ndarray], brain: np.ndarray,
                        spacing: tuple[float, float, float]) -> None:
    """Both final-infarct networks of ``modality`` per study, ONNX Runtime against torch eager, alternating."""
    folder = Settings().models_dir
    backends = {"onnxruntime (CPU)": Backend.ONNXRUNTIME, "torch eager (CPU, float32)": Backend.TORCH}
    engines: dict[str, list] = {}
    for label, backend in backends.items():
        try:
            engines[label] = [load_engine(folder / f"{model_name(modality, s)}.onnx", backend, contract=contract(modality, s)) for s in Scenario]
        except Exception as error:  # torch absent: ONNX Runtime alone
            print(f"{label} not measured: {error}")
    times: dict[str, list[float]] = {name: [] for name in engines}

    def both(pair: list) -> None:
        for engine in pair:
            predict_final_infarct(engine, volumes, brain, spacing)

    for pair in engines.values():
        both(pair)  # warm-up
    for k in range(runs):
        for name in (list(engines) if k % 2 == 0 else list(reversed(engines))):
            started = time.perf_counter()
            both(engines[name])
            times[name].append(time.perf_counter() - started)
    print(f"\nboth {modality.upper()} final-infarct networks per study {' x '.join(map(str, brain.shape))}, {runs} runs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print_table(times)


if __name__ == "__main__":
    app()
