"""The NIHSS record: validated on the way in, kept with its provenance, joined to studies.

Every NIHSS received is a new row (a correction too; a message or resource version received twice
is one row). A study uses the record of its patient assessed last before the study's analysis
started, the latest received among equal assessment times (a correction of that assessment).
A record matches a study when the patient identifiers are equal and their issuers are equal,
or one of the two does not say its issuer (HL7 PID-3.4 or DICOM IssuerOfPatientID missing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.errors import InputError
from service.findings import NIHSS_MAX, NihssSource, NihssUsed
from service.store.database import Database
from service.store.models import NihssRecord, Study, utcnow

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_IDENTIFIER = 64  # DICOM LO, the width of the PatientID and IssuerOfPatientID columns
MAX_SOURCE_ID = 128
MAX_DETAIL = 512


class ScoreOutOfRange(InputError):
    """An NIHSS that is a whole number but not 0-42."""


@dataclass(frozen=True)
class NihssReport:
    """One NIHSS as a sender gave it, before it is stored."""

    patient_id: str
    patient_issuer: str | None
    value: int
    assessed_at: datetime  # naive UTC
    source: NihssSource
    source_id: str
    detail: str | None = None

    def __post_init__(self) -> None:
        """InputError saying what is wrong when a field is not one StrokeGate can store."""
        _text(self.patient_id, "patient identifier", MAX_IDENTIFIER, required=True)
        _text(self.patient_issuer, "patient identifier issuer", MAX_IDENTIFIER)
        _text(self.source_id, "message or resource id", MAX_SOURCE_ID, required=True)
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            raise InputError(f"NIHSS {self.value!r} is not a whole number")
        if not 0 <= self.value <= NIHSS_MAX:
            raise InputError(f"NIHSS {self.value} is out of range (0 to {NIHSS_MAX})")
        if self.assessed_at.tzinfo is not None:
            raise InputError("assessment time must be naive UTC")  # a programming error at the edge
        NihssSource(self.source)


def _text(value: str | None, what: str, limit: int, required: bool = False) -> None:
    if value is None or value == "":
        if required:
            raise InputError(f"the {what} is missing")
        return
    if len(value) > limit:
        raise InputError(f"the {what} is {len(value)} characters long; at most {limit} allowed")
    if _CONTROL.search(value):
        raise InputError(f"the {what} holds control characters")


def parse_score(text: str) -> int:
    """An NIHSS total from its text: a whole number 0-42 ("14", "14.0"); InputError otherwise."""
    cleaned = text.strip()
    try:
        number = float(cleaned)
    except ValueError:
        raise InputError(f"NIHSS value {cleaned[:32]!r} is not a number") from None
    if number != number or number != int(number):
        raise InputError(f"NIHSS value {cleaned[:32]!r} is not a whole number")
    if not 0 <= number <= NIHSS_MAX:
        raise ScoreOutOfRange(f"NIHSS value {int(number)} is out of range (0 to {NIHSS_MAX})")
    return int(number)


def as_utc(moment: datetime) -> datetime:
    """Naive UTC from an aware time, or from a naive one taken as this machine's local time."""
    return moment.astimezone(timezone.utc).replace(tzinfo=None)


def record_nihss(db: Database, report: NihssReport) -> tuple[int, bool]:
    """Store ``report``; returns (record id, True) or, when this message or resource version was
    stored before, (its id, False)."""
    with db.session() as session:
        existing = _existing(session, report)
        if existing is not None:
            return existing, False
    try:
        with db.session() as session:
            row = NihssRecord(
                patient_id=report.patient_id, patient_issuer=report.patient_issuer or None, value=report.value,
                assessed_at=report.assessed_at, source=report.source, source_id=report.source_id,
                received_at=utcnow(), detail=(report.detail or None) and report.detail[:MAX_DETAIL],
            )
            session.add(row)
            session.flush()
            return row.id, True
    except IntegrityError:  # the same record, stored meanwhile by another thread
        with db.session() as session:
            existing = _existing(session, report)
        if existing is None:
            raise
        return existing, False


def _existing(session: Session, report: NihssReport) -> int | None:
    return session.scalar(
        select(NihssRecord.id).where(NihssRecord.source == report.source, NihssRecord.source_id == report.source_id)
    )


def _matching(patient_id: str, issuer: str | None):  # noqa: ANN202 - a SQL condition
    condition = NihssRecord.patient_id == patient_id
    if issuer:
        condition &= or_(NihssRecord.patient_issuer.is_(None), NihssRecord.patient_issuer == issuer)
    return condition


def choose_nihss(session: Session, study: Study, before: datetime) -> NihssRecord | None:
    """The record ``study`` uses: its patient's assessed last at or before ``before`` (when the
    analysis started), the latest received among equal assessment times; None when there is none."""
    if not study.patient_id:
        return None
    return session.scalars(
        select(NihssRecord)
        .where(_matching(study.patient_id, study.patient_issuer), NihssRecord.assessed_at <= before)
        .order_by(NihssRecord.assessed_at.desc(), NihssRecord.id.desc())
        .limit(1)
    ).first()


def patient_records(session: Session, study: Study) -> list[NihssRecord]:
    """Every record of the study's patient, newest assessment first."""
    if not study.patient_id:
        return []
    return list(session.scalars(
        select(NihssRecord).where(_matching(study.patient_id, study.patient_issuer))
        .order_by(NihssRecord.assessed_at.desc(), NihssRecord.id.desc())
    ))


def studies_of(session: Session, record: NihssRecord) -> list[Study]:
    """The studies a record matches (see the module docstring)."""
    condition = Study.patient_id == record.patient_id
    if record.patient_issuer:
        condition &= or_(Study.patient_issuer.is_(None), Study.patient_issuer == record.patient_issuer)
    return list(session.scalars(select(Study).where(condition).order_by(Study.id)))


def used(record: NihssRecord | None) -> NihssUsed | None:
    """What the results say about ``record``."""
    if record is None:
        return None
    return NihssUsed(
        value=record.value, source=record.source, source_id=record.source_id, assessed_at=record.assessed_at,
        received_at=record.received_at, record_id=record.id,
    )
