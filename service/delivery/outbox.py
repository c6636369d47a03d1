"""The outbox: result objects wait in the database until each destination has answered Success.

Rows are written in the same transaction that marks the job done, so a result is never lost
between analysis and delivery; the sender retries failures with exponential backoff; restarts
resume from the rows. Each object's outcome is committed as its response arrives, so a crash
resends at most the one object that was in flight; result UIDs are deterministic per (study,
version), so that resend is the same object at the PACS, never a second one.

Exactly once: each attempt is committed (state UNCERTAIN) before the object goes on the wire, so
after a crash, or an association lost between the last byte and the response, the rows say which
objects the destination may hold without our knowing. Before one of those is sent again, a
destination with ``confirm: find`` is asked (C-FIND, ``confirm.py``): one it holds is marked sent,
not sent again; one it lacks, or a query that fails, is sent again (a result is never given up for
a query). With ``confirm: none`` it is sent again: at least once.
"""

from __future__ import annotations

import logging
import ssl
from collections import defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from service.config import ConfirmMode, Destination
from service.delivery.confirm import Holding, ObjectKeys, ask_holding
from service.delivery.scu import SendOutcome, SeriesRelabel, send_files
from service.findings import SEG, SR, ResultKind
from service.ops import metrics
from service.ops.loops import Rounds
from service.ops.owners import HOST, new_owner, owner_gone
from service.store.database import Database
from service.store.models import Delivery, DeliveryState, Job, JobState, ResultObject, utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResultFile:
    kind: ResultKind
    sop_uid: str
    sop_class_uid: str
    path: str  # relative to the results folder


RESEARCH_MARK = " (RESEARCH)"
"""Appended to a destination's own series description unless it says "research" already: a site may
rename our series, not hide that they come from research software."""


def series_label(destination: Destination, kind: ResultKind) -> SeriesRelabel | None:
    """The series number and description ``destination`` wants on a result of ``kind`` (None: as
    written). A map series keeps its place after the first map's number and gets its name."""
    label = destination.series.get(kind.category)
    if label is None:
        return None
    number, description = label.number, label.description
    if kind.map is not None:
        if number is not None:
            number += kind.map.place
        if description is not None:
            description = (description.replace("{map}", kind.map.title) if "{map}" in description
                           else f"{description} {kind.map.title}")
    if description is not None and "research" not in description.lower():
        description += RESEARCH_MARK
    return SeriesRelabel(number, description)


def enqueue(session: Session, job: Job, results: list[ResultFile], destinations: dict[str, Collection[str]]) -> None:
    """Add a job's result objects and one pending delivery per destination that wants them
    (``destinations``: name -> result categories); idempotent."""
    for result in results:
        row = session.scalar(select(ResultObject).where(ResultObject.sop_uid == result.sop_uid))
        if row is None:
            row = ResultObject(job=job, kind=result.kind.name, sop_uid=result.sop_uid, sop_class_uid=result.sop_class_uid, path=result.path)
            session.add(row)
            session.flush()
        have = set(session.scalars(select(Delivery.destination).where(Delivery.result_id == row.id)))
        for destination, categories in destinations.items():
            if destination not in have and result.kind.category in categories:
                session.add(Delivery(result_id=row.id, destination=destination))


DECISION_KINDS = (SEG.name, SR.name)
"""The result objects a stroke team decides on: in the outbox before the rest are drawn, sent first."""

DELIVERY_PRIORITY = case(
    (ResultObject.kind == SEG.name, 0), (ResultObject.kind == SR.name, 1), (ResultObject.kind == "SUMMARY", 2),
    (ResultObject.kind.like("PM-%"), 3), else_=4,
)
"""The order results go out in: what a stroke team decides on first (the SEG and the SR, then the
summary), the map values, and the colour map images last; the oldest first within each."""


@dataclass(frozen=True)
class DueObject:
    """One due delivery as the sender handles it."""

    delivery_id: int
    path: Path
    kind: ResultKind
    uncertain: bool  # attempted before without an outcome recorded: the destination may hold it


