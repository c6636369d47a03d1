"""What an operator can do through the API, each recorded in the audit trail with the token's name:
re-run a study's analysis, and send the pending deliveries now instead of after their backoff."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select, update

from service.store.database import Database
from service.store.models import AuditEvent, Delivery, DeliveryState, Job, Study, StudyState, utcnow


class ActionRefused(Exception):
    """The action does not apply to the object in its present state; the message says why."""


@dataclass(frozen=True)
class Rerun:
    job_id: int
    version: int


def rerun_study(db: Database, study_uid: str, by: str) -> Rerun | None:
    """Queue a new analysis version of a study from its spooled instances (new result objects,
    delivered like any version's). None when there is no such study; ActionRefused while it is
    still receiving or queued, or once its instances were purged from the spool."""
    now = utcnow()
    with db.session() as session:
        study = session.scalar(select(Study).where(Study.study_uid == study_uid))
        if study is None:
            return None
        if study.state in (StudyState.RECEIVING, StudyState.QUEUED):
            raise ActionRefused(f"the study is {study.state.value}: it is analysed when that ends")
        if study.purged_at is not None:
            raise ActionRefused("its instances were purged from the spool (retention_hours): send the study again")
        study.versions += 1
        study.state = StudyState.QUEUED
        job = Job(study=study, version=study.versions, last_instance_at=study.last_received_at, created_at=now)
        session.add(job)
        session.flush()
        session.add(AuditEvent(kind="operator_rerun", study_id=study.id, detail={"by": by, "job": job.id, "version": job.version}))
        return Rerun(job.id, job.version)


def retry_deliveries(db: Database, by: str, destination: str | None = None) -> int:
    """Make every pending or uncertain delivery (to ``destination`` only, when given) due now, e.g. once a PACS
    is back, instead of after its backoff; returns how many. Wake the sender to send them at once."""
    now = utcnow()
    with db.session() as session:
        query = update(Delivery).where(Delivery.state.in_((DeliveryState.PENDING, DeliveryState.UNCERTAIN)))
        if destination is not None:
            query = query.where(Delivery.destination == destination)
        count = session.execute(query.values(next_attempt_at=now)).rowcount
        session.add(AuditEvent(kind="operator_retry", detail={"by": by, "destination": destination, "deliveries": count}))
        return count
