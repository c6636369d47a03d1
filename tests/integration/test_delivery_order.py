"""Results go out in the order a stroke team reads them: every pending SEG and SR before the
summary images, the summaries before the map values and the colour map images, however the
outbox filled up."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from dicom_tools import requires_storescu
from service.analysis.pipeline import AnalysisParameters
from service.config import Destination, Settings
from service.delivery.outbox import ResultFile, Sender, enqueue
from service.findings import ResultCategory, ResultKind
from service.ingest.header import ReceivedInstance, parse_header, received_instance
from service.jobs.runner import JobRunner
from service.ops.owners import new_owner
from service.ingest.spool import Spool
from service.ingest.tracker import Tracker, record_instances
from service.phantom.generate import write_patient
from service.phantom.patient import PhantomOptions
from service.store.database import Database
from service.store.models import Delivery, Job, ResultObject, utcnow
from service_harness import StoreSCP

pytestmark = [pytest.mark.integration, requires_storescu, pytest.mark.timeout(120)]

KINDS = ["MAP-cbf-001", "MAP-cbf-002", "PM-cbf", "SUMMARY", "SR", "SEG"]  # filled in the worst order
RANK = {"SEG": 0, "SR": 1, "SUMMARY": 2, "PM-cbf": 3, "MAP-cbf-001": 4, "MAP-cbf-002": 4}


def queued_job(db: Database, study: str, spool: Spool) -> int:
    """A job for a one-instance study, queued by the real tracker."""
    with db.session() as session:
        record_instances(session, [ReceivedInstance(
            study, f"{study}.1", f"{study}.1.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
            f"{study}/x.dcm", 1, "CT", "P", "A", "CTP", None, "CT1")], utcnow() - timedelta(hours=1))
    return Tracker(db, spool, 1, 24).tick(utcnow())[0]


def test_seg_and_sr_of_every_pending_study_go_out_before_its_images(tmp_path: Path) -> None:
    write_patient(3, "ctp", tmp_path / "patient", PhantomOptions(ct_matrix=32, ct_slices=4, ct_frames=3))
    sources = sorted((tmp_path / "patient").rglob("*.dcm"))[: 2 * len(KINDS)]
    results = tmp_path / "results"
    results.mkdir()
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    db.upgrade()
    pacs = StoreSCP(tmp_path / "pacs").start()
    try:
        destination = Destination.parse(pacs.address)
        spool = Spool(tmp_path / "spool")
        files = iter(sources)
        for study in ("1.2.7", "1.2.8"):  # two studies' results waiting at once, the first with its maps first
            job_id = queued_job(db, study, spool)
            entries = []
            for kind in KINDS:
                source = next(files)
                shutil.copy(source, results / source.name)
                ds = pydicom.dcmread(source, stop_before_pixels=True)
                entries.append(ResultFile(ResultKind.parse(kind), str(ds.SOPInstanceUID), str(ds.SOPClassUID), source.name))
            with db.session() as session:
                enqueue(session, session.get(Job, job_id), entries, {destination.name: {k.category for k in
                                                                                         (e.kind for e in entries)}})
        sender = Sender(db, results, "STROKEGATE", 1.0, 2.0, [destination])
        assert sender.send_due(utcnow()) == 2 * len(KINDS)
        with db.session() as session:
            sent = session.execute(select(ResultObject.kind, Delivery.sent_at).join(Delivery)
                                   .order_by(Delivery.sent_at, Delivery.id)).all()
        assert [kind for kind, _ in sent] == sorted((kind for kind, _ in sent), key=RANK.__getitem__)
        assert {kind for kind, _ in sent[:4]} == {"SEG", "SR"}  # both studies' SEG and SR first
        assert len(pacs.files()) == 2 * len(KINDS)
    finally:
        pacs.stop()
        db.dispose()



def test_a_job_puts_its_seg_and_sr_in_the_outbox_before_it_draws_the_maps(tmp_path: Path) -> None:
    """The worker's first hand-over to the sender holds the SEG and the SR alone, while the job
    still runs; the summary and map series follow when the job is done."""
    write_patient(4, "mri", tmp_path / "patient", PhantomOptions(mr_frames=8))
    dwi = tmp_path / "patient" / "SGPH00000004" / "dicom" / "MR" / "dwi"
    spool_dir = tmp_path / "spool"
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    db.upgrade()
    items = []
    for source in sorted(dwi.glob("*.dcm")):
        relative = Path("study") / source.name
        (spool_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, spool_dir / relative)
        items.append(received_instance(parse_header(source.read_bytes()), relative.as_posix(), source.stat().st_size, "CT1"))
    with db.session() as session:
        record_instances(session, items, utcnow() - timedelta(hours=1))
    job_id = Tracker(db, Spool(spool_dir), 1, 24).tick(utcnow())[0]
    handed_over: list[tuple[str, set[str]]] = []

    def outbox() -> None:
        with db.session() as session:
            handed_over.append((session.get(Job, job_id).state.value,
                                set(session.scalars(select(ResultObject.kind).join(Delivery)))))

    settings = Settings(learned_models=False)
    runner = JobRunner(db, spool_dir, tmp_path / "results", AnalysisParameters.from_settings(settings),
                       {"PACS": set(ResultCategory)}, lease_s=60, max_attempts=1, on_results=outbox)
    try:
        owner = new_owner()
        assert runner.claim(owner, job_id) is not None
        runner.run(job_id, owner)
    finally:
        db.dispose()
    assert handed_over[0] == ("running", {"SEG", "SR"})
    state, kinds = handed_over[-1]
    assert state == "done" and {"SEG", "SR", "SUMMARY"} <= kinds and any(k.startswith("MAP-") for k in kinds)
