"""Several processes sharing one PostgreSQL database (serve replicas, workers): each job is claimed
by one of them, each complete study queued once, each result object delivered once per destination.
The claimants run on threads with their own engines here, which meet in PostgreSQL exactly as
processes do (row locks, SKIP LOCKED)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_tools import requires_storescu
from service.config import RESULT_CATEGORIES, Destination
from service.delivery.outbox import ResultFile, Sender, enqueue
from service.findings import ResultKind
from service.ingest.header import ReceivedInstance
from service.ingest.spool import Spool
from service.ingest.tracker import Tracker, record_instances
from service.jobs import lease
from service.store.database import Database
from service.store.models import Delivery, DeliveryState, Job, JobState, utcnow
from service_harness import StoreSCP, TemporaryPostgres, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture
def database_url() -> Iterator[str]:
    with TemporaryPostgres() as url:
        db = Database(url)
        db.upgrade()
        db.dispose()
        yield url


def received(study: int, sop: int) -> ReceivedInstance:
    uid = f"1.2.826.0.1.3680043.10.1.{study}"
    return ReceivedInstance(uid, f"{uid}.1", f"{uid}.1.{sop}", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1",
                            f"{uid}/{uid}.1/{sop}.dcm", 100, "MR", f"P{study}", None, "DWI", None, "SCANNER")


def quiet_studies(url: str, count: int) -> None:
    """``count`` studies of two instances each, received an hour ago: complete at the next tick."""
    db = Database(url)
    with db.session() as session:
        record_instances(session, [received(s, i) for s in range(count) for i in range(2)], utcnow() - timedelta(hours=1))
    db.dispose()


def together(count: int, work: Callable[[int], None]) -> None:
    """Run ``work(i)`` for i in range(count) on as many threads, started at once; re-raise a failure."""
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            barrier.wait(30)
            work(index)
        except BaseException as error:  # noqa: BLE001 - handed to the test below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)


def test_serve_replicas_ticking_together_queue_each_complete_study_once(database_url: str, tmp_path: Path) -> None:
    quiet_studies(database_url, 40)
    created: list[int] = []

    def tick(index: int) -> None:
        db = Database(database_url)
        try:
            created.extend(Tracker(db, Spool(tmp_path / f"spool{index}"), 1, 24).tick(utcnow()))
        finally:
            db.dispose()

    together(4, tick)
    db = Database(database_url)
    with db.session() as session:
        jobs = session.query(Job).all()
    db.dispose()
    assert len(jobs) == 40 and len(created) == 40
    assert Counter(job.study_id for job in jobs).most_common(1)[0][1] == 1
    assert all(job.version == 1 for job in jobs)


def test_workers_claiming_together_take_each_job_once(database_url: str, tmp_path: Path) -> None:
    quiet_studies(database_url, 30)
    db = Database(database_url)
    queued = Tracker(db, Spool(tmp_path / "spool"), 1, 24).tick(utcnow())
    db.dispose()
    assert len(queued) == 30
    claimed: list[int] = []

    def work(index: int) -> None:
        db = Database(database_url)
        owner = f"test:{index}:w"
        try:
            for _ in range(100):
                job = lease.claim(db, owner, lease_s=60, max_attempts=3)
                if job is None:
                    return
                claimed.append(job.id)
                assert lease.finish(db, job.id, owner, JobState.DONE)
        finally:
            db.dispose()

    together(6, work)
    assert sorted(claimed) == sorted(queued)  # every job, none twice


def result_file(folder: Path, study: int, index: int) -> Path:
    """A small Secondary Capture object standing in for one result."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SECONDARY_CAPTURE, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.1.{study}", generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality, ds.ConversionType = f"P{study}", "Test^Claims", "OT", "WSD"
    ds.SeriesNumber, ds.InstanceNumber = 900 + index, 1
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(16)
    path = folder / f"{study}" / f"{index}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@requires_storescu
