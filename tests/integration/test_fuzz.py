"""Fuzzing (issue 11): a short pass of benchmarks/fuzz.py (atheris, every harness), and mutated
datasets and PDU streams sent to a running `strokegate serve`, after which a good study must
complete end to end. The long pass (>= 10,000 inputs per harness) is `benchmarks/fuzz.py`."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pynetdicom.sop_class import MRImageStorage

from dicom_tools import REPO_ROOT, requires_storescu, storescu
from hostile_peers import associate_rq, dataset_of, open_association, p_data, release, store_command, store_raw, thread_count
from service.phantom.dicom_writer import uid
from service.phantom.generate import write_patient
from service.phantom.patient import PhantomOptions
from service_harness import Service, StoreSCP, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MR = str(MRImageStorage)
MUTANTS = int(os.environ.get("STROKEGATE_NETWORK_FUZZ", "300"))  # datasets; a fifth as many PDU streams


def test_a_short_fuzz_pass_of_every_harness_finds_no_uncaught_exception(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "fuzz.py"), "--runs", "600", "--jobs", "2", "--work", str(tmp_path)],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[:1] and line.split()[0] in
            ("pdu", "dimse", "journal", "header", "filing", "hl7")]
    assert len(rows) == 6 and all(int(row[1]) >= 600 and row[3] == "0" for row in rows), result.stdout


def mutate(data: bytes, rng: random.Random) -> bytes:
    """1-8 random byte-level mutations: flips, overwrites, insertions, deletions, duplications, a cut."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        position = rng.randrange(max(1, len(out)))
        kind = rng.randrange(6)
        if kind == 0 and out:
            out[position] ^= 1 << rng.randrange(8)
        elif kind == 1 and out:
            out[position] = rng.randrange(256)
        elif kind == 2:
            out[position:position] = rng.randbytes(rng.randint(1, 16))
        elif kind == 3:
            del out[position : position + rng.randint(1, 64)]
        elif kind == 4:
            out[position:position] = out[position : position + rng.randint(1, 64)]
        else:
            del out[rng.randint(len(out) // 2, len(out)):]
    return bytes(out)


@requires_storescu
def test_mutated_datasets_and_pdus_then_a_good_study_completes(tmp_path: Path) -> None:
    out = tmp_path / "phantom"
    write_patient(2, "mri", out, PhantomOptions(mr_matrix=64, mr_slices=8, mr_frames=3))
    dwi = out / "SGPH00000002" / "dicom" / "MR" / "dwi"
    pacs = StoreSCP(tmp_path / "pacs").start()
    service = Service(tmp_path / "gate", f"sqlite:///{tmp_path / 'db.sqlite'}", [f"{pacs.address}?send=seg+sr"], env={
        "STROKEGATE_ASSOCIATION_REQUEST_TIMEOUT_S": "2", "STROKEGATE_NETWORK_TIMEOUT_S": "3",
    }).start()
    try:
        threads = thread_count(service.process.pid)
        rng = random.Random(11)
        sources = []
        for path in sorted(dwi.glob("*.dcm")):
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("fuzz", "study"), uid("fuzz", "series")
            sources.append(ds)
        sock, statuses = open_association(service.port, [MR]), []
        for index in range(MUTANTS):
            ds = sources[index % len(sources)]
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid("fuzz", index)
            ds.save_as(tmp_path / "mutant.dcm", enforce_file_format=True)
            data = mutate(dataset_of(tmp_path / "mutant.dcm"), rng) or b"\0"
            statuses.append(store_raw(sock, MR, ds.SOPInstanceUID.encode(), data, message_id=index % 65535 + 1))
        release(sock)
        assert statuses == [0] * MUTANTS  # each made durable and acknowledged: found bad, if at all, after

        stream = (associate_rq([MR]) + p_data(1, 0x03, store_command(MR.encode(), b"1.2.3.4"))
                  + p_data(1, 0x02, dataset_of(tmp_path / "mutant.dcm")) + bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
        for _ in range(MUTANTS // 5):  # broken peers: each mutated stream on its own connection
            with socket.create_connection(("127.0.0.1", service.port), timeout=10) as peer:
                try:
                    peer.sendall(mutate(stream, rng))
                    peer.shutdown(socket.SHUT_WR)
                    while peer.recv(65536):
                        pass
                except (ConnectionResetError, BrokenPipeError):  # aborted and closed before we finished
                    pass

        accounted = lambda: (service.metric("strokegate_instances_received_total")  # noqa: E731
                             + service.metric("strokegate_instances_quarantined_total"))
        wait_for(lambda: accounted() >= MUTANTS, 60, "every mutant filed or quarantined")
        assert accounted() <= MUTANTS + MUTANTS // 5  # (a mutated stream may carry a valid instance)
        assert service.ready()
        assert service.metric("strokegate_loop_restarts_total") == 0  # no thread died
        wait_for(lambda: thread_count(service.process.pid) <= threads + 2, 20, "association threads to end")

        good = tmp_path / "good"
        good.mkdir()
        study = uid("fuzz", "good")
        for index, path in enumerate(sorted(dwi.glob("*.dcm"))):
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, uid("fuzz", "good", "series")
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid("fuzz", "good", index)
            ds.save_as(good / path.name, enforce_file_format=True)
        storescu(good, service.port, "STROKEGATE")
        wait_for(lambda: service.get(f"/api/studies/{study}", {}).get("state") == "done", 180, "the good study analysed")
        wait_for(lambda: any(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID == study
                             for f in pacs.files()), 60, "its results at the PACS")
    finally:
        service.stop()
        pacs.stop()
