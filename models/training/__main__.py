"""Train StrokeGate's learned models from scratch, end to end:

    .venv/bin/python -m models.training train            # seed 002: CT perfusion core/penumbra (see README)
    .venv/bin/python -m models.training train-final-infarct --scenario reperfused   # seed 001, MRI (and not-reperfused)

Each: cohort plan -> dataset (synthetic patients through the service's own CT perfusion analysis,
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


FINAL_VERSION = "0.1.0"


@app.command("train-final-infarct")
def train_final_infarct(
    scenario: Annotated[str, typer.Option(help="reperfused or not-reperfused: the truth the network learns.")],
    families: Annotated[list[str], typer.Option("--family", help=f"Phantom families ({', '.join(FAMILIES)}).")] = ["icbm", "icbm-varied", "geometric-graded", "geometric-uniform"],  # noqa: B006
    held_out_family: Annotated[str | None, typer.Option(help="A family that only tests (never trains or chooses a checkpoint).")] = "geometric-uniform",
    train_patients: Annotated[int, typer.Option(help="Training patients per family.")] = 5,
    validation_patients: Annotated[int, typer.Option(help="Validation patients per family.")] = 1,
    test_patients: Annotated[int, typer.Option(help="Test patients per family.")] = 3,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 6,
    steps: Annotated[int, typer.Option(help="Steps (batches) per epoch.")] = 50,
    seed: Annotated[int, typer.Option(help="Seed of the weights, slices and dropout.")] = 1,
    jobs: Annotated[int, typer.Option(help="Processes building the dataset.")] = 2,
    data: Annotated[Path, typer.Option(help="Dataset cache folder.")] = Path("build/datasets/final-infarct-mri"),
    runs: Annotated[Path, typer.Option(help="Folder of the runs (checkpoints, test predictions).")] = Path("build/runs"),
    weights: Annotated[Path, typer.Option(help="Where the shipped files go.")] = Path("models/weights"),
) -> None:
    """Seed 001: the MRI late-fusion network of one reperfusion scenario (dataset, training, evaluation against
    the mismatch baseline, export)."""
    from models.export import PARITY_TOLERANCE, export_onnx, export_program, parity, torch_probabilities, write_test_input
    from models.training.final_infarct import FinalStudy, FinalTrainConfig, mismatch_baseline, predict_lesion, score, summarise
    from models.training.final_infarct import train as train_final
    from models.training.final_infarct_card import build_final_card
    from models.training.final_infarct_dataset import build as build_final
    from models.training.final_infarct_report import write_report as write_final_report
    from service.inference.card import card_path, write_card
    from service.inference.final_infarct_inputs import LESION_THRESHOLD, Scenario, contract, model_name

    try:
        chosen = Scenario(scenario)
    except ValueError as error:
        console.print(f"[red]unknown scenario {scenario!r}:[/red] use {' or '.join(s.value for s in Scenario)}")
        raise typer.Exit(2) from error
    name = model_name("mri", chosen)
    started, load_start = time.perf_counter(), os.getloadavg()
    try:
        plan = CohortPlan(parse_families(families), held_out_family, (10.0,), train_patients, validation_patients, test_patients)
        specs = plan.samples()
    except ValueError as error:
        console.print(f"[red]cannot plan the cohort:[/red] {error}")
        raise typer.Exit(2) from error
    config = FinalTrainConfig(epochs=epochs, steps_per_epoch=steps, seed=seed)
    command = "python -m models.training " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with _progress() as progress:
        task = progress.add_task("dataset (MRI phantom + the service's MRI analysis)", total=len(specs), status="")

        def done(spec: SampleSpec, path: Path | None, seconds: float, reason: str) -> None:
            if path is None:
                console.print(f"[yellow]left out[/yellow] {spec.key}: {reason}")
            progress.update(task, advance=1, status=f"{spec.key} {reason} {seconds:.0f} s")

        paths = build_final(specs, data, jobs=jobs, on_done=done)
    dataset_s = time.perf_counter() - started
    studies = {spec: FinalStudy.from_arrays(spec.key, load(path)) for spec, path in paths.items()}
    training = [s for spec, s in studies.items() if spec.split == "train"]
    validation = [s for spec, s in studies.items() if spec.split == "validation"]
    run = runs / name
    with _progress() as progress:
        task = progress.add_task(f"training {name}", total=config.epochs * config.steps_per_epoch, status="")

        def step(epoch: int, index: int, loss: float) -> None:
            progress.update(task, advance=1, status=f"epoch {epoch + 1} loss {loss:.3f}")

        network, history = train_final(training, validation, chosen, config, run, on_step=step)
    trained_s = time.perf_counter() - started
    console.print(f"training: {history.seconds / 60:.1f} min, best validation epoch {history.best_epoch}")

    scores, predictions = [], {}
    for spec, study in studies.items():
        if spec.split not in ("test", "held-out"):
            continue
        lesion = predict_lesion(network, study)
        mask = (lesion >= LESION_THRESHOLD) & study.brain
        baseline = mismatch_baseline(study.core, study.penumbra, chosen)
        truth = study.truths[chosen]
        scores.append(score(spec.key, spec.split, spec.family, chosen, "model", mask, np.where(study.brain, lesion, 0.0), truth, study.spacing_mm))
        scores.append(score(spec.key, spec.split, spec.family, chosen, "mismatch", baseline, baseline.astype(np.float32), truth, study.spacing_mm))
        predictions[spec.key] = mask
    np.savez_compressed(run / "test_predictions.npz", **predictions)
    summaries = summarise(scores)

    feeds = contract("mri", chosen)
    weights.mkdir(parents=True, exist_ok=True)
    onnx_path = export_onnx(network, weights / f"{name}.onnx", feeds)
    program_path = export_program(network, weights / f"{name}.pt2", feeds)
    example = max((s for spec, s in studies.items() if spec.split == "test"), key=lambda s: int(s.truths[chosen].sum()))
    z = int(np.argmax(example.truths[chosen].sum(axis=(1, 2))))
    z = max(0, min(z, example.inputs.shape[0] - 2))
    inputs = {"maps": np.ascontiguousarray(example.inputs[z : z + 2]), "brain": example.brain[z : z + 2, None].astype(np.float32)}
    test_path = write_test_input(weights / f"{name}.test.npz", inputs, torch_probabilities(network, inputs, feeds))
    difference = parity(network, onnx_path, inputs, feeds)
    if difference > PARITY_TOLERANCE:
        console.print(f"[red]parity failed:[/red] ONNX Runtime differs from torch by {difference:.2e} (> {PARITY_TOLERANCE:g})")
        raise typer.Exit(1)
    total_s = time.perf_counter() - started
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {_torch_version()} on {config.threads} thread; "
               f"load average {load_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    card = build_final_card(
        name=name, version=FINAL_VERSION, scenario=chosen, plan=plan, trained=training, config=config, history=history,
        summaries=summaries, files=(onnx_path, program_path, test_path), parity_difference=difference, command=command,
        duration_s=trained_s, machine=machine, size_multiple=network.size_multiple,
        notes=f"dataset {dataset_s / 60:.1f} min + training {(trained_s - dataset_s) / 60:.1f} min; "
              f"evaluation and export {(total_s - trained_s) / 60:.1f} min more",
    )
    write_card(card, card_path(onnx_path))
    header = [f"Made by `{command}` in {trained_s / 60:.1f} min (dataset {dataset_s / 60:.1f} min, training "
              f"{(trained_s - dataset_s) / 60:.1f} min) on {machine}.",
              f"Families {list(plan.families)}, held out: {plan.held_out_family or 'none'}; patients {card.training.counts}. "
              f"Parity torch / ONNX Runtime: {difference:.1e}.",
              "", "**Research use only. Not for diagnosis.** Trained and tested on synthetic patients only."]
    report = write_final_report(weights / f"{name}.report.md", f"{name} {FINAL_VERSION}", header, summaries, history)
    shutil.copy(report, run / report.name)
    console.print(f"wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB), its card, {report}")
    console.print(f"total {total_s / 60:.1f} min (dataset + training {trained_s / 60:.1f} min)")


@app.command("final-infarct-consistency")
def final_infarct_consistency(
    data: Annotated[Path, typer.Option(help="Dataset cache folder.")] = Path("build/datasets/final-infarct-mri"),
    runs: Annotated[Path, typer.Option(help="Folder of the two runs.")] = Path("build/runs"),
    out: Annotated[Path, typer.Option(help="The markdown table written.")] = Path("models/weights/mri-final-infarct.consistency.md"),
) -> None:
    """Seed 001's consistency check of the two MRI networks on every test patient: the share of the
    reperfused prediction inside the non-reperfused one, and predictions smaller than 80 % of the
    measured (ADC) core."""
    from models.training.final_infarct import consistency
    from models.training.final_infarct_dataset import DATASET_VERSION
    from service.inference.final_infarct_inputs import Scenario, model_name

    predictions = {}
    for scenario in Scenario:
        path = runs / model_name("mri", scenario) / "test_predictions.npz"
        if not path.is_file():
            console.print(f"[red]no test predictions at {path}:[/red] train both networks first (train-final-infarct)")
            raise typer.Exit(2)
        predictions[scenario] = load(path)
    rows = ["| patient | family | measured core (mL) | reperfused (mL) | not reperfused (mL) | reperfused inside not reperfused | "
            "smaller than 80 % of the core |", "|---|---|---|---|---|---|---|"]
    inside, small = [], 0
    keys = sorted(set(predictions[Scenario.REPERFUSED]) & set(predictions[Scenario.NOT_REPERFUSED]))
    for key in keys:
        arrays = load(data / f"v{DATASET_VERSION}" / f"{key}.npz")
        voxel_ml = float(np.prod(arrays["spacing_mm"])) / 1000.0
        core_ml = float(arrays["mismatch_core"].sum()) * voxel_ml
        a, b = predictions[Scenario.REPERFUSED][key], predictions[Scenario.NOT_REPERFUSED][key]
        a_ml, b_ml = float(a.sum()) * voxel_ml, float(b.sum()) * voxel_ml
        share = consistency(a, b)
        below = [name for name, ml in (("reperfused", a_ml), ("not reperfused", b_ml)) if ml < 0.8 * core_ml]
        inside.append(share)
        small += bool(below)
        rows.append(f"| {key} | {key.rsplit('-', 2)[0]} | {core_ml:.1f} | {a_ml:.1f} | {b_ml:.1f} | {share:.0%} | {', '.join(below) or 'no'} |")
    summary = (f"{len(keys)} test patients: the reperfused prediction lies inside the non-reperfused one for a median "
               f"{np.median(inside):.0%} of its voxels (lowest {min(inside):.0%}); {small} patients ({small / max(1, len(keys)):.0%}) "
               "have a prediction smaller than 80 % of the measured core.")
    out.write_text("\n".join(["# MRI final-infarct networks: consistency of the two scenarios", "",
                               "**Research use only. Not for diagnosis.** Synthetic patients only.", "", summary, "", *rows]) + "\n")
    console.print(summary)


@app.command("train-outcome-crd")
def train_outcome_crd(
    families: Annotated[list[str], typer.Option("--family", help=f"Phantom families ({', '.join(FAMILIES)}).")] = list(FAMILIES),  # noqa: B006
    held_out_family: Annotated[str, typer.Option(help="The family that only tests.")] = "geometric-uniform",
    patients: Annotated[int, typer.Option(help="Patients per family (the held-out family's all test).")] = 80,
    test_patients: Annotated[int, typer.Option(help="Test patients per training family.")] = 20,
    epochs: Annotated[int, typer.Option(help="ResNet epochs.")] = 30,
    seed: Annotated[int, typer.Option(help="Seed of the weights, folds and augmentation.")] = 4,
    data: Annotated[Path, typer.Option(help="Dataset cache folder.")] = Path("build/datasets/outcome"),
    weights: Annotated[Path, typer.Option(help="Where the shipped files go.")] = Path("models/weights"),
) -> None:
    """Seed 004's clinical-radiomics-deep learning outcome model: P(mRS 3-6 at 90 days)."""
    from models.training.outcome_command import run
    from models.training.outcome_crd import DeepConfig

    try:
        chosen = parse_families(families)
    except ValueError as error:
        console.print(f"[red]cannot plan the cohort:[/red] {error}")
        raise typer.Exit(2) from error
    if held_out_family not in chosen or len(chosen) < 2:
        console.print(f"[red]cannot plan the cohort:[/red] the held-out family {held_out_family!r} must be one of at least two families")
        raise typer.Exit(2)
    if patients < test_patients + 30:
        console.print(f"[red]cannot plan the cohort:[/red] {patients} patients per family leave too few to fit after {test_patients} test patients")
        raise typer.Exit(2)
    run(list(chosen), held_out_family, patients, test_patients, DeepConfig(epochs=epochs, seed=seed), data, weights, console)