def test_serve_replicas_sending_together_deliver_each_result_once(database_url: str, tmp_path: Path) -> None:
    """Two senders (two serve replicas) share one outbox of 24 objects for one PACS that writes a
    new file for every object it receives (+uf): 24 files, 24 distinct SOP Instance UIDs."""
    pacs = StoreSCP(tmp_path / "pacs", extra_args=("+uf",)).start()
    results = tmp_path / "results"
    try:
        quiet_studies(database_url, 4)
        db = Database(database_url)
        job_ids = Tracker(db, Spool(tmp_path / "spool"), 1, 24).tick(utcnow())
        kinds = ["SEG", "SR", "SUMMARY", "PM-cbf", "PM-cbv", "PM-tmax"]
        with db.session() as session:
            for study, job_id in enumerate(job_ids):
                files = []
                for index, kind in enumerate(kinds):
                    path = result_file(results, study, index)
                    sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
                    files.append(ResultFile(ResultKind.parse(kind), sop, SECONDARY_CAPTURE, path.relative_to(results).as_posix()))
                enqueue(session, session.get(Job, job_id), files, {pacs.address: RESULT_CATEGORIES})
        db.dispose()
        sent: list[int] = []

        def send(index: int) -> None:
            db = Database(database_url)
            sender = Sender(db, results, f"REPLICA{index}", 0.5, 2, [Destination.parse(pacs.address)])
            try:
                for _ in range(20):
                    sent.append(sender.send_due(utcnow()))
            finally:
                db.dispose()

        together(2, send)
        files = wait_for(lambda: len(pacs.files()) >= 24 and pacs.files(), 30, "24 objects at the PACS")
        assert sum(sent) == 24
        uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
        assert len(files) == 24 and len(set(uids)) == 24, "an object reached the PACS twice"
        db = Database(database_url)
        with db.session() as session:
            states = Counter(d.state for d in session.query(Delivery))
        db.dispose()
        assert states == {DeliveryState.SENT: 24}
    finally:
        pacs.stop()


def test_serve_publishes_each_runnable_job_once_per_attempt(database_url: str, tmp_path: Path) -> None:
    """job_queue celery, serve's side, on the machine's RabbitMQ: each queued job is published
    once; a job back in the queue after a failed attempt, or whose worker's lease expired, is
    published again; a job running under a live lease or done is not."""
    from scale_out import BROKER, delete_queue, queue_name, rabbitmq_available

    if not rabbitmq_available():
        pytest.skip("RabbitMQ is not reachable on 127.0.0.1:5672")
    from kombu import Connection

    from service.jobs.celery_queue import TASK, CeleryQueue, celery_app

    name = queue_name()
    quiet_studies(database_url, 3)
    db = Database(database_url)
    app = celery_app(BROKER, name)

    def messages() -> list[tuple[str, int]]:
        """(task, job id) of each message waiting in the queue, taken off it."""
        taken = []
        with Connection(BROKER) as connection:
            queue = connection.SimpleQueue(name, no_ack=True)
            while True:
                try:
                    message = queue.get(timeout=1)
                except queue.Empty:
                    break
                taken.append((message.headers["task"], message.payload[0][0]))
            queue.close()
        return sorted(taken)

    try:
        first, second, third = Tracker(db, Spool(tmp_path / "spool"), 1, 24).tick(utcnow())
        publisher = CeleryQueue(db, app, name, republish_s=300)
        assert publisher.publish_runnable(now=0.0) == 3
        assert publisher.publish_runnable(now=1.0) == 0  # once per attempt
        assert messages() == [(TASK, first), (TASK, second), (TASK, third)]
        assert lease.claim(db, "host:1:a", lease_s=60, max_attempts=3, job_id=first)
        lease.record_error(db, first, "host:1:a", "RuntimeError: out of memory")  # back in the queue: attempt 2
        assert lease.claim(db, "host:1:b", lease_s=0, max_attempts=3, job_id=second)  # its lease expires at once
        assert lease.claim(db, "host:1:c", lease_s=60, max_attempts=3, job_id=third)  # running, alive
        assert publisher.publish_runnable(now=2.0) == 2
        assert messages() == [(TASK, first), (TASK, second)]
        assert publisher.publish_runnable(now=400.0) == 2  # still waiting after republish_s: a lost message
        assert messages() == [(TASK, first), (TASK, second)]
    finally:
        db.dispose()
        delete_queue(name)
