"""The ``strokegate`` command line."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(help="StrokeGate: acute-stroke imaging service (research use only, not for diagnosis).", no_args_is_help=True)
console = Console()


db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)
app.add_typer(db_app, name="db")
token_app = typer.Typer(help="Bearer tokens of the HTTP API (stored hashed; each shown once).", no_args_is_help=True)
app.add_typer(token_app, name="token")

ConfigOption = Annotated[Path | None, typer.Option("--config", help="YAML configuration file.", exists=True, dir_okay=False)]


@app.callback()
def main() -> None:
    """StrokeGate command line."""


def fail(message: str, code: int = 1) -> typer.Exit:
    """End the command with one line on stderr: what is wrong and what to do."""
    typer.echo(f"strokegate: {message}", err=True)
    return typer.Exit(code)


def _settings(config: Path | None, **overrides: object):  # noqa: ANN202
    from pydantic import ValidationError

    from service.config import load_settings

    try:
        return load_settings(config, **overrides)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc']) or 'settings'}: {e['msg'].removeprefix('Value error, ')}"
            for e in error.errors()
        )
        raise fail(f"invalid configuration: {problems}", 2) from None
    except (ValueError, OSError) as error:
        raise fail(f"invalid configuration: {error}", 2) from None


def _database(url: str):  # noqa: ANN202
    """The migrated database for a command that creates files: owner-only from here on."""
    import os

    from service.errors import SetupError
    from service.ops.startup import open_database

    os.umask(0o077)
    try:
        return open_database(url)
    except SetupError as error:
        raise fail(str(error)) from None


@app.command()
def serve(
    config: ConfigOption = None,
    port: Annotated[int | None, typer.Option(help="DICOM port.")] = None,
    ae_title: Annotated[str | None, typer.Option(help="Our AE title.")] = None,
    destination: Annotated[list[str] | None, typer.Option(help="Result destination AE@host:port (repeatable).")] = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL, e.g. sqlite:///strokegate.db or postgresql://...")] = None,
    spool_dir: Annotated[Path | None, typer.Option(help="Folder for received instances.")] = None,
    results_dir: Annotated[Path | None, typer.Option(help="Folder for result objects.")] = None,
    http_port: Annotated[int | None, typer.Option(help="HTTP port for /metrics, /healthz and the API.")] = None,
    host: Annotated[str | None, typer.Option(help="Address the DICOM receiver binds (default 127.0.0.1; 0.0.0.0: all).")] = None,
    http_host: Annotated[str | None, typer.Option(help="Address the HTTP server binds (default 127.0.0.1).")] = None,
    hl7_port: Annotated[int | None, typer.Option(help="HL7 v2 MLLP port for ORU^R01 with the NIHSS (default: none).")] = None,
    fhir_base_url: Annotated[str | None, typer.Option(help="FHIR R4 base URL searched for each study's NIHSS.")] = None,
    fhir_token_url: Annotated[str | None, typer.Option(help="SMART backend services: the EHR's OAuth2 token endpoint.")] = None,
    fhir_client_id: Annotated[str | None, typer.Option(help="SMART: StrokeGate's client id at the EHR.")] = None,
    fhir_private_key: Annotated[Path | None, typer.Option(help="SMART: PEM RSA key signing the RS384 client assertion.")] = None,
    fhir_key_id: Annotated[str | None, typer.Option(help="SMART: the key's id (JWK kid) at the EHR.")] = None,
    fhir_scope: Annotated[str | None, typer.Option(help="SMART: the scope asked for (default system/Observation.read).")] = None,
) -> None:
    """Run the service until SIGTERM or Ctrl-C. Everything it creates is readable by this user only."""
    import signal
    import threading

    from service.errors import SetupError
    from service.ops.logging import configure, tag_key
    from service.ops.startup import private_folder

    settings = _settings(
        config, port=port, ae_title=ae_title, destinations=destination or None, database_url=database_url,
        spool_dir=spool_dir, results_dir=results_dir, http_port=http_port, host=host, http_host=http_host,
        hl7_port=hl7_port, fhir_base_url=fhir_base_url, fhir_token_url=fhir_token_url, fhir_client_id=fhir_client_id,
        fhir_private_key=fhir_private_key, fhir_key_id=fhir_key_id, fhir_scope=fhir_scope,
    )
    from service.config import JobQueueKind
    from service.ops.startup import check_broker

    try:
        private_folder(settings.spool_dir, "spool", "spool_dir")
        configure(settings.log_level, tag_key(settings.log_tag_key, settings.spool_dir))
        if settings.job_queue == JobQueueKind.CELERY:
            check_broker(settings.broker_url)
    except (SetupError, OSError) as error:
        raise fail(str(error)) from None
    db = _database(settings.database_url)  # before the heavy imports: a bad URL is told at once
    from service.server import StrokeGate

    try:
        gate = StrokeGate(settings, db=db)
        gate.start()
    except SetupError as error:
        raise fail(str(error)) from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    dicom = {"plain": "DICOM", "tls": "DICOM TLS", "both": "DICOM and DICOM TLS"}[settings.dicom_transport.value]
    http = "HTTPS" if settings.http_tls_certificate else "HTTP"
    console.print(f"StrokeGate listening: {dicom} {settings.ae_title}@{settings.host}:{gate.dicom_port}, "
                  f"{http} {settings.http_host}:{gate.http_port}"
                  + (f", HL7 MLLP {settings.hl7_host}:{gate.hl7_port}" if gate.hl7_port else ""), soft_wrap=True)
    stop.wait()
    gate.stop()


@app.command()
def worker(
    config: ConfigOption = None,
    broker_url: Annotated[str | None, typer.Option(help="RabbitMQ URL, e.g. amqp://user:password@rabbitmq:5672//.")] = None,
    database_url: Annotated[str | None, typer.Option(help="The database serve uses (PostgreSQL when they run on several machines).")] = None,
    spool_dir: Annotated[Path | None, typer.Option(help="serve's spool folder (shared storage).")] = None,
    results_dir: Annotated[Path | None, typer.Option(help="serve's results folder (shared storage).")] = None,
    destination: Annotated[list[str] | None, typer.Option(help="Result destination AE@host:port (repeatable): the same as serve's.")] = None,
    workers: Annotated[int | None, typer.Option(help="Analyses run at once by this process (threads).")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Serve this worker's Prometheus metrics at http_host:PORT/metrics (0: none).")] = None,
) -> None:
    """Run analysis jobs that `strokegate serve` publishes (job_queue celery) until SIGTERM (the
    jobs in progress finish first) or Ctrl-C. Give it serve's configuration: the database, the
    spool and results folders, the destinations and the analysis settings."""
    import os
    import threading

    from service.config import JobQueueKind
    from service.errors import SetupError
    from service.ops.logging import configure, tag_key
    from service.ops.startup import check_broker, private_folder, shown_url

    settings = _settings(
        config, broker_url=broker_url, database_url=database_url, spool_dir=spool_dir, results_dir=results_dir,
        destinations=destination or None, workers=workers, worker_metrics_port=metrics_port,
    )
    if settings.job_queue != JobQueueKind.CELERY:
        raise fail("job_queue is database: serve analyses in its own threads and publishes no jobs; set job_queue "
                   "to celery (STROKEGATE_JOB_QUEUE=celery) for serve and its workers alike", 2)
    try:
        configure(settings.log_level, tag_key(settings.log_tag_key, settings.spool_dir))
        check_broker(settings.broker_url)
    except (SetupError, OSError) as error:
        raise fail(str(error)) from None
    db = _database(settings.database_url)
    from service.jobs import lease
    from service.ops.owners import HOST
    from service.jobs.celery_queue import celery_app, register_analysis, run_worker
    from service.server import job_runner

    try:
        private_folder(settings.results_dir, "results", "results_dir")
    except SetupError as error:
        raise fail(str(error)) from None
    released = lease.release_dead_leases(db)
    if released:
        console.print(f"{released} jobs of workers no longer running on this host requeued")
    if settings.worker_metrics_port:
        from prometheus_client import start_http_server

        try:
            start_http_server(settings.worker_metrics_port, addr=settings.http_host)
        except OSError as error:
            raise fail(f"cannot serve the worker's metrics on {settings.http_host}:{settings.worker_metrics_port} "
                       f"({error.strerror or error}); choose a free port with --metrics-port") from None
        console.print(f"worker metrics on http://{settings.http_host}:{settings.worker_metrics_port}/metrics", soft_wrap=True)
    app_ = celery_app(settings.broker_url, settings.celery_queue)
    runner = job_runner(settings, db)
    threading.Thread(target=runner.warm_up, name="model-warm-up", daemon=True).start()
    register_analysis(app_, runner)
    code = run_worker(
        app_, settings.celery_queue, settings.workers, f"strokegate@{HOST}.{os.getpid()}", settings.log_level,
        on_ready=lambda: console.print(f"StrokeGate worker ready: {settings.workers} analyses at once from queue "
                                       f"{settings.celery_queue!r} on {shown_url(settings.broker_url)}", soft_wrap=True),
    )
    db.dispose()
    raise typer.Exit(code)


@db_app.command("upgrade")
def db_upgrade(
    config: ConfigOption = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL.")] = None,
) -> None:
    """Create or migrate the database schema to the latest version."""
    settings = _settings(config, database_url=database_url)
    _database(settings.database_url).dispose()
    console.print("database schema is up to date")


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Option(help="Who or what holds it, e.g. grafana, prometheus, jane.doe.")],
    role: Annotated[str, typer.Option(help="reader (reads /api and /metrics) or operator (also re-runs studies, retries deliveries).")],
    config: ConfigOption = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL.")] = None,
) -> None:
    """Create a token and print it once on stdout (only its hash is stored)."""
    from service.store import tokens

    if role not in {r.value for r in tokens.Role}:
        raise fail(f"--role must be reader or operator, not {role!r}", 2)
    settings = _settings(config, database_url=database_url)
    db = _database(settings.database_url)
    try:
        token = tokens.create(db, name, tokens.Role(role))
    except ValueError as error:
        raise fail(str(error), 2) from None
    finally:
        db.dispose()
    typer.echo(token)
    typer.echo(f"token {name!r} ({role}) created; it is shown only this once: send it as 'Authorization: Bearer <token>'", err=True)


@token_app.command("list")
def token_list(
    config: ConfigOption = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL.")] = None,
) -> None:
    """The tokens' names, roles and dates (never the tokens)."""
    from service.store import tokens

    settings = _settings(config, database_url=database_url)
    db = _database(settings.database_url)
    table = Table("name", "role", "created (UTC)", "revoked (UTC)")
    for record in tokens.listing(db):
        revoked = record.revoked_at.isoformat(timespec="seconds") if record.revoked_at else ""
        table.add_row(record.name, record.role.value, record.created_at.isoformat(timespec="seconds"), revoked)
    db.dispose()
    console.print(table)