@app.command("train-outcome-cnn-lstm")
def train_outcome_cnn_lstm(
    families: Annotated[list[str], typer.Option("--family", help=f"Phantom families ({', '.join(FAMILIES)}).")] = list(FAMILIES),  # noqa: B006
    held_out_family: Annotated[str, typer.Option(help="The family that only tests.")] = "geometric-uniform",
    patients: Annotated[int, typer.Option(help="Patients per family (the held-out family's all test).")] = 80,
    test_patients: Annotated[int, typer.Option(help="Test patients per training family.")] = 20,
    epochs: Annotated[int, typer.Option(help="Epochs per module.")] = 30,
    seed: Annotated[int, typer.Option(help="Seed of the first module's weights (the others: +1, +2, ...).")] = 0,
    data: Annotated[Path, typer.Option(help="Dataset cache folder.")] = Path("build/datasets/outcome"),
    weights: Annotated[Path, typer.Option(help="Where the shipped files go.")] = Path("models/weights"),
) -> None:
    """Seed 000's CNN-LSTM modules (MRI: ADC, DWI, Tmax, CBF, CBV) fused by Algorithm 1 with the NIHSS."""
    from models.training.outcome_cnn_lstm import ModuleConfig, run

    try:
        chosen = parse_families(families)
    except ValueError as error:
        console.print(f"[red]cannot plan the cohort:[/red] {error}")
        raise typer.Exit(2) from error
    if held_out_family not in chosen or len(chosen) < 2:
        console.print(f"[red]cannot plan the cohort:[/red] the held-out family {held_out_family!r} must be one of at least two families")
        raise typer.Exit(2)
    run(list(chosen), held_out_family, patients, test_patients, ModuleConfig(epochs=epochs, seed=seed), data, weights, console)


