"""Tracking: spooled instances become database rows, and quiet studies become jobs.

The receive path only queues a record (it must answer fast); one recorder thread writes the
queue to the database in batches. A crash can lose queued records but never their files, so on
start ``reconcile`` records every spooled file the database does not know. A series is complete
when its expected count is reached (NumberOfSeriesRelatedInstances, where a sender gives it) or
when nothing arrived for ``series_idle_s``; a study whose series are complete becomes a job for
its next result version. Instances that arrive after a version was queued start the next one.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session, selectinload

from service.ingest.scp import ReceivedInstance, parse_header, received_instance
from service.ingest.spool import Spool
from service.ops import metrics
from service.store.database import Database
from service.store.models import AuditEvent, Instance, Job, JobState, ResultObject, Series, Study, StudyState, utcnow

log = logging.getLogger(__name__)


def record_instances(session: Session, items: list[ReceivedInstance], now: datetime) -> int:
    """Insert the instances not yet known; update their series and studies. Returns new rows.

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
                study_uid=item.study_uid, patient_id=item.patient_id, accession_number=item.accession_number,
                first_received_at=now,
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
        one.instance_count += 1
        received = item.received_at or now
        study.last_received_at = max(study.last_received_at or received, received)
        one.last_received_at = max(one.last_received_at or received, received)
        if item.expected_instances:
            one.expected_instances = item.expected_instances
        rows.append((one, item))
    session.flush()  # series ids
    session.execute(insert(Instance), [
        {"series_id": one.id, "sop_uid": item.sop_uid, "sop_class_uid": item.sop_class_uid,
         "transfer_syntax_uid": item.transfer_syntax_uid, "path": item.path, "size_bytes": item.size_bytes,
         "calling_ae": item.calling_ae, "received_at": item.received_at or now}
        for one, item in rows
    ])
    return len(fresh)


class Recorder:
    """Writes received-instance records to the database from one background thread."""

    def __init__(self, db: Database, batch: int = 500) -> None:
        self.db = db
        self.batch = batch
        self._queue: queue.Queue[ReceivedInstance] = queue.Queue()
        self._pending: deque[datetime] = deque()  # received times of queued records, oldest first
        self._pending_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)

    def start(self) -> None:
        self._thread.start()

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
        self._thread.join(timeout=30)

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
                self._write(items)
            finally:
                with self._pending_lock:
                    for _ in items:
                        self._pending.popleft()
                for _ in items:
                    self._queue.task_done()

    def _write(self, items: list[ReceivedInstance]) -> None:
        for attempt in range(5):
            try:
                with self.db.session() as session:
                    record_instances(session, items, utcnow())
                return
            except Exception as error:  # noqa: BLE001 - the files are safe; reconcile at start recovers
                log.error("recording %d instances failed (attempt %d): %s", len(items), attempt + 1, error)
                self._stop.wait(0.5 * (attempt + 1))
        log.error("gave up recording %d instances; they are recovered from the spool at next start", len(items))


def reconcile(spool: Spool, db: Database) -> int:
    """Record every spooled file the database does not know (after a crash). Returns the count."""
    removed = spool.clean_partial()
    if removed:
        log.info("removed %d partial files left by a crash (never acknowledged)", removed)
    on_disk = {p.as_posix() for p in spool.files()}
    with db.session() as session:
        known = set(session.scalars(select(Instance.path)))
    missing = sorted(on_disk - known)
    items = []
    for relative in missing:
        data = (spool.root / relative).read_bytes()
        header = parse_header(data)
        items.append(received_instance(header, relative, len(data), header.file_meta.get("SourceApplicationEntityTitle")))
    for start in range(0, len(items), 500):
        with db.session() as session:
            record_instances(session, items[start : start + 500], utcnow())
    if items:
        log.info("recorded %d spooled instances the database did not know", len(items))
    metrics.SPOOL_BYTES.set(spool.total_bytes())
    return len(items)


class Tracker:
    """Turns complete studies into jobs and purges old spool data, on a timer thread."""

    def __init__(
        self, db: Database, spool: Spool, series_idle_s: float, retention_hours: float, interval_s: float = 0.5,
        unsettled_since: Callable[[], datetime | None] = lambda: None,
    ) -> None:
        """``unsettled_since`` tells when the oldest instance that was received but is not yet in
        the database arrived (None: there is none); no study goes quiet before it is recorded."""
        self.db = db
        self.unsettled_since = unsettled_since
        self.spool = spool
        self.series_idle = timedelta(seconds=series_idle_s)
        self.retention = timedelta(hours=retention_hours)
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tracker", daemon=True)
        self._last_purge = datetime.min

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick(utcnow())
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
                if not self._complete(study, now, unsettled):
                    continue
                study.versions += 1
                study.state = StudyState.QUEUED
                job = Job(study=study, version=study.versions, last_instance_at=study.last_received_at, created_at=now)
                session.add(job)
                session.add(AuditEvent(kind="job_queued", study_id=study.id, detail={"version": study.versions}))
                session.flush()
                created.append(job.id)
                metrics.SERIES_COMPLETED.inc(len(study.series))
                metrics.STUDIES_COMPLETED.inc()
                log.info("study %d version %d complete (%d series): job %d queued", study.id, study.versions, len(study.series), job.id)
            counts = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        for state in JobState:
            metrics.JOBS.labels(state=state.value).set(counts.get(state, 0))
        if now - self._last_purge > timedelta(minutes=1):
            self._last_purge = now
            self.purge(now)
        return created

    def _complete(self, study: Study, now: datetime, unsettled: datetime | None) -> bool:
        if study.last_received_at <= now - self.series_idle and (
            unsettled is None or unsettled >= study.last_received_at + self.series_idle
        ):
            return True
        return bool(study.series) and all(
            s.expected_instances and s.instance_count >= s.expected_instances for s in study.series
        )

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
