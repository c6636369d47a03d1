"""Soak: SIGKILL `strokegate serve` at random moments of receive, filing, analysis and delivery,
over continuous dcmtk storescu traffic with a live destination, and count what was lost or doubled.

Two destinations, each counting every C-STORE that arrives on the wire, so that a duplicate cannot hide:

  dcmqrscp   dcmtk's query/retrieve SCP, which answers C-FIND; StrokeGate sends to it with
             ``confirm=find`` (an object in flight at a kill is asked about before it is sent
             again). It keeps one file per SOP Instance UID, so arrivals are counted from its log
             (one "C-STORE RQ" entry per request received).
  storescp   dcmtk storescp +uf, a new file per object received, answering no query; sent to with
             ``confirm=none``: the at-least-once baseline.

The sender is a PACS: it sends study after study (a small synthetic MRI diffusion study, new UIDs
each time) with storescu, and resends a study whose association failed until every instance is
acknowledged. A killer picks a phase at random for each kill, waits until the service is in it,
then a random moment more, and sends SIGKILL; the service is started again at once. At the end the
sender stops, the service drains, and the figures are:

  acknowledged instances lost   answered Success (storescu's log) but not in the database
  result objects missing        in the outbox, not at the destination
  result objects duplicated     received by the destination more than once (by SOP Instance UID)

    .venv/bin/python benchmarks/soak.py [--kills 50] [--seed 1] [--destination dcmqrscp|storescp] [--json figures.json]

Jobs may be attempted up to 20 times here (job_max_attempts): a study's analysis killed three
times would otherwise fail, which is the setting doing its work, not a loss.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

PHASES = ("receive", "filing", "analysis", "delivery")
ENV = {**os.environ, "TCP_NODELAY": "1"}
STROKEGATE = Path(sys.executable).parent / "strokegate"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(predicate, timeout: float, interval: float = 0.02):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None


class Gate:
    """`strokegate serve` as a process, started again after each kill."""

    def __init__(self, root: Path, destination: str) -> None:
        self.root, self.port, self.http_port = root, free_port(), free_port()
        self.database = root / "db.sqlite"
        self.command = [
            str(STROKEGATE), "serve", "--host", "127.0.0.1", "--port", str(self.port), "--ae-title", "STROKEGATE",
            "--database-url", f"sqlite:///{self.database}", "--spool-dir", str(root / "spool"),
            "--results-dir", str(root / "results"), "--http-port", str(self.http_port), "--destination", destination,
        ]
        self.env = {**ENV, "STROKEGATE_SERIES_IDLE_S": "1", "STROKEGATE_MIN_FREE_BYTES": "0",
                    "STROKEGATE_DELIVERY_BACKOFF_S": "0.5", "STROKEGATE_DELIVERY_BACKOFF_MAX_S": "2",
                    "STROKEGATE_JOB_MAX_ATTEMPTS": "20"}
        self.process: subprocess.Popen | None = None
        self.log = root / "service.log"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        if not wait(self.ready, 120, 0.1):
            raise RuntimeError(f"strokegate did not become ready; see {self.log}")

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"strokegate exited with {self.process.returncode}; see {self.log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/readyz", timeout=2) as response:
                return json.loads(response.read())["status"] == "ready"
        except OSError:
            return False

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def query(self, sql: str) -> list[tuple]:
        if not self.database.exists():
            return []
        connection = sqlite3.connect(f"file:{self.database}?mode=ro", uri=True, timeout=5)
        try:
            return connection.execute(sql).fetchall()
        except sqlite3.OperationalError:  # not yet migrated
            return []
        finally:
            connection.close()


class Sender(threading.Thread):
    """A PACS: sends study after study with storescu, resending one until all of it is acknowledged."""

    def __init__(self, template: list[Path], port: int, work: Path, rng: random.Random) -> None:
        super().__init__(name="sender", daemon=True)
        self.template, self.port, self.work, self.rng = template, port, work, rng
        self.acknowledged: set[str] = set()
        self.studies: list[str] = []
        self.sending = threading.Event()
        self.study_sent = threading.Event()
        self.stopping = threading.Event()
        self.attempts = 0

    def new_study(self, number: int) -> tuple[Path, dict[str, str]]:
        folder = self.work / f"study-{number:04d}"
        folder.mkdir(parents=True)
        study, series = generate_uid(), generate_uid()
        uids = {}
        for path in self.template:
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.save_as(folder / path.name, enforce_file_format=True)
            uids[str(folder / path.name)] = str(ds.SOPInstanceUID)
        self.studies.append(study)
        return folder, uids

    def run(self) -> None:
        number = 0
        while not self.stopping.is_set():
            folder, uids = self.new_study(number)
            number += 1
            while True:  # until every instance of the study is acknowledged, as a PACS retries
                self.attempts += 1
                self.sending.set()
                result = subprocess.run(
                    ["storescu", "-v", "-aec", "STROKEGATE", "-to", "10", "-ta", "10", "-td", "10", "+sd",
                     "127.0.0.1", str(self.port), str(folder)], capture_output=True, text=True, env=ENV)
                self.sending.clear()
                self.acknowledged |= acknowledged(result.stdout + result.stderr, uids)
                if result.returncode == 0 and set(uids.values()) <= self.acknowledged:
                    self.study_sent.set()
                    break
                time.sleep(0.3)
            if self.stopping.wait(self.rng.uniform(0.5, 2.0)):
                return


def acknowledged(output: str, uids: dict[str, str]) -> set[str]:
    """SOP Instance UIDs storescu saw answered with Success (its -v log)."""
    done, current = set(), None
    for line in output.splitlines():
        sending = re.search(r"Sending file: (.+)$", line)
        if sending:
            current = sending.group(1).strip()
        elif "Received Store Response (Success)" in line and current in uids:
            done.add(uids[current])
            current = None
    return done


def wait_for_phase(phase: str, gate: Gate, sender: Sender, rng: random.Random) -> bool:
    """Until the service is in ``phase``, then a random moment more; False if it never was (60 s)."""
    if phase == "receive":
        found = wait(lambda: sender.sending.is_set(), 60)
        time.sleep(rng.uniform(0.02, 0.3))
    elif phase == "filing":  # right after a study's last instance was acknowledged: filing and recording
        sender.study_sent.clear()
        found = wait(sender.study_sent.is_set, 60, 0.005)
        time.sleep(rng.uniform(0.0, 0.15))
    elif phase == "analysis":
        found = wait(lambda: gate.query("select 1 from jobs where state = 'running'"), 60)
        time.sleep(rng.uniform(0.0, 0.6))
    else:  # a delivery's first attempt, from just before it goes on the wire
        found = wait(lambda: gate.query("select 1 from deliveries where state != 'sent' and attempts = 0"), 60, 0.005)
        time.sleep(rng.uniform(0.0, 0.05))
    return bool(found)


def received_stores(log: str) -> tuple[Counter[str], Counter[str]]:
    """From dcmqrscp's -v log: the SOP Instance UIDs of every C-STORE request received, and of those
    it kept. dcmqrscp deletes what it received when the store fails ("Store SCP Failed": the
    association was aborted mid-dataset, or its response could not be sent because the sender died),
    so such a request leaves nothing at the destination; a second kept store of a UID is a duplicate."""
    requests: Counter[str] = Counter()
    kept: Counter[str] = Counter()
    in_store, last = False, None
    for line in log.splitlines():
        if "Message Type" in line:
            in_store = line.rstrip().endswith("C-STORE RQ")
        elif in_store and "Affected SOP Instance UID" in line:
            last = line.partition(":")[2].partition(":")[2].strip()
            requests[last] += 1
            kept[last] += 1
            in_store = False
        elif "Store SCP Failed" in line and last is not None:
            kept[last] -= 1
            last = None
        elif "Association Received" in line:
            last = None
    return requests, +kept


def settled(gate: Gate) -> bool:
    busy = gate.query(
        "select (select count(*) from studies where state in ('receiving', 'queued'))"
        " + (select count(*) from jobs where state in ('queued', 'running'))"
        " + (select count(*) from deliveries where state != 'sent')")
    return bool(busy) and busy[0][0] == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--destination", choices=("dcmqrscp", "storescp"), default="dcmqrscp",
                        help="dcmqrscp: answers C-FIND, sent to with confirm=find; storescp +uf: confirm=none")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="strokegate-soak-"))
    work.mkdir(parents=True, exist_ok=True)

    from service.phantom.generate import write_patient
    from service.phantom.patient import PhantomOptions

    write_patient(2, "mri", work / "phantom", PhantomOptions(mr_matrix=64, mr_slices=12, mr_frames=3))
    template = sorted((work / "phantom" / "SGPH00000002" / "dicom" / "MR" / "dwi").glob("*.dcm"))
    pacs_folder = work / "pacs"
    pacs_folder.mkdir()
    pacs_port = free_port()
    pacs_log = work / f"{args.destination}.log"
    if args.destination == "dcmqrscp":
        config = work / "dcmqrscp.cfg"
        config.write_text(f"NetworkTCPPort = {pacs_port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n"
                          "HostTable BEGIN\nHostTable END\nVendorTable BEGIN\nVendorTable END\n"
                          f"AETable BEGIN\nPACS {pacs_folder} RW (100000, 4096mb) ANY\nAETable END\n")
        command, confirm = ["dcmqrscp", "-v", "-c", str(config), str(pacs_port)], "find"
    else:
        command, confirm = ["storescp", "-aet", "PACS", "-od", str(pacs_folder), "+uf", str(pacs_port)], "none"
    with open(pacs_log, "wb") as log:
        pacs = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=ENV)
    gate = Gate(work / "gate", f"PACS@127.0.0.1:{pacs_port}?confirm={confirm}")
    (work / "gate").mkdir()
    started = time.monotonic()
    kills: Counter[str] = Counter()
    missed: Counter[str] = Counter()
    try:
        gate.start()
        sender = Sender(template, gate.port, work / "studies", rng)
        sender.start()
        for number in range(args.kills):
            phase = rng.choice(PHASES)
            if not wait_for_phase(phase, gate, sender, rng):
                missed[phase] += 1
            gate.kill()
            kills[phase] += 1
            print(f"kill {number + 1:3d}/{args.kills}: {phase:9s} ({time.monotonic() - started:5.0f} s, "
                  f"{len(sender.studies)} studies, {len(sender.acknowledged)} instances acknowledged)", flush=True)
            gate.start()
        sender.stopping.set()
        sender.join(timeout=300)
        if not wait(lambda: settled(gate), 600, 0.5):
            print("the service did not settle within 10 minutes", file=sys.stderr)
        time.sleep(2)  # a late duplicate would arrive now
    finally:
        gate.stop()
        pacs.terminate()
        pacs.wait(30)

    recorded = {row[0] for row in gate.query("select sop_uid from instances")}
    lost = sender.acknowledged - recorded
    expected = {row[0] for row in gate.query(
        "select r.sop_uid from result_objects r join deliveries d on d.result_id = r.id")}
    files = [path for path in pacs_folder.iterdir() if path.suffix == ".dcm" or args.destination == "storescp"]
    in_files = Counter(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in files)
    requests, at_pacs = (received_stores(pacs_log.read_text(errors="replace")) if args.destination == "dcmqrscp"
                         else (in_files, in_files))
    service_log = gate.log.read_text(errors="replace")
    confirmed = sum(int(n) for n, _ in re.findall(r"(\d+) of (\d+) uncertain result objects were already at", service_log))
    uncertain = sum(int(n) for n in re.findall(r"(\d+) uncertain result objects to \S+ are sent again", service_log)) \
        + sum(int(n) for _, n in re.findall(r"(\d+) of (\d+) uncertain result objects were already at", service_log))
    jobs = Counter(row[0] for row in gate.query("select state from jobs"))
    failures = Counter(row[0][:80] for row in gate.query("select error from jobs where state = 'failed'"))
    figures = {
        "kills": args.kills, "kills_by_phase": dict(kills), "phase_not_reached": dict(missed),
        "minutes": round((time.monotonic() - started) / 60, 1), "studies_sent": len(sender.studies),
        "storescu_runs": sender.attempts, "instances_acknowledged": len(sender.acknowledged),
        "instances_acknowledged_lost": len(lost), "instances_quarantined": len(list((work / "gate" / "spool" / "quarantine").glob("*.dcm"))),
        "jobs": dict(jobs), "job_failures": dict(failures),
        "destination": args.destination, "confirm": confirm,
        "uncertain_after_restart": uncertain, "uncertain_confirmed_held": confirmed,
        "result_objects_expected": len(expected), "store_requests_received": sum(requests.values()),
        "stores_failed_at_destination": sum(requests.values()) - sum(at_pacs.values()),
        "stores_kept": sum(at_pacs.values()),
        "files_at_destination": sum(in_files.values()),
        "result_objects_missing": len(expected - set(at_pacs)), "unexpected_objects": len(set(at_pacs) - expected),
        "objects_duplicated": sum(1 for n in at_pacs.values() if n > 1),
        "duplicate_stores": sum(n - 1 for n in at_pacs.values() if n > 1),
        "duplicate_files": sum(n - 1 for n in in_files.values() if n > 1),
        "work": str(work),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    ok = not lost and not figures["result_objects_missing"] and not figures["unexpected_objects"]
    if confirm == "find":  # exactly once is the claim here; with confirm=none duplicates are the baseline
        ok = ok and not figures["duplicate_stores"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
