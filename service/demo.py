"""``strokegate demo``: the whole path on one machine, with a stand-in PACS.

A synthetic MRI stroke patient is generated, sent over C-STORE to a StrokeGate running on embedded
defaults (SQLite, temporary spool, CPU), analysed, and every result (SEG, SR, summary image,
colour map series and Parametric Maps) is received by a real storage SCP standing in for the PACS.
Prints the core volume against the ground truth, where the summary image is (and a PNG of it), and
the time of every stage. Everything stays in one folder (``--keep DIR``, else a new one in the
system's temporary folder), named at the start and at the end, so the paths it prints exist.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from matplotlib.image import imsave
from pydicom import dcmread
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import func, select

from service.config import Destination, Settings
from service.delivery.scu import send_files
from service.phantom.generate import write_patient
from service.phantom.truth_files import read_nifti
from service.server import StrokeGate
from service.store.models import Job, JobState, ResultObject

TIMEOUT_S = 300


class StandInPacs:
    """A storage SCP that keeps what it receives in a folder, like a PACS would."""

    def __init__(self, folder: Path, ae_title: str = "DEMOPACS") -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.received: list[Path] = []
        self._ae = AE(ae_title=ae_title)
        self._ae.supported_contexts = AllStoragePresentationContexts
        self._ae.add_supported_context(Verification)
        self._server = None

    def start(self) -> int:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._server = self._ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return self._server.server_address[1]

    def _store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        path = self.folder / f"{ds.Modality}_{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        self.received.append(path)
        return 0x0000

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()


def _send(paths: list[Path], port: int, called_ae: str, progress: Progress) -> None:
    """C-STORE the study as a scanner would, a series' worth of instances per association."""
    task = progress.add_task("sending the study over C-STORE", total=len(paths))
    destination = Destination(ae_title=called_ae, host="127.0.0.1", port=port)
    for start in range(0, len(paths), 100):
        outcomes = send_files(destination, paths[start : start + 100], "DEMOSCANNER")
        failed = [o for o in outcomes if not o.delivered]
        if failed:
            raise RuntimeError(f"StrokeGate did not store {failed[0].path.name}: {failed[0].error}")
        progress.advance(task, len(outcomes))


