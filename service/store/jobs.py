"""The job queue in the database: claims under a lease, so a job is never run twice at once and a
crashed worker's job is retried, never lost.

A claim is one conditional UPDATE (queued, or running with an expired lease), which works the same
on SQLite and PostgreSQL and between processes. Owners are ``host:pid:token``; at start a process
releases the leases of dead processes on its own host at once instead of waiting for them to expire.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from service.ops import metrics
from service.store.database import Database
from service.store.models import AuditEvent, Job, JobState, Study, StudyState, utcnow

HOST = socket.gethostname()


def new_owner() -> str:
    return f"{HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def claim(db: Database, owner: str, lease_s: float, max_attempts: int, now: datetime | None = None) -> Job | None:
    """Take the oldest runnable job for ``owner``; jobs out of attempts are failed on the way."""
    now = now or utcnow()
    runnable = or_(
        Job.state == JobState.QUEUED,
        (Job.state == JobState.RUNNING) & (Job.lease_expires_at < now),
    )
    with db.session() as session:
        candidates = session.scalars(select(Job.id).where(runnable).order_by(Job.id).limit(20)).all()
    for job_id in candidates:
        with db.session() as session:
            taken = session.execute(
                update(Job)
                .where(Job.id == job_id, runnable)
                .values(state=JobState.RUNNING, lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_s),
                        attempts=Job.attempts + 1, started_at=now)
            ).rowcount
            if not taken:
                continue  # another worker was faster
            job = session.get(Job, job_id)
            if job.attempts > max_attempts:
                _finish(session, job, JobState.FAILED, f"gave up after {max_attempts} attempts; last error: {job.error}", now)
                metrics.JOBS_FAILED.labels(error="attempts").inc()
                continue
            session.add(AuditEvent(kind="job_started", study_id=job.study_id, detail={"job": job.id, "attempt": job.attempts}))
            return job
    return None


def extend(db: Database, job_id: int, owner: str, lease_s: float) -> bool:
    """Renew a lease; False when the job is no longer ours (then stop working on it)."""
    with db.session() as session:
        return bool(session.execute(
            update(Job).where(Job.id == job_id, Job.lease_owner == owner, Job.state == JobState.RUNNING)
            .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
        ).rowcount)


def record_error(db: Database, job_id: int, owner: str, error: str) -> None:
    """Note a retryable error and make the job runnable again at once."""
    with db.session() as session:
        session.execute(
            update(Job).where(Job.id == job_id, Job.lease_owner == owner)
            .values(state=JobState.QUEUED, lease_owner=None, lease_expires_at=None, error=error)
        )


def release_dead_leases(db: Database) -> int:
    """Requeue running jobs owned by processes of this host that no longer exist."""
    released = 0
    with db.session() as session:
        for job in session.scalars(select(Job).where(Job.state == JobState.RUNNING, Job.lease_owner.like(f"{HOST}:%"))):
            pid = int(job.lease_owner.split(":")[1])
            if pid == os.getpid() or not _alive(pid):
                job.state, job.lease_owner, job.lease_expires_at = JobState.QUEUED, None, None
                released += 1
    return released


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _finish(session: Session, job: Job, state: JobState, error: str | None, now: datetime) -> None:
    job.state = state
    job.error = error
    job.finished_at = now
    job.lease_owner = None
    job.lease_expires_at = None
    study = session.get(Study, job.study_id)
    # Only the latest version decides the study's state; newer instances keep it receiving.
    if study.state == StudyState.QUEUED and study.versions == job.version:
        study.state = StudyState.DONE if state == JobState.DONE else StudyState.FAILED
    session.add(AuditEvent(kind=f"job_{state.value}", study_id=job.study_id, detail={"job": job.id, "error": error}))


def finish(
    db: Database,
    job_id: int,
    owner: str,
    state: JobState,
    error: str | None = None,
    findings: dict | None = None,
    also: Callable[[Session, Job], None] | None = None,
) -> bool:
    """End a job we own as done or failed, with ``also`` run in the same transaction (the outbox
    rows of its results). False if the lease was lost: then someone else runs it again."""
    with db.session() as session:
        job = session.get(Job, job_id)
        if job is None or job.lease_owner != owner or job.state != JobState.RUNNING:
            return False
        job.findings = findings
        if also is not None:
            also(session, job)
        _finish(session, job, state, error, utcnow())
        return True
