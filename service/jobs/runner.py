"""Running one claimed job: analyse the study version, write the SEG and SR and put them in the
outbox at once (what a stroke team decides on goes out while the maps are drawn), then draw and
write the reader series and, in one transaction, put them in the outbox too and mark the job done.
The same for every job queue."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.analysis.clinical_revision import first_revision
from service.analysis.ctp_model import load_ctp_model
from service.analysis.pipeline import AnalysisParameters, add_reader_series, analyse_study, write_results
from service.clinical.nihss import choose_nihss, used
from service.delivery.outbox import enqueue, observe_if_all_sent
from service.errors import InputError
from service.jobs import lease
from service.ops import metrics
from service.store.database import Database
from service.store.models import Instance, Job, JobState, Series, Study, utcnow

log = logging.getLogger(__name__)


class JobRunner:
    """What a worker needs to run a job: the database, the folders, the analysis parameters and
    which result categories each destination wants."""

    def __init__(
        self,
        db: Database,
        spool_dir: Path,
        results_dir: Path,
        parameters: AnalysisParameters,
        destinations: dict[str, Collection[str]],
        lease_s: float,
        max_attempts: int,
        on_results: Callable[[], None] | None = None,
        on_finished: Callable[[], None] | None = None,
    ) -> None:
        """``on_results``: called after a job's results are in the outbox (wakes an in-process sender);
        ``on_finished``: after a job is done (the clinical reviser looks whether a NIHSS came during it)."""
        self.db = db
        self.spool_dir = spool_dir
        self.results_dir = results_dir
        self.parameters = parameters
        self.destinations = destinations
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self.on_results = on_results
        self.on_finished = on_finished

    def warm_up(self) -> None:
        """Load the learned models the analyses run, before the first job asks for them."""
        if self.parameters.models is not None:
            load_ctp_model(self.parameters.models)

    def claim(self, owner: str, job_id: int | None = None) -> Job | None:
        """Claim the oldest runnable job (or job ``job_id``) for ``owner``."""
        return lease.claim(self.db, owner, self.lease_s, self.max_attempts, job_id=job_id)

    def run(self, job_id: int, owner: str) -> None:
        """Analyse one claimed job and record its outcome."""
        with self.db.session() as session:
            job = session.get(Job, job_id)
            study = session.get(Study, job.study_id)
            study_uid, version, attempt = study.study_uid, job.version, job.attempts
            paths = [self.spool_dir / p for p in session.scalars(
                select(Instance.path).join(Series).where(Series.study_id == study.id).order_by(Instance.id)
            )]
            job.instances_at_start = len(paths)
            nihss = used(choose_nihss(session, study, job.started_at or utcnow()))
        log.info("job %d: study %d version %d, %d instances, attempt %d", job_id, job.study_id, version, len(paths), attempt)
        heartbeat = _Heartbeat(self.db, job_id, owner, self.lease_s)
        started = time.perf_counter()
        try:
            outcome = analyse_study(paths, version, self.parameters, study_uid=study_uid, nihss=nihss,
                                    with_reader_series=False)
            if heartbeat.lost:
                log.warning("job %d: lease lost during the analysis; another worker runs it", job_id)
                return
            files = write_results(outcome, self.results_dir)
            if not lease.while_owned(self.db, job_id, owner,
                                     lambda session, job: enqueue(session, job, files, self.destinations)):
                heartbeat.stop()
                log.warning("job %d: lease lost before its SEG and SR went out; another worker runs it", job_id)
                return
            if self.on_results is not None:
                self.on_results()
            files += write_results(outcome, self.results_dir, add_reader_series(outcome))
        except InputError as error:
            heartbeat.stop()
            lease.finish(self.db, job_id, owner, JobState.FAILED, error=str(error))
            metrics.JOBS_FAILED.labels(error="input").inc()
            log.warning("job %d failed: %s", job_id, error)
            return
        except Exception as error:  # noqa: BLE001 - an unexpected failure is retried, then reported
            heartbeat.stop()
            reason = f"{type(error).__name__}: {error}"
            log.exception("job %d attempt %d crashed", job_id, attempt)
            if attempt >= self.max_attempts:
                lease.finish(self.db, job_id, owner, JobState.FAILED, error=f"internal error after {attempt} attempts: {reason}")
                metrics.JOBS_FAILED.labels(error="internal").inc()
            else:
                lease.record_error(self.db, job_id, owner, reason)
            return
        heartbeat.stop()
        metrics.STAGE_SECONDS.labels(stage="job").observe(time.perf_counter() - started)
        summary = outcome.findings.summary()

        def deliver(session: Session, job: Job) -> None:
            enqueue(session, job, files, self.destinations)
            first_revision(session, job, nihss)

        done = lease.finish(self.db, job_id, owner, JobState.DONE, findings=summary, also=deliver)
        if done:
            log.info("job %d done: %s", job_id, summary["measurements"])
            observe_if_all_sent(self.db, job_id)
            if self.on_results is not None:
                self.on_results()
            if self.on_finished is not None:
                self.on_finished()
        else:
            log.warning("job %d: lease lost before finishing; another worker runs it", job_id)


class _Heartbeat:
    """Renews a job's lease every third of its length while the job runs; ``lost`` once the job
    is no longer ours (the lease expired and another worker took it), when beating stops."""

    def __init__(self, db: Database, job_id: int, owner: str, lease_s: float) -> None:
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(db, job_id, owner, lease_s), daemon=True)
        self._thread.start()

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def _run(self, db: Database, job_id: int, owner: str, lease_s: float) -> None:
        while not self._stop.wait(lease_s / 3):
            try:
                if not lease.extend(db, job_id, owner, lease_s):
                    self._lost.set()
                    return
            except Exception as error:  # noqa: BLE001 - the next beat tries again
                log.error("renewing the lease of job %d failed: %s", job_id, error)

    def stop(self) -> None:
        self._stop.set()
