"""SIGKILL during receive, analysis and delivery: nothing acknowledged is lost, results arrive once."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from dicom_tools import requires_storescu, storescu
from service.phantom.generate import write_patient
from service.phantom.patient import PhantomOptions
from service.store.models import Instance
from service_harness import Service, StoreSCP, wait_for

pytestmark = [pytest.mark.integration, requires_storescu, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def patient(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MRI patient 2 with 1000 DSC-PWI instances (plenty to interrupt) and the DWI to analyse."""
    out = tmp_path_factory.mktemp("crash")
    write_patient(2, "mri", out, PhantomOptions(mr_matrix=96))
    return out / "SGPH00000002" / "dicom" / "MR"


def spooled(service: Service) -> list[Path]:
    return list((service.root / "spool").glob("*/*/*.dcm"))


def instances_in_database(url: str) -> set[str]:
    engine = create_engine(url)
    with Session(engine) as session:
        uids = set(session.scalars(select(Instance.sop_uid)))
    engine.dispose()
    return uids


def acknowledged_sop_uids(storescu_output: str) -> set[str]:
    """SOP Instance UIDs of the files storescu saw answered with Success (storescu -v output)."""
    acknowledged, current = set(), None
    for line in storescu_output.splitlines():
        sending = re.search(r"Sending file: (.+)$", line)
        if sending:
            current = sending.group(1).strip()
        elif "Received Store Response (Success)" in line and current:
            acknowledged.add(str(pydicom.dcmread(current, stop_before_pixels=True).SOPInstanceUID))
            current = None
    return acknowledged


