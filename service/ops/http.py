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

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select, text
from sqlalchemy.orm import selectinload

import service
from service.ops.actions import ActionRefused, rerun_study, retry_deliveries
from service.store import tokens
from service.store.database import Database
from service.store.models import Delivery, Job, Study


def _time(value: datetime | None) -> str | None:
    return value.isoformat(timespec="milliseconds") + "Z" if value else None


def _job(job: Job) -> dict:
    return {
        "id": job.id, "study_id": job.study_id, "version": job.version, "state": job.state.value,
        "attempts": job.attempts, "created_at": _time(job.created_at), "started_at": _time(job.started_at),
        "finished_at": _time(job.finished_at), "error": job.error, "findings": job.findings,
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


log = logging.getLogger(__name__)

ANONYMOUS = tokens.Holder("(no token: api_auth is off)", tokens.Role.OPERATOR)


def create_app(
    db: Database, ready: Callable[[], bool], *, api_auth: bool = True, metrics_auth: bool = True, docs: bool = False,
    wake_sender: Callable[[], None] = lambda: None,
) -> FastAPI:
    """The operator API over ``db``; ``ready`` says whether the DICOM receiver and workers run;
    ``api_auth`` and ``metrics_auth``: whether /api and /metrics need a token; ``docs``: serve
    /docs and /openapi.json; ``wake_sender`` makes the sender look for due deliveries now."""
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