def release_dead_claims(db: Database) -> int:
    """At a process's start: deliveries claimed by a sender of this host that no longer exists (a
    service killed mid-round) are due again at once, instead of when the claim runs out."""
    released = 0
    now = utcnow()
    with db.session() as session:
        claimed = session.scalars(
            select(Delivery).where(Delivery.state.in_((DeliveryState.PENDING, DeliveryState.UNCERTAIN)),
                                   Delivery.claimed_by.like(f"{HOST}:%"), Delivery.next_attempt_at > now)
        )
        for delivery in claimed:
            if owner_gone(delivery.claimed_by, own_pid_gone=True):
                delivery.next_attempt_at, delivery.claimed_by = now, None
                released += 1
    return released


def backoff(attempts: int, first_s: float, max_s: float) -> timedelta:
    """Delay before the next try after ``attempts`` failures: first_s, 2 first_s, 4 first_s ... max_s."""
    return timedelta(seconds=min(first_s * 2 ** max(attempts - 1, 0), max_s))


class Sender(Rounds):
    """Sends due deliveries, one association per destination per round, on a background thread.

    Each attempt is committed before the object goes on the wire and its outcome as its response
    arrives, before the next object is sent: after a crash at most the one object in flight is
    uncertain, confirmed with the destination or sent again (with the same UIDs)."""

    def __init__(
        self, db: Database, results_dir: Path, calling_ae: str, backoff_s: float, backoff_max_s: float,
        destinations: Collection[Destination] = (), interval_s: float = 0.5, tls: dict[str, ssl.SSLContext] | None = None,
        claim_s: float = 600.0,
    ) -> None:
        """``tls``: the TLS context of each destination (by name) that is sent to over DICOM TLS;
        ``claim_s``: how long a round's deliveries are this sender's before another may take them
        (longer than a round of 200 objects takes; a sender that dies mid-round leaves them this long)."""
        self.db = db
        self.destinations = {d.name: d for d in destinations}
        self.tls = tls or {}
        self.results_dir = results_dir
        self.calling_ae = calling_ae
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.interval_s = interval_s
        self.claim_s = claim_s
        self.owner = new_owner()
        super().__init__("sender", interval_s, join_timeout_s=60)

    failure = "delivery round"  # its rows stay pending; the next round retries

    def round(self) -> int:
        return self.send_due(utcnow())

    def send_due(self, now: datetime) -> int:
        """One round: up to 200 due deliveries (pending, or uncertain: sent before without an outcome
        recorded), grouped by destination, each destination's in ``DELIVERY_PRIORITY`` order (a
        backlog of colour maps never holds back a new study's SEG and SR); the uncertain ones are
        confirmed first where the destination says so. Returns the number delivered (confirmed ones
        included).

        The round's deliveries are claimed first: locked with ``FOR UPDATE SKIP LOCKED`` and moved
        ``claim_s`` into the future, so that another sender sharing the database (a second serve
        replica) neither waits for them nor sends them too; each outcome then sets the row's real
        state, and what this round did not get to is released when it ends."""
        with self.db.session() as session:
            due = session.execute(
                select(Delivery, ResultObject.path, ResultObject.kind).join(ResultObject)
                .where(Delivery.state.in_((DeliveryState.PENDING, DeliveryState.UNCERTAIN)), Delivery.next_attempt_at <= now)
                .order_by(DELIVERY_PRIORITY, Delivery.id).limit(200).with_for_update(skip_locked=True, of=Delivery)
            ).all()
            claimed_until = now + timedelta(seconds=self.claim_s)
            batches: dict[str, list[DueObject]] = defaultdict(list)
            for delivery, path, kind in due:
                delivery.next_attempt_at, delivery.claimed_by = claimed_until, self.owner
                batches[delivery.destination].append(DueObject(delivery.id, self.results_dir / path, ResultKind.parse(kind),
                                                               delivery.state == DeliveryState.UNCERTAIN))
        delivered = 0
        untried = {delivery.id for delivery, _, _ in due}
        try:
            for name, items in batches.items():
                if self.stopping.is_set():
                    break
                destination = self.destinations.get(name) or Destination.parse(name)  # one no longer configured
                held = self._confirm(destination, [item for item in items if item.uncertain])
                untried -= held
                delivered += len(held)
                items = [item for item in items if item.delivery_id not in held]
                if not items:
                    continue
                labels = [series_label(destination, item.kind) for item in items]

                def record(index: int, outcome: SendOutcome, items: list[DueObject] = items, name: str = name) -> None:
                    untried.discard(items[index].delivery_id)
                    self._record(items[index].delivery_id, outcome, name)

                outcomes = send_files(
                    destination, [item.path for item in items], self.calling_ae, labels=labels, tls=self.tls.get(name),
                    on_outcome=record,
                    on_attempt=lambda index, items=items: self._retrying(self._mark_attempt, items[index].delivery_id),
                )
                delivered += sum(outcome.delivered for outcome in outcomes)
        finally:
            if untried:
                self._release(untried, claimed_until, now)
        return delivered

    def _release(self, delivery_ids: set[int], claimed_until: datetime, due_at: datetime) -> None:
        """Give back claimed deliveries this round did not settle (stopping, or an association that
        ended early): due again at once rather than when the claim runs out."""
        try:
            with self.db.session() as session:
                session.execute(
                    update(Delivery).where(Delivery.id.in_(delivery_ids),
                                           Delivery.state.in_((DeliveryState.PENDING, DeliveryState.UNCERTAIN)),
                                           Delivery.next_attempt_at == claimed_until)
                    .values(next_attempt_at=due_at, claimed_by=None)
                )
        except Exception as error:  # noqa: BLE001 - they are due again when the claim runs out
            log.error("releasing %d claimed deliveries failed: %s", len(delivery_ids), error)

    def _confirm(self, destination: Destination, uncertain: list[DueObject]) -> set[int]:
        """The uncertain deliveries ``destination`` says it holds, marked sent; the others are sent
        again by the caller (all of them with ``confirm: none``, or when the query fails)."""
        if not uncertain:
            return set()
        if destination.confirm is ConfirmMode.NONE:
            log.info("%d uncertain result objects to %s are sent again (confirm: none)", len(uncertain), destination.name)
            return set()
        keys: list[tuple[DueObject, ObjectKeys]] = []
        for item in uncertain:
            try:
                header = dcmread(item.path, stop_before_pixels=True,
                                 specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
                keys.append((item, ObjectKeys(str(header.StudyInstanceUID), str(header.SeriesInstanceUID),
                                              str(header.SOPInstanceUID))))
            except (OSError, ValueError, AttributeError, EOFError) as error:  # sent again; the send says why it fails
                log.error("uncertain delivery %d: result file unreadable (%s)", item.delivery_id, error)
        holdings = ask_holding(destination, [k for _, k in keys], self.calling_ae, destination.confirm_timeout_s,
                               tls=self.tls.get(destination.name))
        held: set[int] = set()
        for (item, _), holding in zip(keys, holdings, strict=True):
            metrics.DELIVERY_CONFIRMATIONS.labels(answer=holding.value).inc()
            if holding is Holding.HELD:
                self._retrying(self._mark_sent, item.delivery_id)
                held.add(item.delivery_id)
        log.info("%d of %d uncertain result objects were already at %s (C-FIND); the others are sent again",
                 len(held), len(uncertain), destination.name)
        return held

    def _retrying(self, commit: Callable[[int], None], delivery_id: int) -> None:
        """Commit a state change of one delivery, retried through a database hiccup."""
        for attempt in range(5):
            try:
                commit(delivery_id)
                return
            except Exception as error:  # noqa: BLE001 - retried; the last failure ends the round
                if attempt == 4:
                    raise
                log.error("recording delivery %d failed (%s); retrying", delivery_id, error)
                self.stopping.wait(0.2 * (attempt + 1))

    def _mark_attempt(self, delivery_id: int) -> None:
        """Committed before the object goes on the wire: until its outcome is, the object is uncertain."""
        with self.db.session() as session:
            session.execute(update(Delivery).where(Delivery.id == delivery_id).values(state=DeliveryState.UNCERTAIN))

    def _mark_sent(self, delivery_id: int) -> None:
        """An uncertain object the destination holds: delivered, without sending it again."""
        now = utcnow()
        with self.db.session() as session:
            session.execute(
                update(Delivery).where(Delivery.id == delivery_id)
                .values(state=DeliveryState.SENT, sent_at=now, last_error=None)
            )
        self._observe_job_delivered(delivery_id, now)

    def _record(self, delivery_id: int, outcome: SendOutcome, destination: str) -> None:
        """Commit one object's outcome, retried through a database hiccup: an outcome not recorded
        leaves the object uncertain (confirmed or sent again)."""
        self._retrying(lambda delivery_id: self._commit(delivery_id, outcome, destination), delivery_id)

    def _commit(self, delivery_id: int, outcome: SendOutcome, destination: str) -> None:
        """One object's outcome. A success is one UPDATE, committed before anything else: until it
        is, the object is uncertain. Then, with its job's last delivery, the time to the PACS. A
        failure is due again after a backoff: uncertain if it went out without an answer (or was
        uncertain and did not go out), pending if the destination answered a failure status."""
        now = utcnow()
        if outcome.delivered:
            with self.db.session() as session:
                session.execute(
                    update(Delivery).where(Delivery.id == delivery_id)
                    .values(state=DeliveryState.SENT, sent_at=now, last_error=None, attempts=Delivery.attempts + 1)
                )
            metrics.DELIVERY_ATTEMPTS.labels(result="success").inc()
            self._observe_job_delivered(delivery_id, now)
            return
        with self.db.session() as session:
            row = session.get(Delivery, delivery_id)
            if outcome.uncertain:  # it went out and no answer came: the destination may hold it
                row.state = DeliveryState.UNCERTAIN
            elif outcome.status is not None:  # the destination answered a failure: it does not hold it
                row.state = DeliveryState.PENDING
            # not sent this time (no association, unreadable file): as it was, uncertain or pending
            row.attempts += 1
            row.last_error = outcome.error
            row.next_attempt_at = now + backoff(row.attempts, self.backoff_s, self.backoff_max_s)
            metrics.DELIVERY_ATTEMPTS.labels(result="failure").inc()
            metrics.DELIVERY_FAILURES.inc()
            log.warning("delivery %d to %s failed (attempt %d): %s; next try at %s",
                        row.id, destination, row.attempts, outcome.error, row.next_attempt_at.isoformat(timespec="seconds"))

    def _observe_job_delivered(self, delivery_id: int, now: datetime) -> None:
        """With its job's last SEG or SR delivery sent, the time from the last instance to the
        decision objects at the PACS; with the last of all (the job done: nothing more comes), to
        the PACS."""
        try:
            with self.db.session() as session:
                job, kind = session.execute(
                    select(Job, ResultObject.kind).join(ResultObject).join(Delivery).where(Delivery.id == delivery_id)
                ).one()
                decision_unsent = None
                if kind in DECISION_KINDS:
                    decision_unsent = session.scalar(
                        select(func.count()).select_from(Delivery).join(ResultObject).where(
                            ResultObject.job_id == job.id, ResultObject.kind.in_(DECISION_KINDS),
                            Delivery.state != DeliveryState.SENT))
                job_id, last_instance_at = job.id, job.last_instance_at
            if decision_unsent == 0:
                metrics.LAST_INSTANCE_TO_DECISION.observe((now - last_instance_at).total_seconds())
            observe_if_all_sent(self.db, job_id, now)
        except Exception as error:  # noqa: BLE001 - the outcome is recorded; only a metric is missed
            log.error("could not observe the time to the PACS of delivery %d: %s", delivery_id, error)


def observe_if_all_sent(db: Database, job_id: int, now: datetime | None = None) -> None:
    """Once a job is done and every result it enqueued is acknowledged, its time from the last
    instance to the PACS ends: recorded on the job (``delivered_at``) and observed, exactly once.

    Both the sender (at each acknowledgement) and the runner (at the job's end: the SEG and SR go
    out while the job still draws its reader series, and a destination may want only those) call
    this; whichever sees the last of both sets the mark, and a conditional update lets only one
    of them do it when they meet.
    """
    now = now or utcnow()
    unsent = (select(Delivery.id).join(ResultObject)
              .where(ResultObject.job_id == Job.id, Delivery.state != DeliveryState.SENT).correlate(Job).exists())
    enqueued = select(Delivery.id).join(ResultObject).where(ResultObject.job_id == Job.id).correlate(Job).exists()
    try:
        with db.session() as session:
            marked = session.execute(
                update(Job).where(Job.id == job_id, Job.state == JobState.DONE, Job.delivered_at.is_(None), enqueued, ~unsent)
                .values(delivered_at=now).returning(Job.last_instance_at)
            ).scalar_one_or_none()
        if marked is not None:
            metrics.LAST_INSTANCE_TO_ACK.observe((now - marked).total_seconds())
    except Exception as error:  # noqa: BLE001 - only a metric is missed
        log.error("could not observe the time to the PACS of job %d: %s", job_id, error)
