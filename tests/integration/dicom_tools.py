"""Helpers that drive real DICOM tools (Orthanc, dcmtk, dicom3tools) from tests.

Importable as ``dicom_tools`` from any test (tests/integration/conftest.py puts
this directory on ``sys.path``). Nothing here needs the ``service`` package.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
ORTHANC_CONFIG = REPO_ROOT / "deploy" / "orthanc" / "orthanc.json"
LOCALHOST = "127.0.0.1"


def find_orthanc() -> str | None:
    """Path of the Orthanc executable (/usr/sbin/Orthanc or on PATH), or None."""
    if os.access("/usr/sbin/Orthanc", os.X_OK):
        return "/usr/sbin/Orthanc"
    return shutil.which("Orthanc")


requires_orthanc = pytest.mark.skipif(
    find_orthanc() is None, reason="Orthanc not installed (apt-get install orthanc)"
)
requires_storescu = pytest.mark.skipif(
    shutil.which("storescu") is None, reason="dcmtk storescu not installed (apt-get install dcmtk)"
)
requires_dciodvfy = pytest.mark.skipif(
    shutil.which("dciodvfy") is None,
    reason="dciodvfy not installed (apt-get install dicom3tools)",
)


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------
# JSON with comments (Orthanc's configuration dialect)
# --------------------------------------------------------------------------


def strip_json_comments(text: str) -> str:
    """Remove ``// ...`` and ``/* ... */`` comments outside JSON strings."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':  # copy a string literal verbatim, honouring escapes
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
        elif text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end == -1 else end  # keep the newline
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end == -1:
                raise ValueError("unterminated /* comment")
            i = end + 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def load_orthanc_config(path: Path = ORTHANC_CONFIG) -> dict[str, Any]:
    """Parse an Orthanc configuration file (JSON with comments)."""
    return json.loads(strip_json_comments(path.read_text(encoding="utf-8")))


# --------------------------------------------------------------------------
# Orthanc
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class OrthancServer:
    """A running Orthanc: REST base URL, DICOM port/AE title and its log file."""

    rest_url: str
    dicom_port: int
    aet: str
    log_path: Path

    def get(self, path: str, timeout: float = 10.0) -> Any:
        """GET ``rest_url + path`` and return the parsed JSON body."""
        url = self.rest_url.rstrip("/") + "/" + path.lstrip("/")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            body = exc.read().decode("utf-8", "replace")
            raise AssertionError(f"GET {url} -> HTTP {exc.code}: {body}") from exc

    def log_text(self) -> str:
        """Everything Orthanc has written to stdout/stderr so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((LOCALHOST, port), timeout=0.5):
        return True
    return False


def _wait_ready(proc: subprocess.Popen, rest_url: str, dicom_port: int, timeout: float) -> bool:
    """Poll until /system answers and the DICOM port accepts; False if Orthanc died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError, ValueError):
            with urllib.request.urlopen(rest_url + "/system", timeout=1) as resp:
                if resp.status == 200 and _port_open(dicom_port):
                    return True
        time.sleep(0.05)
    return False


