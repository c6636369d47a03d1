"""Running the real service in tests: `strokegate serve` as a process, dcmtk storescp as the PACS.

Every server binds 127.0.0.1 on a free port chosen at run time and is always stopped; every wait
is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dicom_tools import free_port
from service.store import tokens
from service.store.database import Database

STROKEGATE = Path(sys.executable).parent / "strokegate"
POSTGRES = "postgresql://postgres@127.0.0.1:5432"


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def stop_process(process: subprocess.Popen | None, grace_s: float) -> None:
    """SIGTERM a process still running, and SIGKILL it if it has not ended within ``grace_s``."""
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


class StoreSCP:
    """dcmtk storescp standing in for the PACS; one file per received instance."""

    def __init__(self, folder: Path, port: int | None = None, ae_title: str = "PACS", extra_args: tuple[str, ...] = ()) -> None:
        """``extra_args``: e.g. ``("+uf",)`` for a new file per received object, so that a duplicate
        shows as a second file; ``("--sleep-after", "1")`` for a slow PACS."""
        self.folder = folder
        self.port = port or free_port()
        self.ae_title = ae_title
        self.extra_args = extra_args
        self.process: subprocess.Popen | None = None
        self.log = folder.parent / f"storescp-{self.port}.log"

    @property
    def address(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def start(self) -> StoreSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                ["storescp", "-aet", self.ae_title, "-od", str(self.folder), "+B", *self.extra_args, str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TCP_NODELAY": "1"},
            )
        wait_for(lambda: _port_open(self.port), 10, "storescp to listen")
        return self

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def stop(self) -> None:
        stop_process(self.process, grace_s=10)


class QueryRetrieveSCP:
    """dcmtk dcmqrscp standing in for a PACS that answers C-FIND: it keeps one file per SOP Instance
    UID (a second store replaces the first), so what arrived is counted from its log, one entry per
    C-STORE request on the wire."""

    def __init__(self, folder: Path, ae_title: str = "PACS") -> None:
        self.folder = folder
        self.port = free_port()
        self.ae_title = ae_title
        self.process: subprocess.Popen | None = None
        self.log = folder.parent / f"dcmqrscp-{self.port}.log"
        self.config = folder.parent / f"dcmqrscp-{self.port}.cfg"

    @property
    def address(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def start(self) -> QueryRetrieveSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            f"NetworkTCPPort = {self.port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n"
            "HostTable BEGIN\nHostTable END\nVendorTable BEGIN\nVendorTable END\n"
            f"AETable BEGIN\n{self.ae_title} {self.folder} RW (10000, 1024mb) ANY\nAETable END\n"
        )
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(["dcmqrscp", "-v", "-c", str(self.config), str(self.port)],
                                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TCP_NODELAY": "1"})
        wait_for(lambda: _port_open(self.port), 10, "dcmqrscp to listen")
        return self

    def stores(self) -> list[str]:
        """The SOP Instance UID of every C-STORE request received, in order, duplicates included."""
        uids, in_store = [], False
        for line in self.log.read_text(errors="replace").splitlines():
            if "Message Type" in line:
                in_store = line.rstrip().endswith("C-STORE RQ")
            elif in_store and "Affected SOP Instance UID" in line:
                uids.append(line.partition(":")[2].partition(":")[2].strip())
                in_store = False
        return uids

    def stop(self) -> None:
        stop_process(self.process, grace_s=10)


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Service:
    """`strokegate serve` in its own process, with its folders under ``root``. Once it is ready,
    ``token`` holds an operator token for the API (``get`` sends it); ``https_ca``: the API is
    HTTPS, its certificate issued by this CA."""

    def __init__(self, root: Path, database_url: str, destinations: list[str], env: dict[str, str] | None = None,
                 https_ca: Path | None = None) -> None:
        self.root = root
        self.token: str | None = None
        self.tls = ssl.create_default_context(cafile=https_ca) if https_ca else None
        self.database_url = database_url
        self.destinations = destinations
        self.port = free_port()
        self.http_port = free_port()
        self.env = {
            "STROKEGATE_SERIES_IDLE_S": "1.5",
            "STROKEGATE_MIN_FREE_BYTES": "0",
            "STROKEGATE_DELIVERY_BACKOFF_S": "0.5",
            "STROKEGATE_DELIVERY_BACKOFF_MAX_S": "2",
            **(env or {}),
        }
        self.process: subprocess.Popen | None = None
        self.log = root / "service.log"
        self.starts = 0

    def start(self, ready: bool = True) -> Service:
        """Start and wait until ``/readyz`` says ready (``ready=False``: until it answers at all,
        for a service that is meant to start not ready, e.g. on a full disk)."""
        self.root.mkdir(parents=True, exist_ok=True)
        command = [
            str(STROKEGATE), "serve", "--host", "127.0.0.1", "--port", str(self.port), "--ae-title", "STROKEGATE",
            "--database-url", self.database_url, "--spool-dir", str(self.root / "spool"),
            "--results-dir", str(self.root / "results"), "--http-port", str(self.http_port),
        ]
        for destination in self.destinations:
            command += ["--destination", destination]
        with open(self.log, "ab") as log:
            log.write(f"--- start {self.starts}\n".encode())
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env})
        self.starts += 1
        try:
            wait_for(lambda: self._ready(ready), 60, f"the service to be {'ready' if ready else 'up'} (log: {self.log})")
        except BaseException:
            self.stop()  # a test that fails here has no handle on the process to stop
            raise
        if self.token is None:
            self.token = self.create_token("harness", tokens.Role.OPERATOR)
        return self

    def create_token(self, name: str, role: tokens.Role) -> str:
        """A new API token in the service's database (as `strokegate token create` makes one)."""
        db = Database(self.database_url)
        try:
            return tokens.create(db, name, role)
        finally:
            db.dispose()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.http_port}"

    def request(self, path: str, token: str | None = None, method: str = "GET") -> tuple[int, bytes]:
        """Status and body of one HTTP request, with ``token`` as bearer token (None: none)."""
        request = urllib.request.Request(self.url + path, method=method,
                                         headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(request, timeout=10, context=self.tls) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def _ready(self, ready: bool = True) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"service exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            status = self.get("/readyz", status=503)["status"]
        except (urllib.error.URLError, ConnectionError, OSError):
            return False
        return status == "ready" or not ready

    def ready(self) -> bool:
        """Whether ``/readyz`` says ready now."""
        return self.get("/readyz", status=503)["status"] == "ready"

    def get(self, path: str, missing: Any = ..., status: int | None = None) -> Any:
        """GET from the HTTP API; ``missing`` is returned for a 404 where given (e.g. a study not yet
        recorded: instances are filed and recorded just after the sender's transfer); an answer with
        the error ``status`` is returned like a success (e.g. 503 from ``/readyz``)."""
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {self.token}"} if self.token else {})
        try:
            with urllib.request.urlopen(request, timeout=10, context=self.tls) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            if error.code == 404 and missing is not ...:
                return missing
            if error.code != status:
                raise
            body = error.read()
        return json.loads(body) if path != "/metrics" else body.decode()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include ``labels``."""
        total = 0.0
        for line in self.get("/metrics").splitlines():
            if not line.startswith(name) or line.startswith("#"):
                continue
            sample, value = line.rsplit(" ", 1)
            sample_name = sample.split("{", 1)[0]
            if sample_name != name:
                continue
            if all(f'{k}="{v}"' in sample for k, v in labels.items()):
                total += float(value)
        return total

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, like a power cut of the process."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        stop_process(self.process, grace_s=30)


def postgres_available() -> bool:
    try:
        with psycopg.connect(f"{POSTGRES}/postgres", connect_timeout=3):
            return True
    except psycopg.Error:
        return False


class TemporaryPostgres:
    """A fresh PostgreSQL database, dropped afterwards."""

    def __init__(self) -> None:
        self.name = f"strokegate_test_{uuid.uuid4().hex[:10]}"

    def __enter__(self) -> str:
        if not postgres_available():
            pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
        with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{self.name}"')
        return f"{POSTGRES}/{self.name}"

    def __exit__(self, *exc: object) -> None:
        with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
