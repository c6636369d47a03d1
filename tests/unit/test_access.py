"""Access and exposure: tokens and roles on the HTTP API, operator actions, TLS and bind settings,
UIDs replaced by tags in log lines, bounded metric labels."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.config import Destination, DicomTransport, load_settings
from service.dicomnet.tls import server_context
from service.errors import SetupError
from service.ops.http import create_app
from service.ops.logging import RedactingFormatter, redact, tag_key, uid_tag
from service.ops.metrics import modality_label
from service.ops.startup import open_database
from service.store import tokens
from service.store.database import Database
from service.store.models import AuditEvent, Delivery, DeliveryState, Job, ResultObject, Study, StudyState, utcnow


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = open_database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    yield database
    database.dispose()


def finished_study(db: Database, uid: str = "1.2.826.0.1.3680043.8.498.77") -> None:
    with db.session() as session:
        study = Study(study_uid=uid, state=StudyState.FAILED, versions=1)
        job = Job(study=study, version=1, last_instance_at=utcnow())
        result = ResultObject(job=job, kind="SEG", sop_uid="1.2.3.4.5.6", sop_class_uid="1.2", path="x.dcm")
        later = utcnow().replace(year=utcnow().year + 1)
        session.add_all([study, job, result, Delivery(result=result, destination="PACS@h:104", next_attempt_at=later)])


def test_tokens_are_stored_hashed_roles_allow_what_they_should_and_revocation_is_immediate(db: Database) -> None:
    reader = tokens.create(db, "grafana", tokens.Role.READER)
    operator = tokens.create(db, "jane.doe", tokens.Role.OPERATOR)
    assert reader.startswith("sgt_") and len(reader) > 40 and reader != operator
    with db.engine.connect() as connection:
        stored = " ".join(str(v) for row in connection.exec_driver_sql("SELECT * FROM api_tokens") for v in row)
    assert reader not in stored and operator not in stored
    assert tokens.authenticate(db, reader) == tokens.Holder("grafana", tokens.Role.READER)
    assert tokens.authenticate(db, reader[:-1]) is None and tokens.authenticate(db, "x" * 10_000) is None
    with pytest.raises(ValueError, match="exists already"):
        tokens.create(db, "grafana", tokens.Role.OPERATOR)
    with pytest.raises(ValueError, match="token name"):
        tokens.create(db, "no spaces", tokens.Role.READER)
    assert tokens.revoke(db, "grafana") and not tokens.revoke(db, "grafana")
    assert tokens.authenticate(db, reader) is None and tokens.any_active(db)


def test_api_needs_a_token_readers_read_operators_act(db: Database) -> None:
    finished_study(db)
    woken = []
    client = TestClient(create_app(db, ready=lambda: True, wake_sender=lambda: woken.append(1)))
    reader = {"Authorization": f"Bearer {tokens.create(db, 'r', tokens.Role.READER)}"}
    operator = {"Authorization": f"Bearer {tokens.create(db, 'o', tokens.Role.OPERATOR)}"}
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
    missing = client.get("/api/studies")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert client.get("/api/studies", headers={"Authorization": "Basic cjpy"}).status_code == 401
    assert client.get("/metrics").status_code == 401 and client.get("/metrics", headers=reader).status_code == 200
    assert client.get("/api/studies", headers=reader).json()[0]["state"] == "failed"
    assert client.get("/docs").status_code == 404

    uid = "1.2.826.0.1.3680043.8.498.77"
    assert client.post(f"/api/studies/{uid}/rerun", headers=reader).status_code == 403
    assert client.post("/api/deliveries/retry", headers=reader).status_code == 403
    assert client.post(f"/api/studies/{uid}/rerun", headers=operator).json() == {"job_id": 2, "version": 2}
    again = client.post(f"/api/studies/{uid}/rerun", headers=operator)
    assert again.status_code == 409 and "queued" in again.json()["detail"]
    assert client.post("/api/studies/9.9.9/rerun", headers=operator).status_code == 404
    assert client.post("/api/deliveries/retry?destination=PACS@h:104", headers=operator).json() == {"due_now": 1}
    assert woken == [1]
    with db.session() as session:
        assert all(d.next_attempt_at <= utcnow() for d in session.query(Delivery).filter_by(state=DeliveryState.PENDING))
        audit = [(e.kind, e.detail["by"]) for e in session.query(AuditEvent).order_by(AuditEvent.id)]
    assert audit == [("operator_rerun", "o"), ("operator_retry", "o")]


def test_open_api_and_metrics_only_when_configured(db: Database) -> None:
    client = TestClient(create_app(db, ready=lambda: True, api_auth=False, metrics_auth=False, docs=True))
    assert client.get("/api/jobs").status_code == 200 and client.get("/metrics").status_code == 200
    assert client.get("/openapi.json").status_code == 200


def test_logs_carry_tags_not_uids(tmp_path: Path) -> None:
    key = tag_key(None, tmp_path / "spool")
    assert tag_key(None, tmp_path / "spool") == key  # kept: the same tags after a restart
    assert (tmp_path / "spool" / "log-tag.key").stat().st_mode & 0o077 == 0
    study, sop = "1.2.826.0.1.3680043.8.498.12345", "2.25.329800735698586629295641978511506172918"
    line = redact(f"spool/{study}/{sop}.dcm from 10.0.0.5 (1.2.840.10008.5.1.4.1.1.4, StrokeGate 0.1.0)", key)
    assert line == f"spool/{uid_tag(study, key)}/{uid_tag(sop, key)}.dcm from 10.0.0.5 (1.2.840.10008.5.1.4.1.1.4, StrokeGate 0.1.0)"
    assert uid_tag(study, key) != uid_tag(study, b"another installation")
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed on %s", (study,), None)
    try:
        raise ValueError(f"bad instance {sop}")
    except ValueError:
        record.exc_info = sys.exc_info()
    formatted = RedactingFormatter(key).format(record)
    assert study not in formatted and sop not in formatted and uid_tag(sop, key) in formatted  # the traceback too


def test_metric_labels_come_from_a_fixed_set() -> None:
    assert [modality_label(m) for m in ("CT", "MR", "SEG", None, "", "M.", "x" * 1000)] == [
        "CT", "MR", "SEG", "unknown", "unknown", "other", "other"]


def test_tls_and_bind_settings(tmp_path: Path) -> None:
    settings = load_settings()
    assert settings.host == settings.http_host == "127.0.0.1" and settings.api_auth and settings.metrics_auth
    assert Destination.parse("PACS@10.0.0.5:2762?send=seg+sr&tls") == Destination(
        ae_title="PACS", host="10.0.0.5", port=2762, send=["seg", "sr"], tls=True)
    assert Destination.parse("PACS@10.0.0.5:2762?tls").tls and not Destination.parse("PACS@10.0.0.5:104").tls
    for bad in ("PACS@h:1?tls=maybe", "PACS@h:1?send=", "PACS@h:1?verify=no"):
        with pytest.raises(ValueError):
            Destination.parse(bad)
    with pytest.raises(ValidationError, match="needs tls_certificate and tls_key"):
        load_settings(dicom_transport="tls")
    with pytest.raises(ValidationError, match="needs tls_ca"):
        load_settings(dicom_transport="both", tls_certificate=tmp_path / "c.pem", tls_key=tmp_path / "k.pem")
    assert load_settings(dicom_transport="both", tls_certificate=tmp_path / "c.pem", tls_key=tmp_path / "k.pem",
                         tls_require_client_certificate=False).dicom_transport is DicomTransport.BOTH
    with pytest.raises(ValidationError, match="both http_tls_certificate and http_tls_key"):
        load_settings(http_tls_certificate=tmp_path / "c.pem")


def test_missing_tls_files_are_a_setup_error(tmp_path: Path) -> None:
    with pytest.raises(SetupError, match="cannot load the DICOM TLS certificate"):
        server_context(tmp_path / "missing.pem", tmp_path / "missing.key", None, False)
