"""The job rows as a queue: claims under a lease, so a job is never run twice at once and a crashed
worker's job is retried, never lost.

A claim locks the oldest runnable row with ``SELECT ... FOR UPDATE SKIP LOCKED`` (PostgreSQL: claims
by several processes never wait on each other nor take the same row) and takes it with a conditional
UPDATE (queued, or running with an expired lease), which alone keeps SQLite, where there are no row
locks, correct. Owners are ``host:pid:token``; a lease held by a process of this host that no
longer exists is released at once instead of waiting for it to expire.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, or_, select, update
from sqlalchemy.orm import Session

from service.ops import metrics
from service.ops.owners import HOST, owner_gone
from service.store.database import Database
from service.store.models import AuditEvent, Job, JobState, Study, StudyState, utcnow


def runnable(now: datetime) -> ColumnElement[bool]:
    """Jobs a worker may take at ``now``: queued, or running under an expired lease."""
    return or_(
        Job.state == JobState.QUEUED,
        (Job.state == JobState.RUNNING) & (Job.lease_expires_at < now),
    )


def claim(
    db: Database, owner: str, lease_s: float, max_attempts: int, now: datetime | None = None, job_id: int | None = None,
) -> Job | None:
    """Take the oldest runnable job (only job ``job_id`` where given) for ``owner``; jobs out of
    attempts are failed on the way. None: nothing runnable (or every runnable row is being claimed
    by another worker right now)."""
    now = now or utcnow()
    for _ in range(50):  # each pass takes a row or fails one out of attempts; SQLite races retry
        with db.session() as session:
            query = select(Job).where(runnable(now)).order_by(Job.id).limit(1).with_for_update(skip_locked=True)
            if job_id is not None:
                query = query.where(Job.id == job_id)
            job = session.scalars(query).first()
            if job is None:
                return None
            taken = session.execute(
                update(Job)
                .where(Job.id == job.id, runnable(now))
                .values(state=JobState.RUNNING, lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_s),
                        attempts=Job.attempts + 1, started_at=now)
            ).rowcount
            if not taken:
                continue  # SQLite: another process was faster
            session.refresh(job)
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
    """At a process's start: requeue running jobs owned by processes of this host that no longer
    exist (a lease of our own pid is from an earlier process that had it)."""
    released = 0
    with db.session() as session:
        for job in session.scalars(select(Job).where(Job.state == JobState.RUNNING, Job.lease_owner.like(f"{HOST}:%"))):
            if owner_gone(job.lease_owner, own_pid_gone=True):
                job.state, job.lease_owner, job.lease_expires_at = JobState.QUEUED, None, None
                released += 1
    return released


def release_if_owner_gone(db: Database, job_id: int) -> bool:
    """Requeue job ``job_id`` when it runs under the lease of a process of this host that no longer
    exists (a worker killed mid-job: its job need not wait for the lease to expire)."""
    with db.session() as session:
        job = session.get(Job, job_id, with_for_update={"skip_locked": True})
        if job is None or job.state != JobState.RUNNING or not job.lease_owner or not owner_gone(job.lease_owner, own_pid_gone=False):
            return False
        job.state, job.lease_owner, job.lease_expires_at = JobState.QUEUED, None, None
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


def while_owned(db: Database, job_id: int, owner: str, action: Callable[[Session, Job], None]) -> bool:
    """Run ``action`` in one transaction if job ``job_id`` still runs under our lease (the SEG and
    SR of a job going into the outbox before the job is done); False, and nothing done, if not."""
    with db.session() as session:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None or job.lease_owner != owner or job.state != JobState.RUNNING:
            return False
        action(session, job)
        return True


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
        job = session.get(Job, job_id, with_for_update=True)
        if job is None or job.lease_owner != owner or job.state != JobState.RUNNING:
            return False
        job.findings = findings
        if also is not None:
            also(session, job)
        _finish(session, job, state, error, utcnow())
        return True
