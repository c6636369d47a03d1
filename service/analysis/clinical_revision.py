"""The clinical result kept current: when the NIHSS a study's results should name changes (a late
NIHSS, a correction), a new version of the report is issued without touching the imaging.

The new version is the previous SR with its clinical group rewritten (``results.sr.revise_sr``):
same series, a new SOP Instance UID, the next Instance Number, the previous report as its
predecessor; and, where the study has a summary image, its next version with the text column
redrawn (``results.summary.revise_summary``: the montage kept pixel for pixel). They are stored
beside the previous ones (``<study>/v<version>/SR-r<revision>.dcm``, ``SUMMARY-r<revision>.dcm``),
recorded as a ``ClinicalResult`` revision and queued for the destinations that take them; no
imaging object (SEG, maps) is queued again. Earlier revisions stay in the database and on disk.

The 90-day outcomes (seed 004's CRD model, seed 000's CNN-LSTM fusion) depend on the NIHSS: the
revision carries each recomputed from what the findings stored (``revised_outcome``,
``revised_fusion_outcome``), never from the maps.
``on_outcome_stale`` is still called for every new revision, for whoever else must know.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import func, select

from service.clinical.nihss import choose_nihss, studies_of, used
from service.delivery.outbox import ResultFile, enqueue
from service.analysis import outcome_cnn_lstm
from service.analysis.outcome_model import outcome_card, recompute
from service.errors import ModelError
from service.findings import SR, SUMMARY, FusionOutcomeRecord, NihssUsed, OutcomeRecord, nihss_summary
from service.ops.loops import Rounds
from service.results.sr import revise_sr
from service.results.summary import revise_summary, stored_imaging_lines
from service.store.database import Database
from service.store.models import AuditEvent, ClinicalResult, Job, JobState, NihssRecord, ResultObject, Study, utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StaleOutcome:
    """A study version whose clinical input changed: what ``on_outcome_stale`` receives."""

    study_uid: str
    job_id: int
    version: int
    revision: int
    nihss: NihssUsed | None
    report: ResultFile  # the new SR
    summary: ResultFile | None = None  # the new summary image, where the study had one


def first_revision(session, job: Job, nihss: NihssUsed | None) -> None:  # noqa: ANN001 - a Session
    """Record revision 1 (the SR written with the imaging results) in the job's finishing transaction."""
    sr = session.scalar(select(ResultObject).where(ResultObject.job_id == job.id, ResultObject.kind == SR.name))
    session.add(ClinicalResult(job_id=job.id, revision=1, nihss_id=nihss.record_id if nihss else None,
                               result_id=sr.id if sr else None))