@token_app.command("revoke")
def token_revoke(
    name: Annotated[str, typer.Argument(help="The token's name.")],
    config: ConfigOption = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL.")] = None,
) -> None:
    """Revoke a token: refused from the next request on."""
    from service.store import tokens

    settings = _settings(config, database_url=database_url)
    db = _database(settings.database_url)
    revoked = tokens.revoke(db, name)
    db.dispose()
    if not revoked:
        raise fail(f"no active token named {name!r} (strokegate token list shows them)")
    console.print(f"token {name!r} revoked")


@app.command("log-tag")
def log_tag(
    uid: Annotated[str, typer.Argument(help="A study, series or SOP instance UID.")],
    config: ConfigOption = None,
    spool_dir: Annotated[Path | None, typer.Option(help="The service's spool folder (it keeps the tag key).")] = None,
) -> None:
    """Print the tag that stands for UID in this installation's logs, to find its lines (grep)."""
    from service.ops.logging import TAG_KEY_FILE, uid_tag

    settings = _settings(config, spool_dir=spool_dir)
    key_file = settings.spool_dir / TAG_KEY_FILE
    if settings.log_tag_key:
        key = settings.log_tag_key.encode()
    elif key_file.is_file():
        key = key_file.read_text().strip().encode()
    else:
        raise fail(f"no tag key in {key_file}: give the service's --spool-dir (or its --config)")
    typer.echo(uid_tag(uid.strip(), key))


