"""NIHSS from the EHR: HL7 ORU^R01 parsing and acknowledgements, the record's rules, and the SR
that names the NIHSS used (and its revisions)."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import hl7
import pytest

from service.clinical.hl7 import handle_message, parse_time
from service.clinical.nihss import NihssReport, choose_nihss, record_nihss, used
from service.errors import InputError
from service.findings import NIHSS_NOT_AVAILABLE, NihssSource
from service.store.database import Database
from service.store.models import Study

ASSESSED = "20261204101500"


def oru(value: str = "14", control: str = "MSG0001", pid: bool = True, obx: bool = True, code: str = "72089-6",
        status: str = "F", msh15: str = "", msh16: str = "", kind: str = "ORU^R01", when: str = ASSESSED) -> str:
    segments = [f"MSH|^~\\&|EHR|HOSP|STROKEGATE|SG|20261204102000||{kind}|{control}|P|2.5.1|||{msh15}|{msh16}"]
    if pid:
        segments.append("PID|1||SGPH00000002^^^HOSP^MR||DOE^JANE||19500101|F")
    segments.append(f"OBR|1|||{code}^NIHSS^LN|||{when}")
    segments.append("OBX|1|NM|8867-4^Heart rate^LN||80|/min|||||F")
    if obx:
        segments.append(f"OBX|2|NM|{code}^NIH stroke scale total score^LN||{value}|{{score}}|||||{status}|||{when}")
    return "\r".join(segments)


class Store:
    def __init__(self) -> None:
        self.reports: list[NihssReport] = []

    def __call__(self, report: NihssReport) -> bool:
        new = report.source_id not in {r.source_id for r in self.reports}
        self.reports.append(report)
        return new


def answer(message: str, store: Store | None = None) -> hl7.Message:
    text = handle_message(message, store or Store())
    assert text is not None
    return hl7.parse(text)


def test_an_oru_with_nihss_14_is_stored_and_acknowledged_aa() -> None:
    store = Store()
    ack = answer(oru(), store)
    assert str(ack.segment("MSH")(9)) == "ACK^R01^ACK"
    assert str(ack.segment("MSA")(1)) == "AA" and str(ack.segment("MSA")(2)) == "MSG0001"
    (report,) = store.reports
    assert (report.patient_id, report.patient_issuer, report.value) == ("SGPH00000002", "HOSP", 14)
    assert report.source is NihssSource.HL7 and report.source_id == "MSG0001"
    assert report.assessed_at == datetime(2026, 12, 4, 10, 15)


def test_the_nihss_panel_code_is_accepted_too() -> None:
    store = Store()
    assert str(answer(oru(code="70182-1"), store).segment("MSA")(1)) == "AA"
    assert store.reports[0].value == 14


@pytest.mark.parametrize(("message", "reason", "code"), [
    (oru(pid=False), "no PID segment", "101"),
    (oru(obx=False), "no OBX with LOINC 72089-6 or 70182-1", "101"),
    (oru(value="55"), "out of range (0 to 42)", "103"),
    (oru(value="severe"), "is not a number", "102"),
    (oru(value="14.5"), "not a whole number", "102"),
    (oru(status="D"), "deletions are not supported", "103"),
    (oru(when="2026-12-04", control="X"), "not an HL7 timestamp", "102"),
    (oru().replace("SGPH00000002", "P" * 65), "patient identifier is 65 characters long", "207"),
])
def test_bad_content_gets_ae_with_the_reason_in_msa_and_err(message: str, reason: str, code: str) -> None:
    store = Store()
    ack = answer(message, store)
    assert str(ack.segment("MSA")(1)) == "AE" and str(ack.segment("ERR")(3)(1)(1)) == code
    assert reason in str(ack.segment("MSA")(3)).replace("\\S\\", "^")
    assert reason in str(ack.segment("ERR")(8)).replace("\\S\\", "^")
    assert store.reports == []


def test_another_message_type_gets_ar_and_unreadable_text_too() -> None:
    ack = answer(oru(kind="ADT^A01"))
    assert str(ack.segment("MSA")(1)) == "AR" and "takes ORU^R01" in str(ack.segment("MSA")(3)).replace("\\S\\", "^")
    ack = answer("this is not HL7")
    assert str(ack.segment("MSA")(1)) == "AR"


def test_a_header_with_its_own_delimiters_is_still_answered() -> None:
    """Found by fuzzing (benchmarks/fuzz.py --harness hl7): MSH-2 'c~\\&' made MSH-9 a plain
    string, and building the ACK raised, so the sender got no answer at all."""
    store = Store()
    ack = answer(oru().replace("MSH|^~\\&|", "MSH|c~\\&|", 1), store)
    assert str(ack.segment("MSA")(1)) in ("AA", "AE", "AR")


def test_enhanced_mode_answers_as_msh_15_and_16_ask() -> None:
    assert handle_message(oru(msh15="NE", msh16="NE"), Store()) is None
    assert handle_message(oru(msh15="NE", msh16="ER"), Store()) is None  # success, errors only
    ack = answer(oru(value="55", msh15="NE", msh16="ER"))
    assert str(ack.segment("MSA")(1)) == "AE"
    ack = answer(oru(msh15="AL", msh16="NE"))
    assert str(ack.segment("MSA")(1)) == "CA"


def test_hl7_times_become_utc() -> None:
    assert parse_time("202612041015+0100") == datetime(2026, 12, 4, 9, 15)
    assert parse_time("20261204101530.5-0500") == datetime(2026, 12, 4, 15, 15, 30, 500000)
    with pytest.raises(InputError):
        parse_time("20261304")


def report(value: int, minutes: int, source_id: str, issuer: str | None = None, patient: str = "P1") -> NihssReport:
    return NihssReport(patient, issuer, value, datetime(2026, 12, 4, 10, 0) + timedelta(minutes=minutes),
                       NihssSource.REST, source_id)


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    database.upgrade()
    yield database
    database.dispose()


def test_the_record_rejects_what_it_cannot_store() -> None:
    with pytest.raises(InputError, match="out of range"):
        report(43, 0, "a")
    with pytest.raises(InputError, match="patient identifier is missing"):
        report(3, 0, "a", patient="")
    with pytest.raises(InputError, match="control characters"):
        report(3, 0, "a", patient="P\n1")


def test_every_record_is_kept_once_and_the_latest_assessed_before_the_analysis_is_used(db: Database) -> None:
    first, new = record_nihss(db, report(14, 0, "a"))
    assert new
    assert record_nihss(db, report(14, 0, "a")) == (first, False)  # the same message again
    correction, _ = record_nihss(db, report(12, 0, "b"))  # same assessment, corrected
    record_nihss(db, report(30, 120, "c"))  # assessed after the analysis: kept, not used
    record_nihss(db, report(7, 5, "other", patient="P2"))
    with db.session() as session:
        study = Study(study_uid="1.2.3", patient_id="P1")
        analysis = datetime(2026, 12, 4, 11, 0)
        chosen = choose_nihss(session, study, analysis)
        assert chosen.id == correction and used(chosen).value == 12
        assert choose_nihss(session, study, datetime(2026, 12, 4, 9, 0)) is None  # none assessed before


def test_issuers_must_agree_when_both_are_given(db: Database) -> None:
    record_nihss(db, report(5, 0, "x", issuer="OTHERHOSP"))
    record_nihss(db, report(9, 1, "y", issuer=None))
    record_nihss(db, report(2, 2, "z", issuer="HOSP"))
    later = datetime(2026, 12, 5)
    with db.session() as session:
        assert choose_nihss(session, Study(patient_id="P1", patient_issuer="OTHERHOSP"), later).value == 9
        assert choose_nihss(session, Study(patient_id="P1", patient_issuer="HOSP"), later).value == 2
        assert choose_nihss(session, Study(patient_id="P1", patient_issuer=None), later).value == 2


def test_findings_summary_says_when_there_is_no_nihss() -> None:
    from service.findings import nihss_summary

    assert nihss_summary(None) == {"available": False, "note": NIHSS_NOT_AVAILABLE}


def test_the_rest_api_takes_an_nihss_from_an_operator_and_shows_the_study_s_records(db: Database) -> None:
    from fastapi.testclient import TestClient

    from service.ops.http import create_app
    from service.store import tokens
    from service.store.models import ClinicalResult, Job, utcnow

    reader = tokens.create(db, "grafana", tokens.Role.READER)
    operator = tokens.create(db, "ehr-bridge", tokens.Role.OPERATOR)
    client = TestClient(create_app(db, lambda: True))
    body = {"patient_id": "P1", "patient_issuer": "HOSP", "value": 14, "assessed_at": "2026-12-04T10:15:00+01:00",
            "request_id": "r-1"}

    def post(payload: dict, token: str = operator) -> object:
        return client.post("/api/nihss", json=payload, headers={"Authorization": f"Bearer {token}"})

    assert post(body, reader).status_code == 403
    assert post(body).status_code == 201
    again = post(body)
    assert again.status_code == 200 and again.json() == {"request_id": "r-1", "stored": False}
    for bad, reason in (({**body, "value": 55}, "less than or equal to 42"), ({**body, "value": "x"}, "integer"),
                        ({**body, "assessed_at": "2026-12-04T10:15:00"}, "timezone"),
                        ({**body, "patient_id": ""}, "at least 1 character")):
        answer = post(bad)
        assert answer.status_code == 422 and reason in answer.text, answer.text
    assert post({**body, "patient_id": "P\x01", "request_id": "r-2"}).json()["detail"] == \
        "the patient identifier holds control characters"

    with db.session() as session:
        study = Study(study_uid="1.2.5", patient_id="P1", patient_issuer="HOSP", versions=1)
        job = Job(study=study, version=1, last_instance_at=utcnow())
        session.add_all([study, job])
        session.flush()
        session.add(ClinicalResult(job_id=job.id, revision=1, nihss_id=None))
    shown = client.get("/api/studies/1.2.5/nihss", headers={"Authorization": f"Bearer {reader}"}).json()
    assert shown["nihss_used"] is None and shown["note"] == NIHSS_NOT_AVAILABLE
    (record,) = shown["records"]
    assert (record["value"], record["source"], record["assessed_at"]) == (14, "rest", "2026-12-04T09:15:00.000Z")
    assert record["source_id"] == "ehr-bridge:r-1" and shown["clinical_results"][0]["revision"] == 1
    assert client.get("/api/studies/9.9/nihss", headers={"Authorization": f"Bearer {reader}"}).status_code == 404


def test_the_issuer_of_patient_id_is_read_and_checked_at_the_edge() -> None:
    from pydicom.dataset import Dataset, FileMetaDataset

    from service.ingest.header import received_instance

    header = Dataset()
    header.file_meta = FileMetaDataset()
    header.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    header.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    header.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    header.StudyInstanceUID, header.SeriesInstanceUID = "1.2.3", "1.2.3.1"
    header.PatientID, header.IssuerOfPatientID = "P1", "HOSP"
    assert received_instance(header, "x.dcm", 10, None).patient_issuer == "HOSP"
    header.IssuerOfPatientID = "H" * 65
    with pytest.raises(InputError, match="IssuerOfPatientID is 65 characters long"):
        received_instance(header, "x.dcm", 10, None)