@pytest.mark.parametrize(("kill_after", "sync_each"), [(50, "true"), (400, "true"), (850, "true"), (400, "false")])
def test_kill_during_receive_keeps_every_acknowledged_instance(
    tmp_path: Path, patient: Path, kill_after: int, sync_each: str
) -> None:
    """With or without a sync before each Success: a killed service keeps what it acknowledged
    (without, only a power cut could lose the last few milliseconds)."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    service = Service(tmp_path / "gate", url, [], env={"STROKEGATE_RECEIVE_SYNC": sync_each}).start()
    try:
        log = tmp_path / "storescu.log"
        with open(log, "w") as output:
            sender = subprocess.Popen(
                ["storescu", "-v", "-aec", "STROKEGATE", "+sd", "+r", "127.0.0.1", str(service.port), str(patient / "pwi")],
                stdout=output, stderr=subprocess.STDOUT, env={**os.environ, "TCP_NODELAY": "1"},
            )
            wait_for(lambda: log.read_text().count("Store Response (Success)") >= kill_after, 120,
                     f"{kill_after} acknowledged instances", interval=0.01)
            service.kill()
            sender.wait(timeout=60)
        acknowledged = acknowledged_sop_uids(log.read_text())
        assert kill_after <= len(acknowledged) < 1000, "the kill must interrupt the transfer"
        service.start()  # the restart files what the journal holds and records what the database missed
        assert "journalled instances filed into the spool" in service.log.read_text(), "nothing was left to replay"
        on_disk = {p.stem for p in spooled(service)}
        assert acknowledged <= on_disk, f"{len(acknowledged - on_disk)} acknowledged instances missing from the spool"
        for path in spooled(service):
            pydicom.dcmread(path)  # every spooled file is whole
        recorded = instances_in_database(url)
        assert acknowledged <= recorded, f"{len(acknowledged - recorded)} acknowledged instances not in the database"
        assert on_disk == recorded
    finally:
        service.stop()


def _send_and_kill_when(service: Service, dicom: Path, condition, what: str) -> None:  # noqa: ANN001
    storescu(dicom / "dwi", service.port, "STROKEGATE")
    storescu(dicom / "pwi", service.port, "STROKEGATE")
    wait_for(condition, 120, what, interval=0.02)
    service.kill()


def _exactly_once(pacs: StoreSCP, service: Service) -> None:
    # The job done: one killed after its SEG and SR were in the outbox runs again, makes the same
    # objects and must not send them a second time.
    wait_for(lambda: [j["state"] for j in service.get("/api/jobs")] == ["done"], 120, "the job done")
    files = wait_for(lambda: len(pacs.files()) >= 2 and pacs.files(), 120, "SEG and SR at the PACS")
    wait_for(lambda: all(d["state"] == "sent" for d in service.get("/api/deliveries")), 30, "deliveries marked sent")
    time.sleep(2)  # a duplicate send would arrive now
    assert sorted(pydicom.dcmread(f, stop_before_pixels=True).Modality for f in pacs.files()) == ["SEG", "SR"]
    log = pacs.log.read_text()
    assert "already exists" not in log, "an object reached the PACS twice"
    assert len(files) == 2
    assert len(service.get("/api/deliveries")) == 2
    jobs = service.get("/api/jobs")
    assert [j["version"] for j in jobs] == [1] and jobs[0]["state"] == "done"


def test_kill_during_analysis_retries_the_job_and_delivers_once(tmp_path: Path, patient: Path) -> None:
    pacs = StoreSCP(tmp_path / "pacs").start()
    service = Service(tmp_path / "gate", f"sqlite:///{tmp_path / 'db.sqlite'}", [f"{pacs.address}?send=seg+sr"]).start()
    try:
        _send_and_kill_when(  # while it analyses: before its SEG and SR go out (they do before the maps are drawn)
            service, patient,
            lambda: any(j["state"] == "running" for j in service.get("/api/jobs")) and not service.get("/api/deliveries"),
            "a running job with nothing in the outbox yet",
        )
        service.start()
        _exactly_once(pacs, service)
        assert service.get("/api/jobs")[0]["attempts"] == 2
    finally:
        service.stop()
        pacs.stop()


def test_kill_with_results_in_the_outbox_delivers_them_after_restart_once(tmp_path: Path, patient: Path) -> None:
    pacs = StoreSCP(tmp_path / "pacs")  # down: results wait in the outbox, retrying
    service = Service(tmp_path / "gate", f"sqlite:///{tmp_path / 'db.sqlite'}", [f"{pacs.address}?send=seg+sr"]).start()
    try:
        _send_and_kill_when(
            service, patient,
            lambda: any(d["attempts"] >= 2 for d in service.get("/api/deliveries")), "delivery retries",
        )
        pacs.start()
        service.start()
        _exactly_once(pacs, service)
    finally:
        service.stop()
        pacs.stop()


def test_kill_during_delivery_resends_at_most_the_object_in_flight(tmp_path: Path) -> None:
    """Finding 6: outcomes were committed per association, so a kill with 21 of 108 results
    delivered left 129 files for 108 objects. Each outcome is now committed as its response
    arrives: after a kill mid-delivery every object is at the PACS, and at most the one in flight
    twice (the same object: same SOP Instance UID); before, all those delivered before the kill came
    again. The PACS is slow (1 s per object) and writes a new file for every object it receives
    (+uf), so a duplicate cannot hide."""
    out = tmp_path / "phantom"
    write_patient(2, "mri", out, PhantomOptions(mr_matrix=64, mr_slices=8, mr_frames=3))
    pacs = StoreSCP(tmp_path / "pacs", extra_args=("+uf", "--sleep-after", "1")).start()
    service = Service(tmp_path / "gate", f"sqlite:///{tmp_path / 'db.sqlite'}",
                      [f"{pacs.address}?send=seg+sr+summary+values"]).start()
    try:
        storescu(out / "SGPH00000002" / "dicom" / "MR" / "dwi", service.port, "STROKEGATE")
        sent = lambda: sum(d["state"] == "sent" for d in service.get("/api/deliveries"))  # noqa: E731
        # The job done (every result in the outbox; its SEG and SR may go out before that) and two sent.
        done = lambda: [j["state"] for j in service.get("/api/jobs")] == ["done"]  # noqa: E731
        wait_for(lambda: done() and sent() >= 2, 120, "the job done and two results delivered", interval=0.05)
        service.kill()
        before = len(pacs.files())
        objects = len(service.start().get("/api/deliveries"))
        assert 2 <= before < objects, "the kill must interrupt the delivery"
        wait_for(lambda: sent() == objects, 120, "every result delivered after the restart")
        time.sleep(1.5)
        uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in pacs.files()]
        expected = {d["sop_instance_uid"] for d in service.get("/api/deliveries")}
        assert set(uids) == expected  # every object, none missing
        assert len(uids) - len(set(uids)) <= 1, f"{len(uids)} files for {len(set(uids))} objects"
    finally:
        service.stop()
        pacs.stop()