@app.command("outcome-calibration")
def outcome_calibration(
    families: Annotated[list[str], typer.Option("--family", help=f"Phantom families ({', '.join(FAMILIES)}).")] = list(FAMILIES),  # noqa: B006
    held_out_family: Annotated[str, typer.Option(help="The family that only tests.")] = "geometric-uniform",
    patients: Annotated[int, typer.Option(help="Patients per family, as the models were trained with.")] = 80,
    test_patients: Annotated[int, typer.Option(help="Test patients per training family.")] = 20,
    data: Annotated[Path, typer.Option(help="Dataset cache folder.")] = Path("build/datasets/outcome"),
    weights: Annotated[Path, typer.Option(help="The shipped outcome models' folder.")] = Path("models/weights"),
) -> None:
    """Both shipped outcome models through the service: AUC and calibration slope (bootstrap interval) per family."""
    from models.training.outcome_calibration import run
    from service.errors import ModelError

    try:
        chosen = parse_families(families)
    except ValueError as error:
        console.print(f"[red]cannot plan the cohort:[/red] {error}")
        raise typer.Exit(2) from error
    try:
        run(list(chosen), held_out_family, patients, test_patients, data, weights, console)
    except ModelError as error:
        console.print(f"[red]cannot load the outcome models:[/red] {error}")
        raise typer.Exit(2) from error


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
