"""Tables. Everything that must survive a crash lives here or in the spool, never only in memory.

Patient identifiers are stored (the database is part of the clinical system); they never go to
metric labels or INFO logs.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone

from sqlalchemy import JSON, BigInteger, DateTime, Enum, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from service.findings import NihssSource


def utcnow() -> datetime:
    """Naive UTC: stored the same on SQLite and PostgreSQL."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime()}


class StudyState(str, enum.Enum):
    RECEIVING = "receiving"  # instances arriving; a job follows when its series are complete
    QUEUED = "queued"  # a job is waiting or running for the latest instances
    DONE = "done"  # the latest version is analysed
    FAILED = "failed"  # the latest version could not be analysed (reason on the job)


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class DeliveryState(str, enum.Enum):
    PENDING = "pending"  # to send: never tried, or the destination answered a failure
    UNCERTAIN = "uncertain"  # on the wire, no outcome recorded yet; after a crash: maybe stored there
    SENT = "sent"


def _enum(cls: type[enum.Enum]) -> Enum:
    return Enum(cls, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_issuer: Mapped[str | None] = mapped_column(String(64), doc="IssuerOfPatientID of the images")
    accession_number: Mapped[str | None] = mapped_column(String(16))
    state: Mapped[StudyState] = mapped_column(_enum(StudyState), default=StudyState.RECEIVING)
    versions: Mapped[int] = mapped_column(Integer, default=0, doc="result versions started so far")
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    purged_at: Mapped[datetime | None] = mapped_column()

    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.id")
    jobs: Mapped[list[Job]] = relationship(back_populates="study", order_by="Job.id")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    description: Mapped[str | None] = mapped_column(String(64))
    expected_instances: Mapped[int | None] = mapped_column(Integer, doc="NumberOfSeriesRelatedInstances")
    temporal_positions: Mapped[int | None] = mapped_column(Integer, doc="NumberOfTemporalPositions")
    images_in_acquisition: Mapped[int | None] = mapped_column(Integer, doc="ImagesInAcquisition")
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"))
    sop_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text, doc="relative to the spool folder")
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    slice_position: Mapped[str | None] = mapped_column(String(64), doc="ImagePositionPatient to 0.01 mm, for completion")

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """One analysis of one study version; claimed by a worker under a lease."""

    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("study_id", "version"), Index("ix_jobs_state", "state"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    version: Mapped[int] = mapped_column(Integer)
    state: Mapped[JobState] = mapped_column(_enum(JobState), default=JobState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    last_instance_at: Mapped[datetime] = mapped_column(doc="latest instance of this version")
    instances_at_start: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    delivered_at: Mapped[datetime | None] = mapped_column(doc="every result acknowledged by its destinations")
    error: Mapped[str | None] = mapped_column(Text)
    findings: Mapped[dict | None] = mapped_column(JSON)

    study: Mapped[Study] = relationship(back_populates="jobs")
    results: Mapped[list[ResultObject]] = relationship(back_populates="job", order_by="ResultObject.id")


class ResultObject(Base):
    """A DICOM object we produced (SEG, SR...), kept on disk until every destination has it."""

    __tablename__ = "result_objects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    kind: Mapped[str] = mapped_column(String(16))
    sop_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text, doc="relative to the results folder")

    job: Mapped[Job] = relationship(back_populates="results")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="result")


class Delivery(Base):
    """The outbox: one row per (result object, destination) until the destination answers Success."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("result_id", "destination"), Index("ix_deliveries_due", "state", "next_attempt_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("result_objects.id"))
    destination: Mapped[str] = mapped_column(String(128), doc="AE@host:port")
    state: Mapped[DeliveryState] = mapped_column(_enum(DeliveryState), default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    claimed_by: Mapped[str | None] = mapped_column(String(64), doc="the sender (host:pid:nonce) whose round holds it")
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column()

    result: Mapped[ResultObject] = relationship(back_populates="deliveries")


class NihssRecord(Base):
    """One NIHSS as received, with its provenance; never updated or deleted (a correction is a
    new row), so that every result can say which record it used."""

    __tablename__ = "nihss_records"
    __table_args__ = (
        UniqueConstraint("source", "source_id"),  # a resent HL7 message or re-read FHIR version is one record
        Index("ix_nihss_patient", "patient_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64))
    patient_issuer: Mapped[str | None] = mapped_column(String(64))
    value: Mapped[int] = mapped_column(Integer)
    assessed_at: Mapped[datetime] = mapped_column(doc="naive UTC")
    source: Mapped[NihssSource] = mapped_column(_enum(NihssSource))
    source_id: Mapped[str] = mapped_column(String(128), doc="message control ID, resource id/version, request id")
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    detail: Mapped[str | None] = mapped_column(Text, doc="the sender's own words, e.g. the OBX result status")


class ClinicalResult(Base):
    """One version of a study version's clinical result: the SR naming the NIHSS used (or none).
    Revision 1 is written with the imaging results; a later or corrected NIHSS adds a revision."""

    __tablename__ = "clinical_results"
    __table_args__ = (UniqueConstraint("job_id", "revision"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    revision: Mapped[int] = mapped_column(Integer)
    nihss_id: Mapped[int | None] = mapped_column(ForeignKey("nihss_records.id"))
    result_id: Mapped[int | None] = mapped_column(ForeignKey("result_objects.id"), doc="its SR")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    nihss: Mapped[NihssRecord | None] = relationship()
    result: Mapped[ResultObject | None] = relationship()


class AuditEvent(Base):
    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"))
    detail: Mapped[dict | None] = mapped_column(JSON)

    study: Mapped[Study | None] = relationship()
