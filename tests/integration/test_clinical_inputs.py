"""NIHSS in through its real ways: the `hl7` package's MLLP client against our listener, and our
FHIR client against a FHIR R4 server made of fhir.resources models."""

from __future__ import annotations

import socket
from datetime import datetime
from pathlib import Path

import hl7
import httpx
import pytest
from hl7.client import MLLPClient
from prometheus_client import generate_latest
from sqlalchemy import func, select

from dicom_tools import free_port
from fhir_server import FhirServer, nihss_observation
from service.clinical.fhir import FhirError, FhirPoller, search_nihss
from service.clinical.hl7 import Hl7Listener
from service.clinical.nihss import record_nihss
from service.ops import metrics
from service.store.database import Database
from service.store.models import NihssRecord, Study

pytestmark = pytest.mark.timeout(120)


def oru(value: str = "14", control: str = "MSG0001", patient: str = "PAT1", pid: bool = True, obx: bool = True) -> str:
    segments = [f"MSH|^~\\&|EHR|HOSP|STROKEGATE|SG|20261204102000||ORU^R01|{control}|P|2.5.1"]
    if pid:
        segments.append(f"PID|1||{patient}^^^HOSP^MR||DOE^JANE")
    segments.append("OBR|1|||72089-6^NIHSS^LN|||20261204101500")
    if obx:
        segments.append(f"OBX|1|NM|72089-6^NIH stroke scale total score^LN||{value}|{{score}}|||||F")
    return "\r".join(segments) + "\r"


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    database.upgrade()
    yield database
    database.dispose()


@pytest.fixture
def listener(db: Database):  # noqa: ANN201
    server = Hl7Listener("127.0.0.1", 0, lambda report: record_nihss(db, report)[1], max_message_bytes=4096,
                         timeout_s=5)
    server.start()
    yield server
    server.stop()


def ack_of(raw: bytes) -> hl7.Message:
    assert raw.startswith(b"\x0b") and raw.endswith(b"\x1c\x0d"), raw
    return hl7.parse(raw[1:-2].decode())


def count(db: Database) -> int:
    with db.session() as session:
        return session.scalar(select(func.count()).select_from(NihssRecord))


def test_the_mllp_client_gets_aa_and_the_nihss_is_stored_once(db: Database, listener: Hl7Listener) -> None:
    with MLLPClient("127.0.0.1", listener.port) as client:
        first = ack_of(client.send_message(oru()))
        again = ack_of(client.send_message(oru()))  # the sender did not see our ACK and resends
        other = ack_of(client.send_message(oru("22", control="MSG0002")))
    assert [str(a.segment("MSA")(1)) for a in (first, again, other)] == ["AA", "AA", "AA"]
    with db.session() as session:
        rows = session.scalars(select(NihssRecord).order_by(NihssRecord.id)).all()
        assert [(r.patient_id, r.patient_issuer, r.value, r.source_id) for r in rows] == [
            ("PAT1", "HOSP", 14, "MSG0001"), ("PAT1", "HOSP", 22, "MSG0002")]


@pytest.mark.parametrize(("message", "reason"), [
    (oru(pid=False, control="E1"), "no PID segment"),
    (oru(obx=False, control="E2"), "no OBX with LOINC"),
    (oru("55", control="E3"), "NIHSS value 55 is out of range"),
    (oru("high", control="E4"), "is not a number"),
])
def test_malformed_messages_get_ae_with_the_reason_and_the_listener_goes_on(
    db: Database, listener: Hl7Listener, message: str, reason: str, caplog: pytest.LogCaptureFixture,
) -> None:
    with MLLPClient("127.0.0.1", listener.port) as client:
        ack = ack_of(client.send_message(message))
        assert str(ack.segment("MSA")(1)) == "AE" and reason in str(ack.segment("MSA")(3))
        assert str(ack.segment("ERR")(3)(1)(1)) in ("101", "102", "103")
        assert str(ack_of(client.send_message(oru())).segment("MSA")(1)) == "AA"
    assert reason in caplog.text
    assert count(db) == 1