@app.command()
def process(
    input_dir: Annotated[Path, typer.Argument(help="Folder of DICOM files (any depth).", exists=True, file_okay=False)],
    out: Annotated[Path, typer.Option("--out", help="Folder for result objects and findings.json.")],
    nihss: Annotated[int | None, typer.Option("--nihss", min=0, max=42, help="The patient's NIHSS (0-42), for the "
                                              "learned models that take it, and named in the results.")] = None,
    config: ConfigOption = None,
    nihss_assessed: Annotated[datetime | None, typer.Option(
        help="When the NIHSS was assessed, UTC, e.g. 2026-12-04T10:15:00 (default: now).")] = None,
) -> None:
    """Analyse a folder offline and write every result object as .dcm plus findings.json."""
    from service.analysis.offline import process_folder
    from service.errors import InputError
    from service.findings import NihssSource, NihssUsed

    if nihss_assessed is not None and nihss is None:
        raise typer.BadParameter("give the NIHSS too (--nihss)", param_hint="--nihss-assessed")
    settings = _settings(config)
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    given = None if nihss is None else NihssUsed(nihss, NihssSource.DICOM_CLI, "strokegate process --nihss",
                                                 nihss_assessed or now, now)
    try:
        written = process_folder(input_dir, out, settings, nihss=given)
    except InputError as error:
        console.print(f"[red]cannot analyse {input_dir}:[/red] {error}", soft_wrap=True)
        raise typer.Exit(1) from error
    for path in written:
        console.print(f"wrote {path}")