def run_demo(seed: int, keep: Path | None, console: Console) -> int:
    """Run the demo in ``keep`` (else a new temporary folder, kept); returns the exit code (0 when
    every result object of the study arrived at the stand-in PACS)."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        root = keep
    else:
        root = Path(tempfile.mkdtemp(prefix="strokegate-demo-"))
    console.print(f"the demo's files go to {root}", soft_wrap=True)
    code = _run(seed, root, console)
    console.print(f"everything the demo made is in {root}" + ("" if keep else " (delete it when done)"), soft_wrap=True)
    return code


def _run(seed: int, root: Path, console: Console) -> int:
    console.print("[bold]StrokeGate demo[/bold] - synthetic patient, research use only, not for diagnosis")
    times: dict[str, float] = {}
    pacs = StandInPacs(root / "pacs")
    pacs_port = pacs.start()
    settings = Settings(
        host="127.0.0.1", port=0, http_host="127.0.0.1", http_port=0,
        database_url=f"sqlite:///{root / 'strokegate.db'}", spool_dir=root / "spool", results_dir=root / "results",
        destinations=[Destination(ae_title=pacs.ae_title, host="127.0.0.1", port=pacs_port)],
        series_idle_s=2.0, min_free_bytes=0,
    )
    gate = StrokeGate(settings)
    gate.start()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console) as progress:
            task = progress.add_task(f"generating synthetic MRI patient (seed {seed})", total=1)
            started = time.perf_counter()
            write_patient(seed, "mri", root / "phantom")
            times["generate patient"] = time.perf_counter() - started
            progress.advance(task)
            patient = root / "phantom" / f"SGPH{seed:08d}"
            paths = sorted((patient / "dicom" / "MR").rglob("*.dcm"))
            started = time.perf_counter()
            _send(paths, gate.dicom_port, settings.ae_title, progress)
            times["send study (C-STORE)"] = time.perf_counter() - started
            sent_at = time.perf_counter()
            task = progress.add_task("waiting for the results at the stand-in PACS", total=None)
            deadline = time.monotonic() + TIMEOUT_S
            expected = None
            while time.monotonic() < deadline:
                failed = _failed_job(gate)
                if failed:
                    console.print(f"[red]analysis failed:[/red] {failed}")
                    return 1
                expected = _result_count(gate)
                progress.update(task, total=expected, completed=len(pacs.received))
                if expected and len(pacs.received) >= expected:
                    break
                time.sleep(0.2)
            times["last instance to results at PACS"] = time.perf_counter() - sent_at
        if not expected or len(pacs.received) < expected:
            console.print(f"[red]results did not arrive within {TIMEOUT_S} s[/red]")
            return 1
        with gate.db.session() as session:
            job = session.scalars(select(Job).where(Job.state == JobState.DONE).order_by(Job.id.desc())).first()
            findings = dict(job.findings)
        _report(console, findings, patient, pacs, times, settings)
        return 0
    finally:
        gate.stop()
        pacs.stop()


def _result_count(gate: StrokeGate) -> int | None:
    """How many objects the finished analysis made (None while it runs)."""
    with gate.db.session() as session:
        job = session.scalars(select(Job).where(Job.state == JobState.DONE).order_by(Job.id.desc())).first()
        if job is None:
            return None
        return session.scalar(select(func.count()).select_from(ResultObject).where(ResultObject.job_id == job.id))


def _failed_job(gate: StrokeGate) -> str | None:
    with gate.db.session() as session:
        job = session.scalars(select(Job).where(Job.state == JobState.FAILED)).first()
        return job.error if job else None


def _report(console: Console, findings: dict, patient: Path, pacs: StandInPacs, times: dict[str, float], settings: Settings) -> None:
    core, affine = read_nifti(patient / "truth" / "mr" / "core.nii.gz")
    truth_ml = float(core.sum()) * abs(np.linalg.det(affine[:3, :3])) / 1000
    measured = findings["measurements"]["core_volume_ml"]
    table = Table("", "value", title="Result")
    table.add_row("ischaemic core (ADC < %g e-6 mm2/s)" % settings.adc_core_threshold, f"{measured:.1f} mL")
    table.add_row("ground truth core", f"{truth_ml:.1f} mL")
    error = measured - truth_ml
    table.add_row("difference", f"{error:+.1f} mL ({100 * error / truth_ml:+.1f} %)" if truth_ml else f"{error:+.1f} mL")
    summary_line = ""
    series: dict[str, list[Path]] = {}
    modality: dict[str, str] = {}
    for path in pacs.received:
        ds = dcmread(path, stop_before_pixels=True)
        series.setdefault(str(ds.SeriesDescription), []).append(path)
        modality[str(ds.SeriesDescription)] = str(ds.Modality)
    for description, paths in sorted(series.items()):
        where = str(paths[0]) if len(paths) == 1 else f"{len(paths)} images in {paths[0].parent}"
        table.add_row(f"received by PACS: {modality[description]}", f"{description} -> {where}")
        if description.startswith("StrokeGate summary"):
            summary_png = paths[0].with_suffix(".png")
            imsave(summary_png, dcmread(paths[0]).pixel_array)
            summary_line = f"summary image: {paths[0]}\n  as PNG: {summary_png}"
    console.print(table)
    if summary_line:
        console.print(summary_line, soft_wrap=True)
    stages = Table("stage", "seconds", title="Timing")
    for name, seconds in times.items():
        stages.add_row(name, f"{seconds:.2f}")
    for name, seconds in findings.get("timings_s", {}).items():
        stages.add_row(f"  analysis: {name}", f"{seconds:.2f}")
    console.print(stages)
