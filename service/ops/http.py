"""HTTP for operators: /healthz, /readyz, /metrics, a JSON API and the operator's actions.

``/healthz`` and ``/readyz`` are open (orchestrators probe them); ``/api`` needs a bearer token
(``strokegate token create``): a reader token reads, an operator token also re-runs studies and
retries deliveries; ``/metrics`` needs a token unless configured open. The API shows database ids,
states, times, volumes and reasons; study UIDs and accession numbers are shown because an operator
needs them to find a study in the PACS, patient names never.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

import uuid

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from sqlalchemy import func, select, text
from sqlalchemy.orm import selectinload

import service
from service.clinical.nihss import NihssReport, as_utc, patient_records, record_nihss as store_nihss
from service.errors import InputError
from service.findings import NIHSS_MAX, NIHSS_NOT_AVAILABLE, NihssSource
from service.ops.actions import ActionRefused, rerun_study, retry_deliveries
from service.store import tokens
from service.store.database import Database
from service.store.models import ClinicalResult, Delivery, Job, NihssRecord, Study


def _time(value: datetime | None) -> str | None:
    return value.isoformat(timespec="milliseconds") + "Z" if value else None


def _job(job: Job) -> dict:
    return {
        "id": job.id, "study_id": job.study_id, "version": job.version, "state": job.state.value,
        "attempts": job.attempts, "created_at": _time(job.created_at), "started_at": _time(job.started_at),
        "finished_at": _time(job.finished_at), "delivered_at": _time(job.delivered_at), "error": job.error,
        "findings": job.findings,
    }


def _delivery(d: Delivery) -> dict:
    return {
        "id": d.id, "job_id": d.result.job_id, "kind": d.result.kind, "sop_instance_uid": d.result.sop_uid,
        "destination": d.destination, "state": d.state.value, "attempts": d.attempts,
        "next_attempt_at": _time(d.next_attempt_at), "sent_at": _time(d.sent_at), "last_error": d.last_error,
    }


def _study(study: Study, detail: bool) -> dict:
    out = {
        "id": study.id, "study_instance_uid": study.study_uid, "accession_number": study.accession_number,
        "state": study.state.value, "versions": study.versions,
        "first_received_at": _time(study.first_received_at), "last_received_at": _time(study.last_received_at),
        "instances": sum(s.instance_count for s in study.series), "purged_at": _time(study.purged_at),
    }
    latest = study.jobs[-1] if study.jobs else None
    out["error"] = latest.error if latest else None
    if detail:
        out["series"] = [
            {"series_instance_uid": s.series_uid, "modality": s.modality, "description": s.description,
             "instances": s.instance_count, "expected_instances": s.expected_instances}
            for s in study.series
        ]
        out["jobs"] = [_job(j) for j in study.jobs]
    return out


class NihssPost(BaseModel):
    """``POST /api/nihss``: one NIHSS for a patient, as the EHR or a clinician gives it."""

    model_config = ConfigDict(extra="forbid")

    patient_id: str = Field(min_length=1, max_length=64, description="the PatientID of the patient's images")
    patient_issuer: str | None = Field(None, min_length=1, max_length=64, description="IssuerOfPatientID, if known")
    value: int = Field(ge=0, le=NIHSS_MAX, description="NIHSS total score")
    assessed_at: AwareDatetime = Field(description="when the NIHSS was assessed, ISO 8601 with its UTC offset")
    request_id: str | None = Field(None, min_length=1, max_length=100, description="the sender's id: a request sent "
                                   "again with the same id is stored once")


def _record(record: NihssRecord, used_id: int | None) -> dict:
    return {
        "id": record.id, "value": record.value, "source": record.source.value, "source_id": record.source_id,
        "patient_issuer": record.patient_issuer, "assessed_at": _time(record.assessed_at),
        "received_at": _time(record.received_at), "detail": record.detail, "used": record.id == used_id,
    }


log = logging.getLogger(__name__)

ANONYMOUS = tokens.Holder("(no token: api_auth is off)", tokens.Role.OPERATOR)


def create_app(
    db: Database, ready: Callable[[], bool], *, api_auth: bool = True, metrics_auth: bool = True, docs: bool = False,
    wake_sender: Callable[[], None] = lambda: None, record_nihss: Callable[[NihssReport], bool] | None = None,
) -> FastAPI:
    """The operator API over ``db``; ``ready`` says whether the DICOM receiver and workers run;
    ``api_auth`` and ``metrics_auth``: whether /api and /metrics need a token; ``docs``: serve
    /docs and /openapi.json; ``wake_sender`` makes the sender look for due deliveries now;
    ``record_nihss`` stores a posted NIHSS (default: into ``db`` alone)."""
    if record_nihss is None:
        def record_nihss(report: NihssReport) -> bool:
            return store_nihss(db, report)[1]

    app = FastAPI(
        title="StrokeGate", version=service.__version__, description="Research use only, not for diagnosis.",
        docs_url="/docs" if docs else None, redoc_url=None, openapi_url="/openapi.json" if docs else None,
    )
    bearer = HTTPBearer(auto_error=False, description="strokegate token create --role reader|operator --name NAME")

    def holder(credentials: HTTPAuthorizationCredentials | None, needed: tokens.Role, required: bool) -> tokens.Holder:
        if not required:
            return ANONYMOUS
        if credentials is None:
            raise HTTPException(401, "a bearer token is required (strokegate token create)", headers={"WWW-Authenticate": "Bearer"})
        found = tokens.authenticate(db, credentials.credentials)
        if found is None:
            raise HTTPException(401, "unknown or revoked token", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        if not found.role.allows(needed):
            raise HTTPException(403, f"this needs an {needed.value} token; {found.name!r} is a {found.role.value} token")
        return found

    def reader(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> tokens.Holder:
        return holder(credentials, tokens.Role.READER, api_auth)

    def operator(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> tokens.Holder:
        return holder(credentials, tokens.Role.OPERATOR, api_auth)

    def scraper(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> tokens.Holder:
        return holder(credentials, tokens.Role.READER, metrics_auth)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(response: Response) -> dict:
        try:
            with db.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            database = True
        except Exception:  # noqa: BLE001 - any failure means not ready
            database = False
        ok = database and ready()
        response.status_code = 200 if ok else 503
        return {"status": "ready" if ok else "not ready", "database": database, "services": ready()}

    @app.get("/metrics", dependencies=[Depends(scraper)])
    def metrics_endpoint() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    api = APIRouter(prefix="/api", dependencies=[Depends(reader)])

    @api.get("/studies")
    def studies(limit: int = Query(100, ge=1, le=1000), state: str | None = None) -> list[dict]:
        with db.session() as session:
            query = select(Study).options(selectinload(Study.series), selectinload(Study.jobs)).order_by(Study.id.desc()).limit(limit)
            if state:
                query = query.where(Study.state == state)
            return [_study(s, detail=False) for s in session.scalars(query)]

    @api.get("/studies/{study_uid}")
    def study(study_uid: str) -> dict:
        with db.session() as session:
            found = session.scalar(
                select(Study).where(Study.study_uid == study_uid).options(selectinload(Study.series), selectinload(Study.jobs))
            )
            if found is None:
                raise HTTPException(404, f"no study with StudyInstanceUID {study_uid}")
            return _study(found, detail=True)

    @api.post("/nihss", status_code=201)
    def post_nihss(posted: NihssPost, response: Response, who: tokens.Holder = Depends(operator)) -> dict:
        """Store an NIHSS for a patient; a study of the patient analysed already gets a new report
        naming it when it is the one the study should use."""
        request_id = posted.request_id or uuid.uuid4().hex
        try:
            report = NihssReport(
                patient_id=posted.patient_id, patient_issuer=posted.patient_issuer, value=posted.value,
                assessed_at=as_utc(posted.assessed_at), source=NihssSource.REST, source_id=f"{who.name}:{request_id}"[:128],
                detail=f"posted by {who.name}",
            )
            new = record_nihss(report)
        except InputError as error:
            raise HTTPException(422, str(error)) from None
        if not new:
            response.status_code = 200
        log.info("%s posted NIHSS %d (request %s, %s)", who.name, posted.value, request_id, "new" if new else "seen before")
        return {"request_id": request_id, "stored": new}

    @api.get("/studies/{study_uid}/nihss")
    def study_nihss(study_uid: str) -> dict:
        """The NIHSS records of the study's patient, the one its results name, and every version of
        its clinical result."""
        with db.session() as session:
            found = session.scalar(select(Study).where(Study.study_uid == study_uid))
            if found is None:
                raise HTTPException(404, f"no study with StudyInstanceUID {study_uid}")
            job = session.scalar(select(Job).where(Job.study_id == found.id).order_by(Job.version.desc()).limit(1))
            revisions = [] if job is None else list(session.scalars(
                select(ClinicalResult).where(ClinicalResult.job_id == job.id).order_by(ClinicalResult.revision)
            ))
            used_id = revisions[-1].nihss_id if revisions else None
            records = patient_records(session, found)
            return {
                "study_instance_uid": study_uid,
                "version": job.version if job else None,
                "nihss_used": next((_record(r, used_id) for r in records if r.id == used_id), None),
                "note": None if used_id is not None or not revisions else NIHSS_NOT_AVAILABLE,
                "records": [_record(r, used_id) for r in records],
                "clinical_results": [
                    {"revision": r.revision, "nihss_record": r.nihss_id, "created_at": _time(r.created_at),
                     "sop_instance_uid": r.result.sop_uid if r.result else None}
                    for r in revisions
                ],
            }

    @api.get("/jobs")
    def jobs(limit: int = Query(100, ge=1, le=1000)) -> list[dict]:
        with db.session() as session:
            return [_job(j) for j in session.scalars(select(Job).order_by(Job.id.desc()).limit(limit))]

    @api.get("/deliveries")
    def deliveries(limit: int = Query(100, ge=1, le=1000)) -> list[dict]:
        with db.session() as session:
            query = select(Delivery).options(selectinload(Delivery.result)).order_by(Delivery.id.desc()).limit(limit)
            return [_delivery(d) for d in session.scalars(query)]

    @api.get("/summary")
    def summary() -> dict:
        with db.session() as session:
            def count(column) -> dict[str, int]:  # noqa: ANN001
                return {state.value: n for state, n in session.execute(select(column, func.count()).group_by(column))}

            return {"studies": count(Study.state), "jobs": count(Job.state), "deliveries": count(Delivery.state)}

    @api.post("/studies/{study_uid}/rerun", status_code=202)
    def rerun(study_uid: str, who: tokens.Holder = Depends(operator)) -> dict:
        """Analyse the study again from its spooled instances: a new version, new result objects."""
        try:
            queued = rerun_study(db, study_uid, who.name)
        except ActionRefused as refused:
            raise HTTPException(409, f"cannot re-run this study: {refused}") from None
        if queued is None:
            raise HTTPException(404, f"no study with StudyInstanceUID {study_uid}")
        log.info("%s re-ran study %s: job %d, version %d", who.name, study_uid, queued.job_id, queued.version)
        return {"job_id": queued.job_id, "version": queued.version}

    @api.post("/deliveries/retry")
    def retry(destination: str | None = Query(None, max_length=128), who: tokens.Holder = Depends(operator)) -> dict:
        """Send the pending deliveries (to one destination, AE@host:port) now instead of after their backoff."""
        count = retry_deliveries(db, who.name, destination)
        log.info("%s made %d pending deliveries due now (destination: %s)", who.name, count, destination or "all")
        wake_sender()
        return {"due_now": count}

    app.include_router(api)
    return app
