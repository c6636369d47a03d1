"""C-STORE throughput of `strokegate serve` against dcmtk storescp, same study, same run, loopback.

Both receivers get the same synthetic CT perfusion study (16 x 40 instances, 256x256) from dcmtk
storescu with TCP_NODELAY=1 (the peer at its best settings); each is timed `--runs` times and the
medians compared. StrokeGate runs on its embedded defaults (SQLite), once as shipped (each instance
fdatasync'd into the receive journal before Success) and once with `receive_sync: false` (journal
written before Success, synced within 10 ms). storescp never syncs. The runs alternate between the
receivers so that the machine's background load falls on all of them alike; every run starts
after os.sync(), and nothing is deleted until the end (freeing blocks mid-benchmark slowed whichever
receiver allocated new blocks next, i.e. storescp).

    .venv/bin/python benchmarks/ingest.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port}")


def send(folder: Path, port: int, ae: str) -> float:
    os.sync()  # every receiver starts with no earlier run's data still being written back
    started = time.perf_counter()
    subprocess.run(["storescu", "-aec", ae, "+sd", "127.0.0.1", str(port), str(folder)], env=ENV, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="strokegate-ingest-"))
    cli = Path(sys.executable).parent / "strokegate"
    try:
        subprocess.run([str(cli), "phantom", "--kind", "ctp", "--out", str(work / "study"), "--seed", "4242"],
                       check=True, stdout=subprocess.DEVNULL)
        folder = next((work / "study").glob("SGPH*")) / "dicom" / "CT" / "ctp"
        files = sorted(folder.glob("*.dcm"))
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        times: dict[str, list[float]] = {"storescp": [], "strokegate": [], "strokegate-async": []}
        filed: list[float] = []

        def strokegate(run: int, name: str, environment: dict[str, str]) -> None:
            gate_dir = work / f"{name}{run}"
            port, http = free_port(), free_port()
            gate = subprocess.Popen(
                [str(cli), "serve", "--host", "127.0.0.1", "--port", str(port), "--http-port", str(http),
                 "--database-url", f"sqlite:///{gate_dir / 'db.sqlite'}", "--spool-dir", str(gate_dir / "spool"),
                 "--results-dir", str(gate_dir / "results")],
                env={**ENV, "STROKEGATE_SERIES_IDLE_S": "600", **environment},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            try:
                wait_port(port)
                started = time.perf_counter()
                times[name].append(send(folder, port, "STROKEGATE"))
                deadline = time.monotonic() + 120
                while len(list((gate_dir / "spool").glob("*/*/*.dcm"))) < len(files) and time.monotonic() < deadline:
                    time.sleep(0.02)
                stored = len(list((gate_dir / "spool").glob("*/*/*.dcm")))
                if stored != len(files):
                    raise RuntimeError(f"strokegate spooled {stored} of {len(files)} instances")
                filed.append(time.perf_counter() - started)
                urllib.request.urlopen(f"http://127.0.0.1:{http}/healthz", timeout=5).read()
            finally:
                gate.terminate()
                gate.wait(30)

        port = free_port()
        out = work / "storescp"
        out.mkdir()
        peer = subprocess.Popen(["storescp", "-aet", "PEER", "-od", str(out), str(port)], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port)
            for run in range(args.runs):
                times["storescp"].append(send(folder, port, "PEER"))
                out.rename(work / f"storescp{run}")  # deleted at the end: freeing blocks mid-run slows the next writer
                out.mkdir()
                strokegate(run, "strokegate", {})
                strokegate(run, "strokegate-async", {"STROKEGATE_RECEIVE_SYNC": "false"})
        finally:
            peer.terminate()
            peer.wait()

        print(f"study: {len(files)} CT instances, {megabytes:.1f} MB, storescu with TCP_NODELAY=1, {args.runs} runs each")
        medians = {}
        for name, seconds in times.items():
            medians[name] = statistics.median(seconds)
            print(f"{name:16s}: median {medians[name]:.2f} s = {len(files) / medians[name]:7.1f} instances/s, "
                  f"{megabytes / medians[name]:6.1f} MB/s   (runs: {', '.join(f'{s:.2f}' for s in seconds)})")
        print(f"strokegate: every instance filed into the spool {statistics.median(filed):.2f} s after the send began (median)")
        print(f"ratio strokegate / storescp throughput: {medians['storescp'] / medians['strokegate']:.2f}x as shipped "
              f"(sync before each Success), {medians['storescp'] / medians['strokegate-async']:.2f}x with receive_sync "
              "false; target >= 0.8x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