@app.command()
def demo(
    seed: Annotated[int, typer.Option(help="Synthetic patient seed.")] = 2,
    keep: Annotated[Path | None, typer.Option(help="Keep the demo's files in this folder instead of a temporary one.")] = None,
) -> None:
    """End to end on this machine: a synthetic MRI stroke patient sent over DICOM to StrokeGate,
    analysed, and the SEG and SR received by a stand-in PACS."""
    from service.demo import run_demo

    raise typer.Exit(run_demo(seed, keep, console))


@app.command()
def phantom(
    out: Annotated[Path, typer.Option(help="Output folder (created if missing).")],
    kind: Annotated[str, typer.Option(help="ctp | mri | maps | all")] = "all",
    seed: Annotated[int, typer.Option(help="Seed of the (first) patient.")] = 0,
    count: Annotated[int, typer.Option(help="Number of patients (cohort mode: seeds seed..seed+count-1).")] = 1,
    isles: Annotated[bool, typer.Option(help="Also write ISLES-style NIfTI folders under OUT/isles.")] = False,
    noise_hu: Annotated[float | None, typer.Option(help="CT quantum noise sigma in HU (default: drawn 5-20).")] = None,
    motion_mm: Annotated[float, typer.Option(help="Rigid head motion between CT frames, up to this many mm.")] = 0.0,
    truncated_bolus: Annotated[bool, typer.Option(help="Late bolus and short CT scan: curves never return to baseline.")] = False,
    residue: Annotated[str, typer.Option(help="Residue function: exponential | boxcar.")] = "exponential",
    ct_matrix: Annotated[int, typer.Option(help="CT matrix size (256 or 512 typical).")] = 256,
    ct_slices: Annotated[int, typer.Option(help="CT perfusion slices (5 mm).")] = 16,
    ct_frames: Annotated[int, typer.Option(help="CT perfusion time points.")] = 40,
    montage: Annotated[bool, typer.Option(help="Also draw OUT/<patient>/montage.png of the truth.")] = False,
) -> None:
    """Write synthetic stroke patients (DICOM + ground truth) with known truth."""
    from service.phantom.generate import KINDS, write_cohort
    from service.phantom.montage import render_montage
    from service.phantom.haemodynamics import RESIDUES
    from service.phantom.patient import PhantomOptions

    if kind not in KINDS:
        raise typer.BadParameter(f"must be one of {', '.join(KINDS)}", param_hint="--kind")
    if residue not in RESIDUES:
        raise typer.BadParameter(f"must be one of {', '.join(RESIDUES)}", param_hint="--residue")
    if count < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--count")
    for name, value, low in (("--ct-matrix", ct_matrix, 32), ("--ct-slices", ct_slices, 1), ("--ct-frames", ct_frames, 2)):
        if value < low:
            raise typer.BadParameter(f"must be at least {low}", param_hint=name)
    if noise_hu is not None and noise_hu < 0:
        raise typer.BadParameter("must not be negative", param_hint="--noise-hu")
    options = PhantomOptions(
        ct_matrix=ct_matrix, ct_slices=ct_slices, ct_frames=ct_frames, noise_hu=noise_hu,
        motion_mm=motion_mm, truncated_bolus=truncated_bolus, residue=residue,
    )
    table = Table("patient", "seconds", "core mL", "hypoperfused mL", "NIHSS", "mRS", title=f"synthetic patients in {out}")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("generating patients", total=count)

        def done(summary: dict) -> None:
            c = summary["clinical"]
            table.add_row(summary["patient_id"], f"{summary['seconds']:.1f}", f"{c['core_ml']:.1f}", f"{c['hypoperfused_ml']:.1f}", str(c["nihss"]), str(c["mrs_90d"]))
            if montage:
                folder = out / summary["patient_id"]
                render_montage(folder, folder / "montage.png", "mr" if kind == "mri" else "ct")
            progress.advance(task)

        record = write_cohort(seed, count, kind, out, options, out / "isles" if isles else None, on_patient=done)
    console.print(table)
    auc = record["best_auc_mrs_3_6"]
    if auc == auc:  # not NaN: both outcome classes present
        console.print(f"best achievable AUC for mRS 3-6 (true outcome model) on this cohort: {auc:.3f}")
        console.print(f"admission ceiling (reperfusion and sICH integrated out): {record['admission_ceiling_auc_mrs_3_6']:.3f}")
    else:
        console.print("best achievable AUC for mRS 3-6: undefined (only one outcome class in this cohort)")


