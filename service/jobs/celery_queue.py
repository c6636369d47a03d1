"""The distributed job queue (``job_queue: celery``): `strokegate serve` publishes each runnable
job's id to RabbitMQ; `strokegate worker` processes consume them, claim the job's row and run it.

The database row stays the truth: a message only says "look at job N". A worker claims the row
under a lease before it analyses, so a message delivered twice, or published by two serve replicas,
runs the study once, and a job already done is never redone. Messages are acknowledged after the
task (acks_late) and one at a time (prefetch 1): a worker killed mid-job leaves its message
unacknowledged, RabbitMQ hands it to another worker, which takes over the lease of the dead
process at once when it ran on the same host, or once the lease expires otherwise (then the
publisher also publishes the job again). A job whose message was lost is published again after
``republish_s``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from celery import Celery, Task
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from service.jobs import lease
from service.jobs.runner import JobRunner
from service.ops.loops import Loop
from service.ops.owners import new_owner
from service.store.database import Database
from service.store.models import Job, utcnow

log = logging.getLogger(__name__)

TASK = "strokegate.analyse"
"""The one task: analyse job N (its id the only argument)."""


def celery_app(broker_url: str, queue: str) -> Celery:
    """A Celery application on ``broker_url`` whose tasks go to ``queue`` (durable, persistent
    messages), acknowledged late, one prefetched per worker thread, no result backend (the results
    are in the database)."""
    app = Celery("strokegate", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,  # the lease keeps a redelivered job from running twice
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0},
        enable_utc=True,
    )
    return app


class CeleryQueue:
    """`serve`'s side: a loop that publishes every runnable job (queued, or running under an
    expired lease) once per attempt, and again after ``republish_s`` if it is still runnable."""

    def __init__(self, db: Database, app: Celery, queue: str, republish_s: float, poll_s: float = 0.5) -> None:
        self.db = db
        self.app = app
        self.queue = queue
        self.republish_s = republish_s
        self.poll_s = poll_s
        self._published: dict[tuple[int, int], float] = {}  # (job, attempts) -> when (monotonic)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.loops = [Loop("dispatcher", self._run)]

    def start(self) -> None:
        for loop in self.loops:
            loop.start()

    def queued(self, job_ids: list[int]) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for loop in self.loops:
            loop.stop()
            loop.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.publish_runnable(time.monotonic())
            except Exception as error:  # noqa: BLE001 - broker or database down: the next round retries
                log.error("publishing jobs to the broker failed: %s", error)
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def publish_runnable(self, now: float) -> int:
        """Publish the runnable jobs not published for their current attempt within
        ``republish_s``; returns how many were published."""
        with self.db.session() as session:
            rows = session.execute(
                select(Job.id, Job.attempts).where(lease.runnable(utcnow())).order_by(Job.id).limit(1000)
            ).all()
        published = 0
        still = {}
        for job_id, attempts in rows:
            key = (job_id, attempts)
            last = self._published.get(key)
            if last is not None and now - last < self.republish_s:
                still[key] = last
                continue
            self.app.send_task(TASK, args=[job_id], queue=self.queue)
            still[key] = now
            published += 1
            log.info("job %d published to the broker (attempt %d next)", job_id, attempts + 1)
        self._published = still
        return published


def register_analysis(app: Celery, runner: JobRunner) -> Task:
    """The analysis task on ``app``, run by ``runner`` (a `strokegate worker`)."""

    @app.task(name=TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def analyse(task: Task, job_id: int) -> None:
        owner = new_owner()
        try:
            if lease.release_if_owner_gone(runner.db, job_id):
                log.info("job %d: its worker on this host is gone; taking it over", job_id)
            job = runner.claim(owner, job_id=job_id)
        except DBAPIError as error:
            log.error("job %d: the database cannot be reached (%s); trying again in 5 s", job_id, error)
            raise task.retry(countdown=5, max_retries=None) from None
        if job is None:
            log.info("job %d: nothing to do (done, failed, or running under another worker's live lease)", job_id)
            return
        runner.run(job.id, owner)

    return analyse


def run_worker(
    app: Celery, queue: str, concurrency: int, hostname: str, log_level: str, on_ready: Callable[[], None] = lambda: None,
) -> int:
    """Consume ``queue`` with ``concurrency`` threads until a signal stops the worker (SIGTERM:
    the jobs in progress finish first); returns its exit code. ``on_ready``: called once it
    consumes."""
    from celery.concurrency import get_implementation
    from celery.signals import worker_ready

    worker_ready.connect(lambda **_: on_ready(), weak=False)

    worker = app.Worker(
        pool_cls=get_implementation("threads"), concurrency=concurrency, queues=[queue], hostname=hostname, loglevel=log_level,
        without_gossip=True, without_mingle=True, optimization="fair", quiet=True,
    )
    worker.start()
    return worker.exitcode or 0
