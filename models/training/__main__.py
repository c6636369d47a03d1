"""Train StrokeGate's learned models from scratch, end to end:

    .venv/bin/python -m models.training train            # seed 002: CT perfusion core/penumbra (see README)
    .venv/bin/python -m models.training train-final-infarct --modality mri --scenario reperfused   # seed 001 (and ct, not-reperfused)

Each: cohort plan -> dataset (synthetic patients through the service's own analysis, cached under
build/datasets) -> training (checkpoints in build/runs) -> evaluation against the threshold
method on the test and held-out patients -> ONNX, torch program, test input, model card and
report in models/weights. The steps are ``models.training.pipeline``'s, the loop
``models.training.loop``'s, the card ``models.training.card``'s. Fixed seeds: the same command
gives the same weights on the same software (torch on CPU, same thread count).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from models.training.cohort import FAMILIES, SampleSpec, parse_families
from models.training.core_penumbra import Study, TrainConfig
from models.training.dataset import load
from models.training.pipeline import build_dataset, command_line, console, machine, plan_cohort, ship, train_with_progress

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train StrokeGate's learned models (research use only).")

MODEL_NAME = "ctp-core-penumbra"
MODEL_VERSION = "0.1.0"


@app.callback()
def main() -> None:
    """StrokeGate model training."""


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
    augment: Annotated[bool, typer.Option(help="Augment the crops: up-down flips, small per-map scaling, noise.")] = TrainConfig.augment,
    threads: Annotated[int, typer.Option(help="Torch threads (the same weights need the same count).")] = TrainConfig.threads,
    jobs: Annotated[int, typer.Option(help="Processes building the dataset.")] = 2,
    data: Annotated[Path, typer.Option(help="Dataset cache folder.")] = Path("build/datasets/ctp"),
    run: Annotated[Path, typer.Option(help="Folder for checkpoints and the run's report.")] = Path("build/runs/ctp-core-penumbra"),
    weights: Annotated[Path, typer.Option(help="Where the shipped files go.")] = Path("models/weights"),
) -> None:
    """Dataset, training, evaluation, export: the shipped CT perfusion core/penumbra model."""
    from models.export import export_onnx, onnx_forward
    from models.training.card import TrainingRun, build_card
    from models.training.core_penumbra import card_text, train as train_network
    from models.training.dataset import CT_DATASET, dataset_folder
    from models.training.evaluate import ACCEPTANCE_NOISE_HU, acceptance, metric_rows, score_study, summarise
    from models.training.report import curves, write_report
    from service.inference.card import card_path, write_card
    from service.inference.ctp_inputs import CTP_CONTRACT

    started, load_start = time.perf_counter(), os.getloadavg()
    plan, specs = plan_cohort(families, held_out_family, tuple(noise_hu), train_patients, validation_patients, test_patients)
    config = TrainConfig(epochs=epochs, steps_per_epoch=steps, seed=seed, augment=augment, threads=threads)
    console.print(f"{len(specs)} studies: " + ", ".join(f"{n} {s}" for s, n in _counts(specs).items()))
    paths = build_dataset(specs, data, jobs, CT_DATASET, "dataset (simulate + analyse)")
    dataset_s = time.perf_counter() - started
    console.print(f"dataset: {len(paths)} studies in {dataset_s / 60:.1f} min")

    studies = {spec: _study(spec, path) for spec, path in paths.items()}
    training = [s for spec, s in studies.items() if spec.split == "train"]
    validation = [s for spec, s in studies.items() if spec.split == "validation"]
    network, history = train_with_progress("training", config.epochs * config.steps_per_epoch,
                                           lambda on_step: train_network(training, validation, config, run, on_step=on_step))
    trained_s = time.perf_counter() - started

    weights.mkdir(parents=True, exist_ok=True)
    onnx_path = export_onnx(network, weights / f"{MODEL_NAME}.onnx")
    shipped_forward = onnx_forward(onnx_path)  # the test patients are scored on the shipped file, as the service runs it
    evaluated = [(spec, s) for spec, s in studies.items() if spec.split in ("test", "held-out")]
    scores = [score for spec, study in evaluated for score in score_study(network, spec, study, forward=shipped_forward)]
    summaries = summarise(scores)
    shipped = ship(network, MODEL_NAME, weights, CTP_CONTRACT, _test_input(evaluated), onnx=onnx_path)
    total_s = time.perf_counter() - started
    where = machine(config.threads, load_start[0])
    command = command_line()
    notes = (f"dataset {dataset_folder(data).name} (version, analysis fingerprint), {len(paths)} studies; "
             f"dataset {dataset_s / 60:.1f} min + training {(trained_s - dataset_s) / 60:.1f} min; "
             f"evaluation and export {(total_s - trained_s) / 60:.1f} min more")
    card = build_card(
        name=MODEL_NAME, version=MODEL_VERSION, contract=CTP_CONTRACT, text=card_text(config, history, notes),
        run=TrainingRun(plan=plan, spacings_mm=[s.extra["spacing_mm"] for s in training], seed=config.seed, history=history,
                        files=shipped.files, parity_difference=shipped.parity_difference, command=command, duration_s=trained_s,
                        machine=where, size_multiple=network.size_multiple, noise_hu=plan.noise_hu),
        metrics=metric_rows(summaries),
    )
    write_card(card, card_path(onnx_path))
    curves_png = curves(history, weights / f"{MODEL_NAME}.curves.png")
    header = [f"Made by `{command}` in {trained_s / 60:.1f} min (dataset {dataset_s / 60:.1f} min, training "
              f"{(trained_s - dataset_s) / 60:.1f} min) on {where}.",
              f"Families {list(plan.families)}, held out: {plan.held_out_family or 'none'}; noise {list(plan.noise_hu)} HU; "
              f"patients {card.training.counts}. Parity torch / ONNX Runtime: {shipped.parity_difference:.1e}.",
              "", "**Research use only. Not for diagnosis.** Trained and tested on synthetic patients only."]
    report = write_report(weights / f"{MODEL_NAME}.report.md", f"{MODEL_NAME} {MODEL_VERSION}", header, summaries, history, curves_png.name)
    shutil.copy(report, run / report.name)
    for check in acceptance(summaries):
        console.print(f"acceptance at {ACCEPTANCE_NOISE_HU:g} HU, {check.split} {check.family}: core {check.core_margin:+.3f}, "
                      f"penumbra {check.penumbra_margin:+.3f} -> {'holds' if check.holds else 'FAILS'}")
    console.print(f"wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB), its card, {report}")
    console.print(f"total {total_s / 60:.1f} min (dataset + training {trained_s / 60:.1f} min)")


FINAL_VERSION = "0.1.0"
FINAL_DATA = {"mri": Path("build/datasets/final-infarct-mri"), "ct": Path("build/datasets/ctp")}
"""Each modality's dataset cache (the CT networks share the core/penumbra model's studies)."""


def _modality(modality: str) -> str:
    if modality not in FINAL_DATA:
        console.print(f"[red]unknown modality {modality!r}:[/red] use {' or '.join(FINAL_DATA)}")
        raise typer.Exit(2)
    return modality


@app.command("train-final-infarct")
def train_final_infarct(
    scenario: Annotated[str, typer.Option(help="reperfused or not-reperfused: the truth the network learns.")],
    modality: Annotated[str, typer.Option(help="mri (DWI, ADC, Tmax, CBF, CBV) or ct (CBF, CBV, TTP, Tmax, MIP).")] = "mri",
    families: Annotated[list[str], typer.Option("--family", help=f"Phantom families ({', '.join(FAMILIES)}).")] = ["icbm", "icbm-varied", "geometric-graded", "geometric-uniform"],  # noqa: B006
    held_out_family: Annotated[str | None, typer.Option(help="A family that only tests (never trains or chooses a checkpoint).")] = "geometric-uniform",
    train_patients: Annotated[int, typer.Option(help="Training patients per family.")] = 5,
    validation_patients: Annotated[int, typer.Option(help="Validation patients per family.")] = 1,
    test_patients: Annotated[int, typer.Option(help="Test patients per family.")] = 3,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 6,
    steps: Annotated[int, typer.Option(help="Steps (batches) per epoch.")] = 50,
    seed: Annotated[int, typer.Option(help="Seed of the weights, slices and dropout.")] = 1,
    jobs: Annotated[int, typer.Option(help="Processes building the dataset.")] = 2,
    data: Annotated[Path | None, typer.Option(help="Dataset cache folder (default: build/datasets/final-infarct-mri or ctp).")] = None,
    runs: Annotated[Path, typer.Option(help="Folder of the runs (checkpoints, test predictions).")] = Path("build/runs"),
    weights: Annotated[Path, typer.Option(help="Where the shipped files go.")] = Path("models/weights"),
) -> None:
    """Seed 001: the late-fusion network of one modality and reperfusion scenario (dataset, training,
    evaluation against the mismatch baseline, export)."""
    from models.training.card import TrainingRun, build_card
    from models.training.dataset import dataset_folder
    from models.training.final_infarct import FinalStudy, FinalTrainConfig, card_text, metric_rows, mismatch_baseline, predict_lesion, score, summarise
    from models.training.final_infarct import train as train_final
    from models.training.final_infarct_dataset import dataset_kind
    from models.training.final_infarct_report import write_report as write_final_report
    from service.inference.card import card_path, write_card
    from service.inference.final_infarct import including_core
    from service.inference.final_infarct_inputs import LESION_THRESHOLD, Scenario, contract, model_name

    try:
        chosen = Scenario(scenario)
    except ValueError as error:
        console.print(f"[red]unknown scenario {scenario!r}:[/red] use {' or '.join(s.value for s in Scenario)}")
        raise typer.Exit(2) from error
    modality = _modality(modality)
    name = model_name(modality, chosen)
    started, load_start = time.perf_counter(), os.getloadavg()
    noise = 10.0  # CT: the noise of the training and test studies; MRI: unused (the SNR is drawn per patient)
    plan, specs = plan_cohort(families, held_out_family, (noise,), train_patients, validation_patients, test_patients)
    config = FinalTrainConfig(epochs=epochs, steps_per_epoch=steps, seed=seed)
    paths = build_dataset(specs, data or FINAL_DATA[modality], jobs, dataset_kind(modality),
                          f"dataset ({modality} phantom + the service's {modality} analysis)")
    dataset_s = time.perf_counter() - started
    studies = {spec: FinalStudy.from_arrays(spec.key, load(path)) for spec, path in paths.items()}
    training = [s for spec, s in studies.items() if spec.split == "train"]
    validation = [s for spec, s in studies.items() if spec.split == "validation"]
    run = runs / name
    network, history = train_with_progress(f"training {name}", config.epochs * config.steps_per_epoch,
                                           lambda on_step: train_final(training, validation, chosen, config, run, on_step=on_step))
    trained_s = time.perf_counter() - started

    scores = []
    for spec, study in studies.items():
        if spec.split not in ("validation", "test", "held-out"):
            continue
        lesion = np.where(study.brain, predict_lesion(network, study), 0.0)
        mask = (lesion >= LESION_THRESHOLD) & study.brain
        constrained = including_core(mask, study.core)
        baseline = mismatch_baseline(study.core, study.penumbra, chosen)
        truth = study.truths[chosen]
        scores.append(score(spec.key, spec.split, spec.family, chosen, "model", mask, lesion, truth, study.spacing_mm))
        scores.append(score(spec.key, spec.split, spec.family, chosen, "model with measured core", constrained,
                            np.where(study.core, 1.0, lesion), truth, study.spacing_mm))
        scores.append(score(spec.key, spec.split, spec.family, chosen, "mismatch", baseline, baseline.astype(np.float32), truth, study.spacing_mm))
    summaries = summarise(scores)

    example = max((s for spec, s in studies.items() if spec.split == "test"), key=lambda s: int(s.truths[chosen].sum()))
    z = int(np.argmax(example.truths[chosen].sum(axis=(1, 2))))
    z = max(0, min(z, example.inputs.shape[0] - 2))
    inputs = {"maps": np.ascontiguousarray(example.inputs[z : z + 2]), "brain": example.brain[z : z + 2, None].astype(np.float32)}
    shipped = ship(network, name, weights, contract(modality, chosen), inputs)
    total_s = time.perf_counter() - started
    where = machine(config.threads, load_start[0])
    command = command_line()
    kind = dataset_kind(modality)
    notes = (f"dataset {dataset_folder(data or FINAL_DATA[modality], kind).name} (version, analysis fingerprint), {len(paths)} studies; "
             f"dataset {dataset_s / 60:.1f} min + training {(trained_s - dataset_s) / 60:.1f} min; "
             f"evaluation and export {(total_s - trained_s) / 60:.1f} min more")
    card = build_card(
        name=name, version=FINAL_VERSION, contract=contract(modality, chosen), text=card_text(modality, chosen, config, history, notes),
        run=TrainingRun(plan=plan, spacings_mm=[s.spacing_mm for s in training], seed=config.seed, history=history,
                        files=shipped.files, parity_difference=shipped.parity_difference, command=command, duration_s=trained_s,
                        machine=where, size_multiple=network.size_multiple, noise_hu=(noise,) if modality == "ct" else ()),
        metrics=metric_rows(summaries, chosen, noise if modality == "ct" else 0.0),
    )
    write_card(card, card_path(shipped.onnx))
    header = [f"Made by `{command}` in {trained_s / 60:.1f} min (dataset {dataset_s / 60:.1f} min, training "
              f"{(trained_s - dataset_s) / 60:.1f} min) on {where}.",
              f"Families {list(plan.families)}, held out: {plan.held_out_family or 'none'}; patients {card.training.counts}. "
              f"Parity torch / ONNX Runtime: {shipped.parity_difference:.1e}.",
              "", "**Research use only. Not for diagnosis.** Trained and tested on synthetic patients only."]
    report = write_final_report(weights / f"{name}.report.md", f"{name} {FINAL_VERSION}", header, summaries, history, modality)
    shutil.copy(report, run / report.name)
    console.print(f"wrote {shipped.onnx} ({shipped.onnx.stat().st_size / 1e6:.1f} MB), its card, {report}")
    console.print(f"total {total_s / 60:.1f} min (dataset + training {trained_s / 60:.1f} min)")


@app.command("final-infarct-consistency")
def final_infarct_consistency(
    modality: Annotated[str, typer.Option(help="mri or ct: whose two networks.")] = "mri",
    test_patients: Annotated[int, typer.Option(help="Test patients per family (the cards' test patients, then new ones after every seed the cards name).")] = 3,
    jobs: Annotated[int, typer.Option(help="Processes building the studies not cached yet.")] = 2,
    data: Annotated[Path | None, typer.Option(help="Dataset cache folder (default: the modality's).")] = None,
    weights: Annotated[Path, typer.Option(help="Where the shipped networks and their cards are.")] = Path("models/weights"),
    out: Annotated[Path | None, typer.Option(help="The markdown written (default models/weights/<modality>-final-infarct.consistency.md).")] = None,
) -> None:
    """Seed 001's consistency check of a modality's two shipped networks (ONNX Runtime, as the service
    runs them): on every test patient the share of the reperfused prediction inside the non-reperfused
    one and predictions smaller than 80 % of the measured (threshold) core, each network alone and with
    the measured core added (what the service reports); and both scenarios' Dice and volumetric
    similarity per family for the network alone, with the core, and the mismatch baseline (validation
    patients too: they chose whether the service adds the core)."""
    from models.training.dataset import dataset_folder
    from models.training.final_infarct import FinalStudy, consistency, evaluation_cohort, mismatch_baseline, score, summarise
    from models.training.final_infarct_dataset import dataset_kind
    from models.training.final_infarct_report import consistency_table
    from models.training.loop import predict_volume
    from service.inference.card import read_card
    from service.inference.engine import Backend, load_engine
    from service.inference.final_infarct import including_core
    from service.inference.final_infarct_inputs import LESION, LESION_THRESHOLD, Scenario, contract, model_name

    modality = _modality(modality)
    kind = dataset_kind(modality)
    out = out or weights / f"{modality}-final-infarct.consistency.md"
    engines = {}
    for scenario in Scenario:
        onnx = weights / f"{model_name(modality, scenario)}.onnx"
        if not onnx.is_file():
            console.print(f"[red]no network at {onnx}:[/red] train both networks first (train-final-infarct --modality {modality})")
            raise typer.Exit(2)
        engines[scenario] = load_engine(onnx, Backend.ONNXRUNTIME, contract=contract(modality, scenario))
    training = engines[Scenario.REPERFUSED].card.training
    seeds = {split: sorted({*engines[Scenario.REPERFUSED].card.training.seeds.get(split, []),
                            *engines[Scenario.NOT_REPERFUSED].card.training.seeds.get(split, [])})
             for split in ("test", "validation", "train", "held-out")}
    noise = training.noise_hu[0] if training.noise_hu else 10.0
    specs = evaluation_cohort(seeds, tuple(training.families), training.held_out_family, test_patients, noise)
    paths = build_dataset(specs, data or FINAL_DATA[modality], jobs, kind, f"dataset ({modality}, {len(specs)} evaluation studies)")
    scores, rows = [], []
    for spec, path in paths.items():
        study = FinalStudy.from_arrays(spec.key, load(path))
        masks = {}
        for scenario, engine in engines.items():
            forward = lambda maps, brain, engine=engine: engine.predict({"maps": maps, "brain": brain})  # noqa: E731
            lesion = np.where(study.brain, predict_volume(forward, study.inputs, study.brain, engine.card.inputs.size_multiple, batch=8)[:, LESION], 0.0)
            masks[scenario] = (lesion >= LESION_THRESHOLD) & study.brain
            truth = study.truths[scenario]
            baseline = mismatch_baseline(study.core, study.penumbra, scenario)
            scores += [score(spec.key, spec.split, spec.family, scenario, "model", masks[scenario], lesion, truth, study.spacing_mm),
                       score(spec.key, spec.split, spec.family, scenario, "model with measured core", including_core(masks[scenario], study.core),
                             np.where(study.core, 1.0, lesion), truth, study.spacing_mm),
                       score(spec.key, spec.split, spec.family, scenario, "mismatch", baseline, baseline.astype(np.float32), truth, study.spacing_mm)]
        if spec.split == "validation":
            continue
        voxel_ml = float(np.prod(study.spacing_mm)) / 1000.0
        a, b = masks[Scenario.REPERFUSED], masks[Scenario.NOT_REPERFUSED]
        rows.append((spec, float(study.core.sum()) * voxel_ml, float(study.truths[Scenario.REPERFUSED].sum()) * voxel_ml,
                     float(a.sum()) * voxel_ml, float(b.sum()) * voxel_ml, consistency(a, b),
                     float(including_core(a, study.core).sum()) * voxel_ml, float(including_core(b, study.core).sum()) * voxel_ml,
                     consistency(including_core(a, study.core), including_core(b, study.core))))
    lines, summary = consistency_table(rows, summarise(scores), modality)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    console.print(summary)
    console.print(f"wrote {out}")


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

    chosen = _outcome_families(families, held_out_family)
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

    chosen = _outcome_families(families, held_out_family)
    run(list(chosen), held_out_family, patients, test_patients, ModuleConfig(epochs=epochs, seed=seed), data, weights, console)


def _outcome_families(families: list[str], held_out_family: str) -> tuple[str, ...]:
    """The outcome models' families, the held-out one among at least two; else one line and exit 2."""
    try:
        chosen = parse_families(families)
    except ValueError as error:
        console.print(f"[red]cannot plan the cohort:[/red] {error}")
        raise typer.Exit(2) from error
    if held_out_family not in chosen or len(chosen) < 2:
        console.print(f"[red]cannot plan the cohort:[/red] the held-out family {held_out_family!r} must be one of at least two families")
        raise typer.Exit(2)
    return chosen


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


def _test_input(evaluated: list[tuple[SampleSpec, Study]], slices: int = 2) -> dict[str, np.ndarray]:
    """Two slices of the first test study with the most core: the bundled parity input."""
    from models.training.core_penumbra import clinical_rows

    spec, study = max(evaluated, key=lambda item: (item[0].split == "test", int((item[1].labels == 2).sum())))
    z = int(np.argmax((study.labels == 2).sum(axis=(1, 2))))
    part = slice(max(0, min(z, study.inputs.shape[0] - slices)), max(0, min(z, study.inputs.shape[0] - slices)) + slices)
    n = study.inputs[part].shape[0]
    return {"maps": np.ascontiguousarray(study.inputs[part]), "brain": study.brain[part][:, None].astype(np.float32),
            "clinical": clinical_rows(np.full(n, study.nihss, dtype=np.float64), np.array([True, False][:n] + [True] * max(0, n - 2)))}


if __name__ == "__main__":
    app()
