"""Train the seed-002 CT perfusion core/penumbra model from scratch, end to end:

    .venv/bin/python -m models.training train            # the shipped model (see README)

cohort plan -> dataset (synthetic patients through the service's own CT perfusion analysis,
cached under build/datasets) -> training (checkpoints in build/runs) -> evaluation against the
threshold method on the test and held-out patients -> ONNX, torch program, test input, model card
and report in models/weights. Fixed seeds: the same command gives the same weights on the same
software (torch on CPU, same thread count).
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from models.training.cohort import FAMILIES, CohortPlan, SampleSpec, parse_families
from models.training.dataset import build, dataset_folder, load
from models.training.loop import Study, TrainConfig, train as train_network

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train StrokeGate's learned models (research use only).")
console = Console()

MODEL_NAME = "ctp-core-penumbra"
MODEL_VERSION = "0.1.0"


@app.callback()
def main() -> None:
    """StrokeGate model training."""


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=console)


def _study(spec: SampleSpec, path: Path) -> Study:
    arrays = load(path)
    return Study(spec.key, arrays.pop("inputs"), arrays.pop("brain"), arrays.pop("labels"), int(arrays.pop("nihss")), arrays)


@app.command()
def train(
    families: Annotated[list[str], typer.Option("--family", help=f"Phantom families to draw patients from ({', '.join(FAMILIES)}).")] = ["icbm"],  # noqa: B006
    held_out_family: Annotated[str | None, typer.Option(help="A family that only tests (never trains or chooses a checkpoint).")] = None,
    noise_hu: Annotated[list[float], typer.Option("--noise-hu", help="CT noise levels (HU).")] = [5.0, 10.0, 20.0],  # noqa: B006
    train_patients: Annotated[int, typer.Option(help="Training patients per family.")] = 40,
    validation_patients: Annotated[int, typer.Option(help="Validation patients per family (middle noise level).")] = 4,
    test_patients: Annotated[int, typer.Option(help="Test patients per family (each at every noise level).")] = 6,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = TrainConfig.epochs,
    steps: Annotated[int, typer.Option(help="Steps (batches) per epoch.")] = TrainConfig.steps_per_epoch,
    seed: Annotated[int, typer.Option(help="Seed of the weights, crops and dropout.")] = TrainConfig.seed,
    jobs: Annotated[int, typer.Option(help="Processes building the dataset.")] = 2,
    data: Annotated[Path, typer.Option(help="Dataset cache folder.")] = Path("build/datasets/ctp"),
    run: Annotated[Path, typer.Option(help="Folder for checkpoints and the run's report.")] = Path("build/runs/ctp-core-penumbra"),
    weights: Annotated[Path, typer.Option(help="Where the shipped files go.")] = Path("models/weights"),
) -> None:
    """Dataset, training, evaluation, export: the shipped CT perfusion core/penumbra model."""
    from models.export import PARITY_TOLERANCE, export_onnx, export_program, onnx_forward, parity, torch_probabilities, write_test_input
    from models.training.card import build_card
    from models.training.evaluate import ACCEPTANCE_NOISE_HU, acceptance, score_study, summarise
    from models.training.report import curves, write_report
    from service.inference.card import card_path, write_card

    started, load_start = time.perf_counter(), os.getloadavg()
    try:
        plan = CohortPlan(parse_families(families), held_out_family, tuple(noise_hu), train_patients, validation_patients, test_patients)
        specs = plan.samples()
    except ValueError as error:
        console.print(f"[red]cannot plan the cohort:[/red] {error}")
        raise typer.Exit(2) from error
    config = TrainConfig(epochs=epochs, steps_per_epoch=steps, seed=seed)
    command = "python -m models.training " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    console.print(f"{len(specs)} studies: " + ", ".join(f"{n} {s}" for s, n in _counts(specs).items()))

    refused: list[str] = []
    with _progress() as progress:
        task = progress.add_task("dataset (simulate + analyse)", total=len(specs), status="")

        def done(spec: SampleSpec, path: Path | None, seconds: float, reason: str) -> None:
            if path is None:
                refused.append(f"{spec.key}: {reason}")
            progress.update(task, advance=1, status=f"{spec.key} {reason} {seconds:.0f} s")

        paths = build(specs, data, jobs=jobs, on_done=done)
    dataset_s = time.perf_counter() - started
    for line in refused:
        console.print(f"[yellow]left out[/yellow] {line}")
    console.print(f"dataset: {len(paths)} studies in {dataset_s / 60:.1f} min")

    studies = {spec: _study(spec, path) for spec, path in paths.items()}
    training = [s for spec, s in studies.items() if spec.split == "train"]
    validation = [s for spec, s in studies.items() if spec.split == "validation"]
    with _progress() as progress:
        task = progress.add_task("training", total=config.epochs * config.steps_per_epoch, status="")

        def step(epoch: int, index: int, loss: float) -> None:
            progress.update(task, advance=1, status=f"epoch {epoch + 1} loss {loss:.3f}")

        network, history = train_network(training, validation, config, run, on_step=step)
    trained_s = time.perf_counter() - started
    console.print(f"training: {history.seconds / 60:.1f} min, best validation epoch {history.best_epoch}")

    weights.mkdir(parents=True, exist_ok=True)
    onnx_path = export_onnx(network, weights / f"{MODEL_NAME}.onnx")
    shipped = onnx_forward(onnx_path)  # the test patients are scored on the shipped file, as the service runs it
    scores = []
    evaluated = [(spec, s) for spec, s in studies.items() if spec.split in ("test", "held-out")]
    with _progress() as progress:
        task = progress.add_task("evaluation (ONNX Runtime)", total=len(evaluated), status="")
        for spec, study in evaluated:
            scores += score_study(network, spec, study, forward=shipped)
            progress.update(task, advance=1, status=spec.key)
    summaries = summarise(scores)

    program_path = export_program(network, weights / f"{MODEL_NAME}.pt2")
    inputs = _test_input(evaluated)
    reference = torch_probabilities(network, inputs)
    test_path = write_test_input(weights / f"{MODEL_NAME}.test.npz", inputs, reference)
    difference = parity(network, onnx_path, inputs)
    if difference > PARITY_TOLERANCE:
        console.print(f"[red]parity failed:[/red] ONNX Runtime differs from torch by {difference:.2e} (> {PARITY_TOLERANCE:g})")
        raise typer.Exit(1)
    total_s = time.perf_counter() - started
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {_torch_version()} on {config.threads} threads; "
               f"load average {load_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    card = build_card(
        name=MODEL_NAME, version=MODEL_VERSION, plan=plan, studies=studies, config=config, history=history, summaries=summaries,
        files=(onnx_path, program_path, test_path), parity_difference=difference, command=command,
        duration_s=trained_s, machine=machine, size_multiple=network.size_multiple,
        notes=f"dataset {dataset_folder(data).name} (version, analysis fingerprint), {len(paths)} studies; "
              f"dataset {dataset_s / 60:.1f} min + training {(trained_s - dataset_s) / 60:.1f} min; "
              f"evaluation and export {(total_s - trained_s) / 60:.1f} min more",
    )
    write_card(card, card_path(onnx_path))
    curves_png = curves(history, weights / f"{MODEL_NAME}.curves.png")
    header = [f"Made by `{command}` in {trained_s / 60:.1f} min (dataset {dataset_s / 60:.1f} min, training "
              f"{(trained_s - dataset_s) / 60:.1f} min) on {machine}.",
              f"Families {list(plan.families)}, held out: {plan.held_out_family or 'none'}; noise {list(plan.noise_hu)} HU; "
              f"patients {card.training.counts}. Parity torch / ONNX Runtime: {difference:.1e}.",
              "", "**Research use only. Not for diagnosis.** Trained and tested on synthetic patients only."]
    report = write_report(weights / f"{MODEL_NAME}.report.md", f"{MODEL_NAME} {MODEL_VERSION}", header, summaries, history, curves_png.name)
    shutil.copy(report, run / report.name)
    for check in acceptance(summaries):
        console.print(f"acceptance at {ACCEPTANCE_NOISE_HU:g} HU, {check.split} {check.family}: core {check.core_margin:+.3f}, "
                      f"penumbra {check.penumbra_margin:+.3f} -> {'holds' if check.holds else 'FAILS'}")
    console.print(f"wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB), its card, {report}")
    console.print(f"total {total_s / 60:.1f} min (dataset + training {trained_s / 60:.1f} min)")


def _counts(specs: list[SampleSpec]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for spec in specs:
        counts[spec.split] = counts.get(spec.split, 0) + 1
    return counts


def _torch_version() -> str:
    import torch

    return torch.__version__


def _test_input(evaluated: list[tuple[SampleSpec, Study]], slices: int = 2) -> dict[str, np.ndarray]:
    """Two slices of the first test study with the most core: the bundled parity input."""
    from models.training.loop import clinical_rows

    spec, study = max(evaluated, key=lambda item: (item[0].split == "test", int((item[1].labels == 2).sum())))
    z = int(np.argmax((study.labels == 2).sum(axis=(1, 2))))
    part = slice(max(0, min(z, study.inputs.shape[0] - slices)), max(0, min(z, study.inputs.shape[0] - slices)) + slices)
    n = study.inputs[part].shape[0]
    return {"maps": np.ascontiguousarray(study.inputs[part]), "brain": study.brain[part][:, None].astype(np.float32),
            "clinical": clinical_rows(np.full(n, study.nihss, dtype=np.float64), np.array([True, False][:n] + [True] * max(0, n - 2)))}


if __name__ == "__main__":
    app()