def test_broken_and_oversized_frames_get_ar_and_the_listener_goes_on(db: Database, listener: Hl7Listener) -> None:
    with MLLPClient("127.0.0.1", listener.port) as client:
        ack = ack_of(client.send(b"MSH|^~\\&|no start block\r\x1c\r"))
    assert str(ack.segment("MSA")(1)) == "AR" and "broken MLLP frame" in str(ack.segment("MSA")(3))
    with MLLPClient("127.0.0.1", listener.port) as client:
        ack = ack_of(client.send(b"\x0b" + oru().encode() + b"X" * 5000 + b"\x1c\r"))
    assert str(ack.segment("MSA")(1)) == "AR" and "longer than 4096 bytes" in str(ack.segment("MSA")(3))
    with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as sock:  # cut inside a frame
        sock.sendall(b"\x0b" + oru().encode()[:40])
    with MLLPClient("127.0.0.1", listener.port) as client:
        assert str(ack_of(client.send_message(oru())).segment("MSA")(1)) == "AA"
    assert count(db) == 1
    assert listener.loop.up
    assert b'strokegate_loop_up{loop="hl7"} 1.0' in generate_latest(metrics.REGISTRY)


@pytest.fixture
def fhir():  # noqa: ANN201
    server = FhirServer().start()
    yield server
    server.stop()


def test_the_fhir_search_finds_real_observations_and_versions(fhir: FhirServer) -> None:
    effective = datetime(2026, 12, 4, 10, 15)
    created = fhir.create(nihss_observation("PAT1", 14, effective))
    fhir.create(nihss_observation("PAT1", 9, effective, code="70182-1"))
    fhir.create(nihss_observation("PAT2", 3, effective))
    fhir.create(nihss_observation("PAT1", 30, effective, status="entered-in-error"))
    with httpx.Client(timeout=5) as client:
        found = search_nihss(client, fhir.url, "PAT1")
        assert sorted(r.value for r in found) == [9, 14]
        assert {r.source_id for r in found} >= {f"Observation/{created.id}/_history/1"}
        assert all(r.assessed_at == effective for r in found)
        fhir.update(created.id, nihss_observation("PAT1", 16, effective, status="corrected"))
        assert f"Observation/{created.id}/_history/2" in {r.source_id for r in search_nihss(client, fhir.url, "PAT1")}


def test_the_poller_stores_what_it_finds_for_recent_studies_and_survives_a_server_down(db: Database, fhir: FhirServer) -> None:
    with db.session() as session:
        session.add(Study(study_uid="1.2.3", patient_id="PAT1"))
        session.add(Study(study_uid="1.2.4", patient_id="OLD", first_received_at=datetime(2020, 1, 1)))
    fhir.create(nihss_observation("PAT1", 14, datetime(2026, 12, 4, 10, 15)))
    fhir.create(nihss_observation("OLD", 5, datetime(2020, 1, 1)))
    poller = FhirPoller(db, fhir.url, lambda report: record_nihss(db, report)[1], search_for_s=3600, poll_s=1,
                        timeout_s=2)
    with httpx.Client(timeout=2) as client:
        assert poller.poll(client) == 1
        assert poller.poll(client) == 0  # the same version again: not a second record
    assert count(db) == 1
    down = FhirPoller(db, f"http://127.0.0.1:{free_port()}", lambda report: True, search_for_s=3600, poll_s=1,
                      timeout_s=1)
    with httpx.Client(timeout=1) as client:
        assert down.poll(client) == 0
        with pytest.raises(FhirError, match="ConnectError"):
            search_nihss(client, down.base_url, "PAT1")
        fhir.delay_s = 2  # slower than the client's timeout: it gives up instead of waiting
        with pytest.raises(FhirError, match="Timeout"):
            search_nihss(client, fhir.url, "PAT1")
