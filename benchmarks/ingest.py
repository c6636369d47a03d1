"""C-STORE throughput of `strokegate serve` against dcmtk storescp, same study, same run, loopback.

Every receiver gets the same synthetic CT perfusion study (16 x 40 instances, 256x256) from dcmtk
storescu with TCP_NODELAY=1 (the peer at its best settings); each is timed `--runs` times and the
medians compared. The study's NumberOfTemporalPositions and ImagesInAcquisition are removed, so that no
analysis starts during the benchmark (the study completes only after the idle time). StrokeGate
runs on its embedded defaults (SQLite), once as shipped (each instance
fdatasync'd into the receive journal before Success) and once with `receive_sync: false` (journal
written before Success, synced within 10 ms); storescp never syncs. All three receivers run for
the whole benchmark, as they would in a hospital: each gets one untimed study first (StrokeGate's
start-up and the preparation of its first journal segments are not what a PACS waits for), then
each run sends a copy of the study with new UIDs, so every run is new data. The runs alternate
between the receivers, storescp first in one run and last in the next, so that the machine's
background load falls on all of them alike; each run starts once the previous receiver is idle
(StrokeGate: its process used no CPU for 0.5 s) and after os.sync(), and nothing is deleted until the end
(freeing blocks mid-benchmark slowed whichever receiver allocated new blocks next).

Most senders do not set TCP_NODELAY (dcmtk's storescu by default): each run also sends another
copy with storescu as shipped to storescp and to both StrokeGates, which acknowledge each
read at once (TCP_QUICKACK) so that such a sender's held-back tail of each dataset is not stalled by
the delayed-acknowledgement timer; target: at least 5x faster to StrokeGate than to storescp.

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

from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pydicom.uid import generate_uid

ENV = {**os.environ, "TCP_NODELAY": "1"}
PLAIN_SENDER = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}  # storescu as shipped


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


def wait_ready(http_port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=2).read()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("strokegate did not become ready")


def send(folder: Path, port: int, ae: str, nodelay: bool = True) -> float:
    """Seconds storescu takes to send ``folder``; ``nodelay``: with TCP_NODELAY=1, else as shipped."""
    os.sync()  # every receiver starts with no earlier run's data still being written back
    started = time.perf_counter()
    subprocess.run(["storescu", "-aec", ae, "+sd", "127.0.0.1", str(port), str(folder)],
                   env=ENV if nodelay else PLAIN_SENDER, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def copy_with_new_uids(source: Path, target: Path) -> None:
    """The study in ``source`` as a new study: same pixels, new study, series and instance UIDs."""
    target.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    for path in sorted(source.glob("*.dcm")):
        dataset = dcmread(path)
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.save_as(target / path.name, enforce_file_format=True)


def without_completion_counts(folder: Path) -> None:
    """Remove the headers that let StrokeGate complete the study at its last image: this benchmark
    times receiving, and an analysis started mid-benchmark would compete for the CPU (with them
    gone the study completes only after series_idle_s, 600 s here)."""
    for path in folder.glob("*.dcm"):
        dataset = dcmread(path)
        for keyword in ("NumberOfTemporalPositions", "ImagesInAcquisition"):
            if keyword in dataset:
                delattr(dataset, keyword)
        dataset.save_as(path, enforce_file_format=True)


class Gate:
    """One `strokegate serve`, running for the whole benchmark."""

    def __init__(self, cli: Path, folder: Path, environment: dict[str, str]) -> None:
        self.folder = folder
        self.expected = 0  # instances sent so far, all new
        self.port, self.http = free_port(), free_port()
        self.process = subprocess.Popen(
            [str(cli), "serve", "--host", "127.0.0.1", "--port", str(self.port), "--http-port", str(self.http),
             "--database-url", f"sqlite:///{folder / 'db.sqlite'}", "--spool-dir", str(folder / "spool"),
             "--results-dir", str(folder / "results")],
            env={**ENV, "STROKEGATE_SERIES_IDLE_S": "600", "STROKEGATE_METRICS_AUTH": "false", **environment},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_ready(self.http)
        self.phases: dict[bool, list[tuple[float, float, float]]] = {True: [], False: []}
        """Per send, by TCP_NODELAY: (seconds, dataset s per instance, durable s per instance)."""

    def receive_seconds(self) -> tuple[float, float]:
        """The service's total seconds so far of waiting for datasets (command to last byte) and of
        journalling them (strokegate_receive_seconds)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.http}/metrics", timeout=10).read().decode()
        sums = {sample.labels["phase"]: sample.value for family in text_string_to_metric_families(text)
                for sample in family.samples if sample.name == "strokegate_receive_seconds_sum"}
        return sums.get("dataset", 0.0), sums.get("durable", 0.0)

    def send(self, study: Path, instances: int, nodelay: bool = True) -> tuple[float, float]:
        """Seconds for storescu to send ``study`` (``instances`` new ones), and until all of it was
        filed into the spool."""
        self.expected += instances
        expected_total = self.expected
        before = self.receive_seconds()
        seconds = send(study, self.port, "STROKEGATE", nodelay)
        after = self.receive_seconds()
        self.phases[nodelay].append((seconds, (after[0] - before[0]) / instances, (after[1] - before[1]) / instances))
        sent = time.perf_counter()
        deadline = time.monotonic() + 120
        while (stored := self.spooled()) < expected_total and time.monotonic() < deadline:
            time.sleep(0.02)
        if stored != expected_total:
            raise RuntimeError(f"strokegate spooled {stored} of {expected_total} instances")
        filed = seconds + time.perf_counter() - sent
        self.settle()
        return seconds, filed

    def settle(self, quiet_s: float = 0.5, timeout_s: float = 60) -> None:
        """Until the service has used no CPU for ``quiet_s``: recording the study in the database and
        syncing the spool come after filing, and must not fall into the next receiver's run."""
        stat = Path(f"/proc/{self.process.pid}/stat")
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            used = sum(int(v) for v in stat.read_text().rsplit(")", 1)[1].split()[11:13])  # utime + stime
            if used == last:
                return
            last = used
            time.sleep(quiet_s)

    def spooled(self) -> int:
        return len(list((self.folder / "spool").glob("*/*/*.dcm")))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="strokegate-ingest-"))
    cli = Path(sys.executable).parent / "strokegate"
    gates: dict[str, Gate] = {}
    peer: subprocess.Popen | None = None
    try:
        subprocess.run([str(cli), "phantom", "--kind", "ctp", "--out", str(work / "study"), "--seed", "4242"],
                       check=True, stdout=subprocess.DEVNULL)
        folder = next((work / "study").glob("SGPH*")) / "dicom" / "CT" / "ctp"
        without_completion_counts(folder)
        files = sorted(folder.glob("*.dcm"))
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        times: dict[str, list[float]] = {"storescp": [], "strokegate": [], "strokegate-async": []}
        plain: dict[str, list[float]] = {"storescp": [], "strokegate": [], "strokegate-async": []}  # no TCP_NODELAY
        filed: list[float] = []

        port = free_port()
        out = work / "storescp"
        out.mkdir()
        peer = subprocess.Popen(["storescp", "-aet", "PEER", "-od", str(out), str(port)], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port)
        gates["strokegate"] = Gate(cli, work / "strokegate", {})
        gates["strokegate-async"] = Gate(cli, work / "strokegate-async", {"STROKEGATE_RECEIVE_SYNC": "false"})
        send(folder, port, "PEER")  # untimed, like each service's first study
        for gate in gates.values():
            gate.send(folder, len(files))
        for run in range(args.runs):
            study = work / f"copy{run}"
            copy_with_new_uids(folder, study)
            order = ["storescp", *gates] if run % 2 == 0 else [*gates, "storescp"]
            for name in order:
                if name == "storescp":
                    times[name].append(send(study, port, "PEER"))
                    continue
                seconds, until_filed = gates[name].send(study, len(files))
                times[name].append(seconds)
                if name == "strokegate":
                    filed.append(until_filed)
            study = work / f"plain{run}"
            copy_with_new_uids(folder, study)
            for name in (["storescp", *gates] if run % 2 == 0 else [*gates, "storescp"]):
                if name == "storescp":
                    plain[name].append(send(study, port, "PEER", nodelay=False))
                else:
                    plain[name].append(gates[name].send(study, len(files), nodelay=False)[0])

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
        print(f"storescu as shipped (no TCP_NODELAY), {args.runs} runs each:")
        for name, seconds in plain.items():
            print(f"{name:16s}: median {statistics.median(seconds):.2f} s = "
                  f"{len(files) / statistics.median(seconds):7.1f} instances/s   (runs: {', '.join(f'{s:.2f}' for s in seconds)})")
        print(f"ratio strokegate / storescp throughput, sender without TCP_NODELAY: "
              f"{statistics.median(plain['storescp']) / statistics.median(plain['strokegate']):.1f}x as shipped, "
              f"{statistics.median(plain['storescp']) / statistics.median(plain['strokegate-async']):.1f}x with "
              "receive_sync false; target >= 5x")
        print("where a StrokeGate's time per instance goes (medians over the runs): waiting for the dataset "
              "(its command to its last byte), making it durable (journal), and the rest (the sender's own "
              "time between instances, our response on the wire)")
        for name, gate in gates.items():
            for nodelay, label in ((True, "TCP_NODELAY=1"), (False, "storescu as shipped")):
                runs = gate.phases[nodelay][1:]  # not the untimed first study
                per = statistics.median(r[0] for r in runs) / len(files) * 1e3
                dataset = statistics.median(r[1] for r in runs) * 1e3
                durable = statistics.median(r[2] for r in runs) * 1e3
                print(f"{name:16s} {label:20s}: {per:.2f} ms per instance = dataset {dataset:.2f} ms + durable "
                      f"{durable:.2f} ms + rest {per - dataset - durable:.2f} ms")
        for name in gates:
            print(f"{name}: the sender without TCP_NODELAY took {statistics.median(plain[name]) - medians[name]:+.2f} s "
                  "(median) against the sender with it")
    finally:
        for gate in gates.values():
            gate.stop()
        if peer is not None:
            peer.terminate()
            peer.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
