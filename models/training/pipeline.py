"""The steps every segmentation train command takes, whatever its model: plan the cohort, build
(or find cached) the dataset, train with a progress bar, export ONNX and the torch program with
a bundled test input and check their parity, and say on what machine and load it ran."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from models.training.cohort import CohortPlan, SampleSpec, parse_families
from models.training.dataset import DatasetKind, build
from models.training.loop import History
from service.inference.card import Contract

console = Console()


def progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=console)


def command_line() -> str:
    """The command as typed, for the card and the report."""
    return "python -m models.training " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def plan_cohort(families: list[str], held_out_family: str | None, noise_hu: tuple[float, ...], train: int, validation: int,
                test: int) -> tuple[CohortPlan, list[SampleSpec]]:
    """The cohort and its studies; a plan that cannot be drawn ends the command with one line (exit 2)."""
    try:
        plan = CohortPlan(parse_families(families), held_out_family, noise_hu, train, validation, test)
        return plan, plan.samples()
    except ValueError as error:
        console.print(f"[red]cannot plan the cohort:[/red] {error}")
        raise typer.Exit(2) from error


def build_dataset(specs: list[SampleSpec], folder: Path, jobs: int, kind: DatasetKind, description: str) -> dict[SampleSpec, Path]:
    """Every study of ``specs`` built or found cached, with a progress bar; refused ones are said and left out."""
    refused: list[str] = []
    with progress() as bar:
        task = bar.add_task(description, total=len(specs), status="")

        def done(spec: SampleSpec, path: Path | None, seconds: float, reason: str) -> None:
            if path is None:
                refused.append(f"{spec.key}: {reason}")
            bar.update(task, advance=1, status=f"{spec.key} {reason} {seconds:.0f} s")

        paths = build(specs, folder, jobs=jobs, on_done=done, kind=kind)
    for line in refused:
        console.print(f"[yellow]left out[/yellow] {line}")
    return paths


def train_with_progress(description: str, total_steps: int,
                        train: Callable[[Callable[[int, int, float], None]], tuple[object, History]]) -> tuple[object, History]:
    """``train(on_step)`` under a progress bar of ``total_steps``."""
    with progress() as bar:
        task = bar.add_task(description, total=total_steps, status="")

        def step(epoch: int, index: int, loss: float) -> None:
            bar.update(task, advance=1, status=f"epoch {epoch + 1} loss {loss:.3f}")

        network, history = train(step)
    console.print(f"training: {history.seconds / 60:.1f} min, best validation epoch {history.best_epoch}")
    return network, history


@dataclass(frozen=True)
class Shipped:
    onnx: Path
    program: Path
    test_input: Path
    parity_difference: float

    @property
    def files(self) -> tuple[Path, Path, Path]:
        return self.onnx, self.program, self.test_input


def ship(network: object, name: str, weights: Path, contract: Contract, test_inputs: dict[str, np.ndarray],
         onnx: Path | None = None) -> Shipped:
    """ONNX (``onnx`` when already exported), torch program and the bundled test input with torch's
    probabilities in ``weights``; parity beyond the tolerance ends the command (exit 1)."""
    from models.export import PARITY_TOLERANCE, export_onnx, export_program, parity, torch_probabilities, write_test_input

    weights.mkdir(parents=True, exist_ok=True)
    onnx_path = onnx or export_onnx(network, weights / f"{name}.onnx", contract)
    program_path = export_program(network, weights / f"{name}.pt2", contract)
    test_path = write_test_input(weights / f"{name}.test.npz", test_inputs, torch_probabilities(network, test_inputs, contract))
    difference = parity(network, onnx_path, test_inputs, contract)
    if difference > PARITY_TOLERANCE:
        console.print(f"[red]parity failed:[/red] ONNX Runtime differs from torch by {difference:.2e} (> {PARITY_TOLERANCE:g})")
        raise typer.Exit(1)
    return Shipped(onnx_path, program_path, test_path, difference)


def machine(threads: int, load_start: float) -> str:
    """Where the command ran, and the load average at its start and end."""
    import torch

    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} on {threads} thread"
            f"{'s' if threads != 1 else ''}; load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