class ClinicalReviser(Rounds):
    """A loop that finds study versions whose NIHSS changed and issues their next clinical revision.

    It looks at the studies of NIHSS records received since its last look and at jobs finished
    since then (a NIHSS received while the study was analysed), on ``wake()`` or every ``poll_s``.
    """

    def __init__(
        self, db: Database, results_dir: Path, destinations: dict[str, Collection[str]],
        on_results: Callable[[], None] | None = None,
        on_outcome_stale: Callable[[StaleOutcome], None] | None = None, poll_s: float = 2.0,
    ) -> None:
        self.db, self.results_dir, self.destinations = db, results_dir, destinations
        self.on_results, self.on_outcome_stale = on_results, on_outcome_stale
        self._seen_record = 0
        self._seen_finished = datetime(1970, 1, 1)  # every job at the first look
        super().__init__("clinical", poll_s)

    failure = "checking NIHSS changes"  # a database hiccup; the next look tries again

    def round(self) -> int:
        return self.check()

    def check(self) -> int:
        """Issue the revisions now due; returns how many."""
        with self.db.session() as session:
            top = session.scalar(select(func.max(NihssRecord.id))) or 0
            records = session.scalars(select(NihssRecord).where(NihssRecord.id > self._seen_record)).all()
            study_ids = {study.id for record in records for study in studies_of(session, record)}
            since = self._seen_finished - timedelta(seconds=5)  # clocks of other workers' hosts
            now = utcnow()
            study_ids |= set(session.scalars(
                select(Job.study_id).where(Job.state == JobState.DONE, Job.finished_at >= since)
            ))
        issued = sum(self.revise(study_id) for study_id in sorted(study_ids))
        self._seen_record, self._seen_finished = top, now
        return issued

    def revise(self, study_id: int) -> bool:
        """Issue the next revision of the study's latest analysed version when the NIHSS it should
        name is not the one its latest revision names; False when nothing changed."""
        with self.db.session() as session:
            study = session.get(Study, study_id)
            job = session.scalar(select(Job).where(Job.study_id == study_id).order_by(Job.version.desc()).limit(1))
            if job is None or job.state != JobState.DONE or job.started_at is None:
                return False  # not analysed yet (it chooses its NIHSS when it is), or failed
            latest = session.scalar(select(ClinicalResult).where(ClinicalResult.job_id == job.id)
                                    .order_by(ClinicalResult.revision.desc()).limit(1))
            if latest is None or latest.result is None:
                return False  # analysed before clinical results existed, or no SR
            chosen = choose_nihss(session, study, job.started_at)
            if (chosen.id if chosen else None) == latest.nihss_id:
                return False
            nihss = used(chosen)
            revision = latest.revision + 1
            previous = dcmread(self.results_dir / latest.result.path)
            outcome = revised_outcome(job.findings, nihss)
            fused = revised_fusion_outcome(job.findings, nihss)
            outcomes = [o for o in (outcome, fused) if o is not None]
            report = revise_sr(previous, study.study_uid, job.version, revision, nihss, outcomes)
            relative = Path(latest.result.path).with_name(f"SR-r{revision}.dcm")
            _write(report, self.results_dir / relative)
            result = ResultFile(SR, str(report.SOPInstanceUID), str(report.SOPClassUID), relative.as_posix())
            summary = self._revised_summary(session, job, revision, nihss, outcomes)
            enqueue(session, job, [result] + ([summary] if summary is not None else []), self.destinations)
            row = session.scalar(select(ResultObject).where(ResultObject.sop_uid == result.sop_uid))
            session.add(ClinicalResult(job_id=job.id, revision=revision, nihss_id=chosen.id if chosen else None,
                                       result_id=row.id))
            if job.findings is not None:
                job.findings = {**job.findings, "nihss": nihss_summary(nihss), "clinical_revision": revision,
                                "outcome": outcome.summary() if outcome is not None else None,
                                "outcome_cnn_lstm": fused.summary() if fused is not None else None}
            session.add(AuditEvent(kind="clinical_revised", study_id=study.id,
                                   detail={"job": job.id, "revision": revision, "nihss_record": chosen.id if chosen else None}))
            stale = StaleOutcome(study.study_uid, job.id, job.version, revision, nihss, result, summary)
        log.info("study %d version %d: clinical revision %d names %s", study_id, stale.version, revision,
                 nihss.describe() if nihss else "no NIHSS")
        if self.on_outcome_stale is not None:
            self.on_outcome_stale(stale)
        if self.on_results is not None:
            self.on_results()
        return True

    def _revised_summary(self, session, job: Job, revision: int, nihss: NihssUsed | None,  # noqa: ANN001 - a Session
                         outcomes: list[OutcomeRecord | FusionOutcomeRecord]) -> ResultFile | None:
        """The next version of the job's latest summary image, written beside it; None when the job
        has none (its destinations take no summary, or it was never drawn) or it cannot be read."""
        latest = session.scalar(select(ResultObject).where(ResultObject.job_id == job.id, ResultObject.kind == SUMMARY.name)
                                .order_by(ResultObject.id.desc()).limit(1))
        if latest is None:
            return None
        stored = job.findings or {}
        try:
            previous = dcmread(self.results_dir / latest.path)
            image = revise_summary(previous, job.study.study_uid, job.version, revision, nihss, outcomes,
                                   stored_imaging_lines(stored), list(stored.get("qc_flags") or []))
        except (OSError, ValueError, AttributeError) as error:
            log.warning("job %d: no new summary image with clinical revision %d: %s", job.id, revision, error)
            return None
        relative = Path(latest.path).with_name(f"SUMMARY-r{revision}.dcm")
        _write(image, self.results_dir / relative)
        return ResultFile(SUMMARY, str(image.SOPInstanceUID), str(image.SOPClassUID), relative.as_posix())


def revised_outcome(findings: dict | None, nihss: NihssUsed | None) -> OutcomeRecord | None:
    """The study's 90-day outcome with ``nihss``: its stored imaging components combined again
    (``outcome_model.recompute``, no maps read); None when the analysis made no outcome or the
    shipped card is no longer the model that made it (logged: the revision then names no outcome
    rather than a stale one)."""
    stored = (findings or {}).get("outcome")
    if not stored:
        return None
    try:
        return recompute(outcome_card(), OutcomeRecord.from_summary(stored, None), nihss)
    except (KeyError, TypeError, ValueError, ModelError) as error:
        log.warning("the 90-day outcome cannot be recomputed with the new NIHSS: %s", error)
        return None


def revised_fusion_outcome(findings: dict | None, nihss: NihssUsed | None) -> FusionOutcomeRecord | None:
    """The study's CNN-LSTM outcome with ``nihss``: its stored module probabilities fused again; None
    when the analysis made none or the shipped card is not the model that made it (logged)."""
    stored = (findings or {}).get("outcome_cnn_lstm")
    if not stored:
        return None
    try:
        return outcome_cnn_lstm.recompute(outcome_cnn_lstm.fusion_card(), FusionOutcomeRecord.from_summary(stored, None), nihss)
    except (KeyError, TypeError, ValueError, AttributeError, ModelError) as error:
        log.warning("the CNN-LSTM 90-day outcome cannot be recomputed with the new NIHSS: %s", error)
        return None


def _write(report, path: Path) -> None:  # noqa: ANN001 - a pydicom Dataset
    """Write atomically (a crash leaves no half file under the final name)."""
    temporary = path.with_suffix(".part")
    report.save_as(temporary, enforce_file_format=True)
    temporary.replace(path)
