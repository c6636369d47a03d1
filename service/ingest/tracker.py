"""Tracking: spooled instances become database rows, and quiet studies become jobs.

The receive path only queues a record (it must answer fast); one recorder thread writes the
queue to the database in batches. A crash can lose queued records but never their files, so on
start ``reconcile`` records every spooled file the database does not know. A batch the database
refuses is written again one record at a time: while the database is down every record waits
(retried, never dropped), and a record the database refuses on its own is quarantined with the
reason, so that one instance never costs the others of its batch. A study is complete as soon
as the headers of each of its series say that series is whole (``completion``: the declared total,
time points x slice positions, images in the acquisition), or when nothing arrived for
``series_idle_s``; a complete study becomes a job for its next result version. Instances that
arrive after a version was queued (a sender resending, or a header that claimed fewer than it
sent) are recorded and filed like any other and start the next version, which analyses them all
once the study is complete again (by the idle time, the header having been proved wrong).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timedelta

from pathlib import Path

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, selectinload

from service.errors import InputError
from service.ingest.completion import (
    CompletionRule,
    SeriesCounts,
    complete_by_headers,
    needs_arrival_order,
    slices_before_first_repeat,
)
from service.ingest.header import ReceivedInstance, parse_header, received_instance
from service.ingest.spool import Spool
from service.ops import metrics
from service.ops.loops import Loop
from service.store.database import Database
from service.store.models import AuditEvent, Instance, Job, JobState, ResultObject, Series, Study, StudyState, utcnow

log = logging.getLogger(__name__)


def record_instances(session: Session, items: list[ReceivedInstance], now: datetime) -> int:
    """Insert the instances not yet known; update their series and studies. Returns new rows.
    InputError (nothing written) when an instance names a series of another study.

    Our own result objects coming back (a PACS that forwards whole studies) are not new data:
    recording them would start a new result version, and so on forever.
    """
    uids = [i.sop_uid for i in items]
    known = set(session.scalars(select(Instance.sop_uid).where(Instance.sop_uid.in_(uids))))
    known |= set(session.scalars(select(ResultObject.sop_uid).where(ResultObject.sop_uid.in_(uids))))
    fresh = {i.sop_uid: i for i in items if i.sop_uid not in known}.values()
    if not fresh:
        return 0
    study_uids = {i.study_uid for i in fresh}
    series_uids = {i.series_uid for i in fresh}
    studies = {s.study_uid: s for s in session.scalars(select(Study).where(Study.study_uid.in_(study_uids)))}
    series = {s.series_uid: s for s in session.scalars(select(Series).where(Series.series_uid.in_(series_uids)))}
    rows = []
    for item in fresh:
        study = studies.get(item.study_uid)
        if study is None:
            study = studies[item.study_uid] = Study(
                study_uid=item.study_uid, patient_id=item.patient_id, patient_issuer=item.patient_issuer,
                accession_number=item.accession_number, first_received_at=now,
            )
            session.add(study)
            session.add(AuditEvent(kind="study_received", study=study, detail={"calling_ae": item.calling_ae}))
        if study.state != StudyState.RECEIVING:
            study.state = StudyState.RECEIVING
        one = series.get(item.series_uid)
        if one is None:
            one = series[item.series_uid] = Series(
                study=study, series_uid=item.series_uid, modality=item.modality,
                description=item.series_description, instance_count=0,
            )
            session.add(one)
        elif one.study is not study:
            raise InputError(f"its SeriesInstanceUID is already a series of another study (study {one.study.id})")
        one.instance_count += 1
        received = item.received_at or now
        study.last_received_at = max(study.last_received_at or received, received)
        one.last_received_at = max(one.last_received_at or received, received)
        if item.expected_instances:
            one.expected_instances = item.expected_instances
        if item.temporal_positions:
            one.temporal_positions = item.temporal_positions
        if item.images_in_acquisition:
            one.images_in_acquisition = item.images_in_acquisition
        rows.append((one, item))
    session.flush()  # series ids
    session.execute(insert(Instance), [
        {"series_id": one.id, "sop_uid": item.sop_uid, "sop_class_uid": item.sop_class_uid,
         "transfer_syntax_uid": item.transfer_syntax_uid, "path": item.path, "size_bytes": item.size_bytes,
         "calling_ae": item.calling_ae, "received_at": item.received_at or now, "slice_position": item.slice_position}
        for one, item in rows
    ])
    return len(fresh)


def series_counts(session: Session, series: Series) -> SeriesCounts:
    """What is recorded of ``series``: its declared counts and its images per slice position."""
    per_position: dict[str, int] = {}
    unpositioned = 0
    rows = session.execute(
        select(Instance.slice_position, func.count()).where(Instance.series_id == series.id).group_by(Instance.slice_position)
    )
    for position, count in rows:
        if position is None:
            unpositioned += count
        else:
            per_position[position] = count
    return SeriesCounts(
        received=series.instance_count, declared_total=series.expected_instances,
        temporal_positions=series.temporal_positions, images_in_acquisition=series.images_in_acquisition,
        per_position=per_position, unpositioned=unpositioned,
    )


def series_complete(session: Session, series: Series) -> CompletionRule | None:
    """The header rule by which ``series`` is whole now (``completion``), or None."""
    if not (series.expected_instances or series.temporal_positions or series.images_in_acquisition):
        return None
    counts = series_counts(session, series)
    first_volume = None
    if needs_arrival_order(counts):
        positions = session.scalars(select(Instance.slice_position).where(Instance.series_id == series.id)
                                    .order_by(Instance.received_at, Instance.id))
        first_volume = slices_before_first_repeat(list(positions))
    return complete_by_headers(counts, first_volume)


def database_down(error: Exception) -> bool:
    """Whether ``error`` says the database cannot be reached or written now (retry everything),
    rather than that it refuses one record (quarantine that one)."""
    if isinstance(error, OperationalError | InterfaceError | DisconnectionError):
        return True
    return isinstance(error, DBAPIError) and bool(error.connection_invalidated)


class RecordingStopped(Exception):
    """The service stops while the database is down: the records wait in the spool for reconcile."""


def record_or_quarantine(
    db: Database, items: list[ReceivedInstance], quarantine: Callable[[ReceivedInstance, str], None],
    wait: Callable[[float], bool],
) -> None:
    """Record ``items``; each one the database refuses on its own is quarantined, and while the
    database is down this retries with backoff, ``wait(seconds)`` returning True to give up
    (RecordingStopped)."""
    delay = 0.5

    def attempt(batch: list[ReceivedInstance]) -> Exception | None:
        nonlocal delay
        while True:
            try:
                with db.session() as session:
                    record_instances(session, batch, utcnow())
                return None
            except Exception as error:  # noqa: BLE001 - sorted into "retry" and "this record"
                if not database_down(error):
                    return error
                log.error("recording %d instances failed, the database is unavailable (%s); retrying in %.0f s",
                          len(batch), error, delay)
                if wait(delay):
                    raise RecordingStopped from error
                delay = min(2 * delay, 30.0)

    if attempt(items) is None:
        return
    for item in items:
        error = attempt([item])
        if isinstance(error, InputError):
            quarantine(item, f"not recorded: {error}"[:500])
        elif error is not None:
            quarantine(item, f"the database refused its record: {type(error).__name__}: {error}"[:500])


class Recorder:
    """Writes received-instance records to the database from one background thread."""

    def __init__(self, db: Database, spool: Spool | None = None, batch: int = 500) -> None:
        self.db = db
        self.spool = spool
        self.batch = batch
        self._queue: queue.Queue[ReceivedInstance] = queue.Queue()
        self._pending: deque[datetime] = deque()  # received times of queued records, oldest first
        self._pending_lock = threading.Lock()
        self._stop = threading.Event()
        self.loop = Loop("recorder", self._run)

    def start(self) -> None:
        self.loop.start()

    def record(self, item: ReceivedInstance) -> None:
        with self._pending_lock:
            self._pending.append(item.received_at or utcnow())
        self._queue.put(item)

    def unrecorded_since(self) -> datetime | None:
        """When the oldest record still waiting for the database was received, or None."""
        with self._pending_lock:
            return self._pending[0] if self._pending else None

    def flush(self) -> None:
        """Block until every queued record is in the database."""
        self._queue.join()

    def stop(self) -> None:
        self._stop.set()
        self.loop.stop()
        self.loop.join(timeout=30)

    def _run(self) -> None:
        while not (self._stop.is_set() and self._queue.empty()):
            try:
                items = [self._queue.get(timeout=0.1)]
            except queue.Empty:
                continue
            while len(items) < self.batch:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                record_or_quarantine(self.db, items, self._quarantine, self._stop.wait)
            except RecordingStopped:
                log.error("stopping with %d instances not recorded; they are recorded from the spool at the next start",
                          len(items))
            finally:
                with self._pending_lock:
                    for _ in items:
                        self._pending.popleft()
                for _ in items:
                    self._queue.task_done()

    def _quarantine(self, item: ReceivedInstance, reason: str) -> None:
        quarantine_spooled(self.spool, Path(item.path), reason)


def quarantine_spooled(spool: Spool | None, relative: Path, reason: str) -> None:
    """Move a spooled file that cannot be recorded to the quarantine folder, with its reason."""
    metrics.INSTANCES_QUARANTINED.labels(reason="unrecordable").inc()
    if spool is None:
        log.warning("could not record an instance: %s", reason)
        return
    try:
        path = spool.quarantine_file(relative, reason)
    except OSError as error:
        log.error("could not record an instance (%s) nor move it to the quarantine: %s", reason, error)
        return
    log.warning("quarantined an instance as %s: %s", path.name, reason)


def reconcile(spool: Spool, db: Database) -> int:
    """Record every spooled file the database does not know (after a crash). Returns the count.
    A file that cannot be read or recorded is quarantined with the reason; none stops the start."""
    removed = spool.clean_partial()
    if removed:
        log.info("removed %d partial files left by a crash (never acknowledged)", removed)
    on_disk = {p.as_posix() for p in spool.files()}
    with db.session() as session:
        known = set(session.scalars(select(Instance.path)))
    missing = sorted(on_disk - known)
    items = []
    for relative in missing:
        try:
            data = (spool.root / relative).read_bytes()
            header = parse_header(data)
            source_ae = header.file_meta.get("SourceApplicationEntityTitle")
            items.append(received_instance(header, relative, len(data), str(source_ae) if source_ae else None))
        except OSError as error:
            log.error("could not read spooled file %s at start: %s", relative, error)
        except InputError as error:
            quarantine_spooled(spool, Path(relative), str(error))
        except Exception as error:  # noqa: BLE001 - pydicom raises many types for a corrupt file
            quarantine_spooled(spool, Path(relative), f"{type(error).__name__}: {error}")

    def quarantine(item: ReceivedInstance, reason: str) -> None:
        quarantine_spooled(spool, Path(item.path), reason)

    def never_give_up(seconds: float) -> bool:
        time.sleep(seconds)
        return False

    for start in range(0, len(items), 500):
        record_or_quarantine(db, items[start : start + 500], quarantine, never_give_up)
    if items:
        log.info("recorded %d spooled instances the database did not know", len(items))
    metrics.SPOOL_BYTES.set(spool.total_bytes())
    return len(items)


class Tracker:
    """Turns complete studies into jobs and purges old spool data, on a timer thread."""

    def __init__(
        self, db: Database, spool: Spool, series_idle_s: float, retention_hours: float, interval_s: float = 0.5,
        unsettled_since: Callable[[], datetime | None] = lambda: None,
        on_queued: Callable[[list[int]], None] = lambda job_ids: None,
    ) -> None:
        """``unsettled_since`` tells when the oldest instance that was received but is not yet in
        the database arrived (None: there is none); no study goes quiet before it is recorded.
        ``on_queued`` hears of the jobs each tick queued (the job queue, to run them now)."""
        self.db = db
        self.unsettled_since = unsettled_since
        self.on_queued = on_queued
        self.spool = spool
        self.series_idle = timedelta(seconds=series_idle_s)
        self.retention = timedelta(hours=retention_hours)
        self.interval_s = interval_s
        self._stop = threading.Event()
        self.loop = Loop("tracker", self._run)
        self._last_purge = datetime.min

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        self._stop.set()
        self.loop.stop()
        self.loop.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                created = self.tick(utcnow())
                if created:
                    self.on_queued(created)
            except Exception as error:  # noqa: BLE001 - next tick retries; the state is in the database
                log.error("tracker tick failed: %s", error)

    def tick(self, now: datetime) -> list[int]:
        """Queue jobs for complete studies; update job gauges; purge old studies. Returns new job ids."""
        created = []
        with self.db.session() as session:
            receiving = session.scalars(
                select(Study).where(Study.state == StudyState.RECEIVING).options(selectinload(Study.series))
            ).all()
            unsettled = self.unsettled_since()
            for study in receiving:
                rule = self._complete(session, study, now, unsettled)
                if rule is None:
                    continue
                version = study.versions + 1
                # Conditional, so that of several serve processes sharing the database one queues it.
                taken = session.execute(
                    update(Study).where(Study.id == study.id, Study.state == StudyState.RECEIVING, Study.versions == study.versions)
                    .values(state=StudyState.QUEUED, versions=version)
                ).rowcount
                if not taken:
                    continue
                job = Job(study_id=study.id, version=version, last_instance_at=study.last_received_at, created_at=now)
                session.add(job)
                session.add(AuditEvent(kind="job_queued", study_id=study.id, detail={"version": version, "complete_by": rule.value}))
                session.flush()
                created.append(job.id)
                metrics.SERIES_COMPLETED.inc(len(study.series))
                metrics.STUDIES_COMPLETED.inc()
                log.info("study %d version %d complete (%d series, by %s): job %d queued",
                         study.id, version, len(study.series), rule.value, job.id)
            counts = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        for state in JobState:
            metrics.JOBS.labels(state=state.value).set(counts.get(state, 0))
        if now - self._last_purge > timedelta(minutes=1):
            self._last_purge = now
            self.purge(now)
        return created

    def _complete(self, session: Session, study: Study, now: datetime, unsettled: datetime | None) -> CompletionRule | None:
        """Why the study is complete now, or None: every series whole by its headers
        (``completion``), else nothing received for ``series_idle_s`` (and nothing received
        before that still waiting to be recorded)."""
        if study.last_received_at <= now - self.series_idle and (
            unsettled is None or unsettled >= study.last_received_at + self.series_idle
        ):
            return CompletionRule.IDLE
        if not study.series:
            return None
        rules = set()
        for series in study.series:
            rule = series_complete(session, series)
            if rule is None:
                return None
            rules.add(rule)
        return min(rules, key=list(CompletionRule).index)

    def purge(self, now: datetime) -> int:
        """Delete spooled images of finished studies older than the retention period."""
        cutoff = now - self.retention
        with self.db.session() as session:
            old = session.scalars(select(Study).where(
                Study.state.in_([StudyState.DONE, StudyState.FAILED]),
                Study.purged_at.is_(None),
                Study.last_received_at < cutoff,
            )).all()
            for study in old:
                freed = self.spool.remove_study(study.study_uid)
                study.purged_at = now
                metrics.SPOOL_BYTES.dec(freed)
                session.add(AuditEvent(kind="spool_purged", study_id=study.id, detail={"bytes": freed}))
                log.info("purged study %d from the spool (%d bytes, retention)", study.id, freed)
        return len(old)