def _stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Orthanc 1.10 needs ~3.5 s."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@contextlib.contextmanager
def run_orthanc(
    workdir: Path,
    *,
    overrides: dict[str, Any] | None = None,
    startup_timeout: float = 30.0,
    attempts: int = 3,
) -> Iterator[OrthancServer]:
    """Start Orthanc in ``workdir`` from deploy/orthanc/orthanc.json and stop it on exit.

    HTTP and DICOM ports are chosen at run time; storage goes to
    ``workdir/storage``; stdout/stderr go to ``workdir/orthanc.log``.
    ``overrides`` are merged over the configuration. Orthanc runs with
    TCP_NODELAY=1 (else each C-STORE waits ~45 ms on delayed ACKs). Orthanc 1.10 cannot be
    bound to one interface (it listens on 0.0.0.0); RemoteAccessAllowed=false
    keeps its REST API answering only to localhost. Raises RuntimeError, with
    the log, if Orthanc does not come up (after ``attempts`` tries, to survive
    a port being grabbed between free_port() and Orthanc's bind()).
    """
    exe = find_orthanc()
    if exe is None:
        raise FileNotFoundError("Orthanc executable not found")
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "orthanc.log"
    config_path = workdir / "orthanc.json"
    storage = workdir / "storage"

    for attempt in range(1, attempts + 1):
        config = load_orthanc_config()
        config.update(
            HttpPort=free_port(),
            DicomPort=free_port(),
            StorageDirectory=str(storage),
            IndexDirectory=str(storage),
            Plugins=[],
            RemoteAccessAllowed=False,
        )
        config.update(overrides or {})
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        server = OrthancServer(
            rest_url=f"http://{LOCALHOST}:{config['HttpPort']}",
            dicom_port=config["DicomPort"],
            aet=config.get("DicomAet", "ORTHANC"),
            log_path=log_path,
        )
        with log_path.open("ab") as log:
            log.write(f"--- attempt {attempt}: {exe} {config_path}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                [exe, str(config_path)],
                cwd=workdir,
                # dcmtk in Orthanc leaves Nagle on unless TCP_NODELAY=1: ~45 ms per C-STORE.
                env={**os.environ, "TCP_NODELAY": "1"},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            ready = _wait_ready(proc, server.rest_url, server.dicom_port, startup_timeout)
            died = proc.poll() is not None
            if ready:
                yield server
                return
        finally:
            _stop(proc)
        if not died:
            break  # hung rather than exited: retrying would not help
    raise RuntimeError(
        f"Orthanc did not start (config {config_path}); log {log_path}:\n{server.log_text()}"
    )


# --------------------------------------------------------------------------
# dcmtk storescu
# --------------------------------------------------------------------------


def storescu(
    files_or_dir: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    port: int,
    called_aet: str,
    calling_aet: str = "STOREGATE_TEST",
    *,
    host: str = LOCALHOST,
    timeout: float = 60.0,
    extra_args: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Send files (or directories, recursively) with dcmtk ``storescu``.

    Runs with TCP_NODELAY=1 and network timeouts; returns the CompletedProcess.
    Raises AssertionError with stdout/stderr if storescu exits non-zero.
    """
    if isinstance(files_or_dir, (str, os.PathLike)):
        files_or_dir = [files_or_dir]
    paths = [str(p) for p in files_or_dir]
    net_timeout = str(max(1, int(timeout // 2)))
    cmd = ["storescu", "-aet", calling_aet, "-aec", called_aet,
           "-to", net_timeout, "-ta", net_timeout, "-td", net_timeout]
    if any(os.path.isdir(p) for p in paths):
        cmd += ["+sd", "+r"]
    cmd += [*extra_args, host, str(port), *paths]
    proc = subprocess.run(
        cmd,
        env={**os.environ, "TCP_NODELAY": "1"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"storescu exited {proc.returncode}: {' '.join(cmd)}\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc


# --------------------------------------------------------------------------
# dicom3tools dciodvfy
# --------------------------------------------------------------------------


def dciodvfy(path: str | os.PathLike[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``dciodvfy`` on one file. It reports on stderr, one finding per line.

    Exit status is 0 when there is no error, 1 otherwise. A valid image prints
    its IOD name (e.g. ``CTImage``) and possibly ``Warning - ...`` lines.
    """
    if not Path(path).is_file():  # dciodvfy without a readable file reads stdin
        raise FileNotFoundError(path)
    return subprocess.run(
        ["dciodvfy", str(path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def dciodvfy_errors(path: str | os.PathLike[str]) -> list[str]:
    """The error lines (``Error - ...``, ``Abort - ...``) dciodvfy reports for ``path``."""
    proc = dciodvfy(path)
    lines = (proc.stderr + proc.stdout).splitlines()
    return [ln.strip() for ln in lines if ln.lstrip().startswith(("Error", "Abort"))]


def dciodvfy_warnings(path: str | os.PathLike[str]) -> list[str]:
    """The ``Warning - ...`` lines dciodvfy reports for ``path``."""
    proc = dciodvfy(path)
    lines = (proc.stderr + proc.stdout).splitlines()
    return [ln.strip() for ln in lines if ln.lstrip().startswith("Warning")]
