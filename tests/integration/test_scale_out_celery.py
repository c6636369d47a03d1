"""Scaled out on the machine's RabbitMQ and PostgreSQL: one `strokegate serve` (job_queue celery)
and three `strokegate worker` processes. Twelve studies sent over DICOM are each analysed once and
each result reaches the PACS once, also when a worker is SIGKILLed in the middle of a job."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from dicom_tools import free_port, requires_storescu, storescu
from scale_out import BROKER, Worker, delete_queue, distinct_studies, queue_name, rabbitmq_available
from service.phantom.generate import write_patient
from service.phantom.patient import PhantomOptions
from service.store.database import Database
from service.store.models import AuditEvent, Delivery, DeliveryState, Job, JobState, ResultObject
from service_harness import Service, StoreSCP, TemporaryPostgres, wait_for

pytestmark = [pytest.mark.integration, requires_storescu, pytest.mark.timeout(420)]

STUDIES = 12


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Twelve small MRI diffusion studies (64 x 64 x 8, b0 and b1000: 16 instances each)."""
    out = tmp_path_factory.mktemp("scale")
    write_patient(2, "mri", out / "phantom", PhantomOptions(mr_matrix=64, mr_slices=8, mr_frames=3))
    return distinct_studies(out / "phantom" / "SGPH00000002" / "dicom" / "MR" / "dwi", out / "studies", STUDIES)


@pytest.fixture
def queue() -> Iterator[str]:
    if not rabbitmq_available():
        pytest.skip("RabbitMQ is not reachable on 127.0.0.1:5672")
    name = queue_name()
    yield name
    delete_queue(name)


def test_three_workers_analyse_twelve_studies_once_and_deliver_each_result_once_despite_a_killed_worker(
    tmp_path: Path, studies: list[Path], queue: str,
) -> None:
    pacs = StoreSCP(tmp_path / "pacs", extra_args=("+uf",)).start()  # a new file for every object received
    destination = f"{pacs.address}?send=seg+sr"
    env = {"STROKEGATE_JOB_QUEUE": "celery", "STROKEGATE_BROKER_URL": BROKER, "STROKEGATE_CELERY_QUEUE": queue,
           "STROKEGATE_JOB_LEASE_S": "60", "STROKEGATE_SERIES_IDLE_S": "1.5", "STROKEGATE_MIN_FREE_BYTES": "0"}
    with TemporaryPostgres() as database_url:
        root = tmp_path / "gate"
        service = Service(root, database_url, [destination], env=env)
        workers = [Worker(root, f"worker{i}", database_url, [destination], env, metrics_port=free_port()) for i in range(3)]
        db = Database(database_url)
        try:
            service.start()
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.wait_ready()
            storescu(list(studies), service.port, "STROKEGATE", timeout=120)

            # SIGKILL the worker of the first job seen running, in the middle of its analysis.
            pids = {worker.pid: worker for worker in workers}

            def running_on_a_worker() -> tuple[int, Worker] | None:
                with db.session() as session:
                    for job in session.scalars(select(Job).where(Job.state == JobState.RUNNING, Job.instances_at_start.is_not(None))):
                        pid = int(job.lease_owner.split(":")[1])
                        if pid in pids:
                            return job.id, pids[pid]
                return None

            killed_job, victim = wait_for(running_on_a_worker, 120, "a job running on a worker", interval=0.05)
            victim.kill()

            def all_done() -> bool:
                with db.session() as session:
                    states = Counter(session.scalars(select(Job.state)))
                    unsent = session.scalar(select(Delivery.id).where(Delivery.state != DeliveryState.SENT).limit(1))
                return states == {JobState.DONE: STUDIES} and unsent is None

            wait_for(all_done, 300, "every job done and every result sent", interval=0.5)
            time.sleep(2)  # a duplicate would arrive now

            with db.session() as session:
                jobs = session.scalars(select(Job)).all()
                done_events = Counter(e.detail["job"] for e in session.scalars(select(AuditEvent).where(AuditEvent.kind == "job_done")))
                started_events = Counter(e.detail["job"] for e in session.scalars(select(AuditEvent).where(AuditEvent.kind == "job_started")))
                result_uids = set(session.scalars(select(ResultObject.sop_uid).join(Delivery)))  # the SEG and SR
                deliveries = session.scalars(select(Delivery)).all()
            # Each study analysed once: one job per study, done once; the killed one started twice.
            assert len({job.study_id for job in jobs}) == STUDIES and all(job.version == 1 for job in jobs)
            assert done_events == {job.id: 1 for job in jobs}
            assert {job.id: job.attempts for job in jobs} == {job.id: 2 if job.id == killed_job else 1 for job in jobs}
            assert started_events == {job.id: 2 if job.id == killed_job else 1 for job in jobs}
            worker_logs = "".join(worker.log.read_text() for worker in workers)
            assert sum(f"job {killed_job} done" in line for line in worker_logs.splitlines()) == 1
            # Taken over at once (the dead worker ran on this host), not after its lease of 60 s.
            assert f"job {killed_job}: its worker on this host is gone; taking it over" in worker_logs
            # Each result delivered once: a SEG and an SR per study, one file each at the PACS.
            assert len(deliveries) == 2 * STUDIES and all(d.attempts == 1 for d in deliveries)
            files = pacs.files()
            headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
            assert len(files) == 2 * STUDIES
            assert Counter(str(h.SOPInstanceUID) for h in headers) == {uid: 1 for uid in result_uids}
            per_study = Counter((str(h.StudyInstanceUID), h.Modality) for h in headers)
            sent_studies = {str(pydicom.dcmread(next(s.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID) for s in studies}
            assert per_study == {(uid, modality): 1 for uid in sent_studies for modality in ("SEG", "SR")}
            assert "already exists" not in pacs.log.read_text()
            # Each surviving worker's /metrics counts the jobs its log says it finished.
            for worker in workers:
                if worker is not victim:
                    finished = sum(" done: " in line and "job " in line for line in worker.log.read_text().splitlines())
                    assert worker.metric("strokegate_stage_duration_seconds_count", {"stage": "job"}) == finished
            assert sum(worker.metric("strokegate_stage_duration_seconds_count", {"stage": "job"})
                       for worker in workers if worker is not victim) > 0
        finally:
            db.dispose()
            for worker in workers:
                worker.stop()
            service.stop()
            pacs.stop()
