"""Helpers for running StrokeGate scaled out on Celery in tests and benchmarks: many small distinct
studies from one phantom patient, `strokegate worker` processes, and a RabbitMQ queue of one's own."""

from __future__ import annotations

import os
import socket
import subprocess
import urllib.request
import uuid
from pathlib import Path

import pydicom
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid

from service_harness import STROKEGATE, stop_process, wait_for

BROKER = "amqp://guest:guest@127.0.0.1:5672//"


def rabbitmq_available() -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", 5672)) == 0


def distinct_studies(source: Path, out: Path, count: int) -> list[Path]:
    """``count`` copies of the series in ``source`` (a folder of DICOM files), each a study of its
    own: new Study, Series and SOP Instance UIDs and its own patient. One folder per study."""
    folders = []
    files = sorted(source.glob("*.dcm"))
    for n in range(count):
        folder = out / f"study{n:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        study_uid = generate_uid()
        series_uids: dict[str, str] = {}
        for path in files:
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uids.setdefault(ds.SeriesInstanceUID, generate_uid())
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.PatientID = f"SGSCALE{n:02d}"
            ds.AccessionNumber = f"SCALE{n:02d}"
            ds.save_as(folder / path.name)
        folders.append(folder)
    return folders


def queue_name() -> str:
    """A RabbitMQ queue for one run, so that runs (and other users of the broker) never mix."""
    return f"strokegate-test-{uuid.uuid4().hex[:10]}"


def delete_queue(name: str, broker_url: str = BROKER) -> None:
    from kombu import Connection

    with Connection(broker_url, connect_timeout=5) as connection:
        connection.default_channel.queue_delete(name)


class Worker:
    """`strokegate worker` in its own process, sharing ``root``'s spool and results with serve."""

    def __init__(self, root: Path, name: str, database_url: str, destinations: list[str], env: dict[str, str],
                 metrics_port: int = 0) -> None:
        """``metrics_port``: serve the worker's Prometheus metrics there (0: none)."""
        self.root = root
        self.log = root / f"{name}.log"
        self.metrics_port = metrics_port
        self.command = [
            str(STROKEGATE), "worker", "--database-url", database_url, "--spool-dir", str(root / "spool"),
            "--results-dir", str(root / "results"), *[arg for d in destinations for arg in ("--destination", d)],
            "--metrics-port", str(metrics_port),
        ]
        self.env = env
        self.process: subprocess.Popen | None = None

    def start(self) -> Worker:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env={**os.environ, **self.env})
        return self

    def wait_ready(self, timeout: float = 90) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            return "StrokeGate worker ready" in self.log.read_text()

        wait_for(ready, timeout, f"the worker to be ready (log: {self.log})", interval=0.5)

    def metric(self, name: str, labels: dict[str, str]) -> float:
        """The value of sample ``name`` with ``labels`` on the worker's /metrics (0 when absent)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                   if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL: the process ends at once, its job unfinished and its message unacknowledged."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        stop_process(self.process, grace_s=60)