@app.command()
def models(
    config: ConfigOption = None,
    models_dir: Annotated[Path | None, typer.Option(help="Folder of model files and cards (default: the shipped models).")] = None,
) -> None:
    """List the shipped models and their cards, the inference backends available here, and check
    each model on each backend against its bundled test input (parity)."""
    from service.errors import ModelError
    from service.inference.card import card_path, read_card
    from service.inference.engine import available_backends, load_engine, shipped_models
    from service.inference.parity import bundled_parity

    settings = _settings(config, models_dir=models_dir)
    backends = available_backends()
    table = Table("backend", "here", "why", title="inference backends")
    for state in backends:
        table.add_row(state.backend.value, "yes" if state.available else "no", state.reason)
    console.print(table)
    found = shipped_models(settings.models_dir)
    if not found:
        console.print(f"[red]no model files with cards in {settings.models_dir}[/red]", soft_wrap=True)
        raise typer.Exit(1)
    failed = False
    for path in found:
        try:
            card = read_card(card_path(path))
        except ModelError as error:
            console.print(f"[red]refused:[/red] {error}", soft_wrap=True)
            failed = True
            continue
        t = card.training
        console.print(f"\n[bold]{card.name} {card.version}[/bold] ({path.name}, {card.files.onnx.bytes / 1e6:.1f} MB): {card.task}")
        console.print(f"  {card.intended_use}")
        console.print(f"  inputs: {', '.join(f'{c.name} ({c.unit})' for c in card.inputs.channels)}; clinical: {', '.join(card.inputs.clinical)}")
        console.print(f"  pixels {card.inputs.in_plane_spacing_mm.low:g}-{card.inputs.in_plane_spacing_mm.high:g} mm, slices "
                      f"{card.inputs.slice_spacing_mm.low:g}-{card.inputs.slice_spacing_mm.high:g} mm; classes: {', '.join(card.outputs.classes)}")
        console.print(f"  trained on families {', '.join(t.families)} (held out: {t.held_out_family or 'none'}), patients {t.counts}, "
                      f"noise {', '.join(f'{n:g}' for n in t.noise_hu) or '-'} HU, {t.duration_s / 60:.0f} min: {t.command}")
        # CT models: the rows at 10 HU; MRI models (no noise levels on the card): every row
        rows = [m for m in card.metrics if (m.noise_hu == 10.0 or not t.noise_hu) and m.method in ("model", "model with measured core", "threshold", "mismatch")]
        if rows:
            metrics = Table("split", "family", "class", "method", "patients", "Dice", "HD95 mm", "|dV| mL",
                            title="at 10 HU (medians)" if t.noise_hu else "medians")
            for m in rows:
                metrics.add_row(m.split, m.family, m.cls, m.method, str(m.patients), f"{m.dice:.2f}",
                                "-" if m.hd95_mm is None else f"{m.hd95_mm:.1f}", f"{m.volume_difference_ml:.1f}")
            console.print(metrics)
        for state in backends:
            if not state.available:
                continue
            try:
                engine = load_engine(path, state.backend, cache_dir=settings.engine_cache_dir)
                result = bundled_parity(engine, path.parent)
                engine.close()
            except ModelError as error:
                console.print(f"  parity on {state.backend.value}: [red]refused[/red]: {error}")
                failed = True
                continue
            verdict = "[green]holds[/green]" if result.holds else "[red]FAILS[/red]"
            console.print(f"  parity on {engine.identity.backend}: largest probability difference "
                          f"{result.max_difference:.1e} (tolerance {result.tolerance:g}) {verdict}")
            failed |= not result.holds
    if failed:
        raise typer.Exit(1)
