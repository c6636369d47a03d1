"""The one job-queue interface of `strokegate serve`, and the implementation the settings name.

Jobs are rows in the database (the tracker queues them); a job queue gets them run. Either way a
worker claims a job's row under a lease before running it (service.jobs.lease), so a study version
is analysed once however many processes and messages there are.
"""

from __future__ import annotations

from typing import Protocol

from service.config import JobQueueKind, Settings
from service.jobs.runner import JobRunner
from service.ops.loops import Loop
from service.store.database import Database


class JobQueue(Protocol):
    """How `serve` gets its queued jobs run."""

    loops: list[Loop]
    """Its background loops (readiness reports them)."""

    def start(self) -> None:
        """Start taking or handing out jobs."""

    def queued(self, job_ids: list[int]) -> None:
        """The tracker just queued ``job_ids``: run them soon (each is also found by polling)."""

    def stop(self) -> None:
        """Finish or hand back what is in progress, then stop."""


def job_queue(settings: Settings, db: Database, runner: JobRunner) -> JobQueue:
    """The job queue ``settings.job_queue`` names: worker threads here (database), or publishing to
    the broker for `strokegate worker` processes (celery)."""
    if settings.job_queue == JobQueueKind.CELERY:
        from service.jobs.celery_queue import CeleryQueue, celery_app

        return CeleryQueue(db, celery_app(settings.broker_url, settings.celery_queue), settings.celery_queue,
                           republish_s=settings.job_lease_s)
    from service.jobs.pool import DatabasePool

    return DatabasePool(runner, count=settings.workers)
