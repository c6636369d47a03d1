"""Settings, spool, tracking, the job queue, the outbox and the HTTP API, on a SQLite file."""

from __future__ import annotations

import dataclasses
import time
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.config import RESULT_CATEGORIES, Destination, load_settings
from service.delivery.outbox import ResultFile, backoff, enqueue, observe_if_all_sent, release_dead_claims, series_label
from service.delivery.scu import SeriesRelabel
from service.errors import InputError
from service.findings import ResultKind
from service.ingest.header import ReceivedInstance
from service.ingest.spool import Spool
from service.ingest.tracker import Tracker, record_instances
from service.jobs import lease
from service.ops.owners import HOST
from service.jobs.runner import _Heartbeat
from service.ops import metrics
from service.ops.http import create_app
from service.store import tokens
from service.store.database import Database
from service.store.models import Delivery, DeliveryState, Job, JobState, Study, StudyState, utcnow


def test_settings_precedence_file_then_environment_then_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "strokegate.yaml"
    config.write_text("port: 4000\nae_title: FROMFILE\ndestinations: ['PACS@10.0.0.5:104']\nseries_idle_s: 7\n")
    monkeypatch.setenv("STROKEGATE_PORT", "5000")
    settings = load_settings(config, ae_title="FROMCLI")
    assert (settings.port, settings.ae_title, settings.series_idle_s) == (5000, "FROMCLI", 7.0)
    assert settings.destinations == [Destination(ae_title="PACS", host="10.0.0.5", port=104)]
    assert load_settings().port == 5000 and load_settings().ae_title == "STROKEGATE"


@pytest.mark.parametrize("bad", [{"ae_title": "WAY_TOO_LONG_AE_TITLE"}, {"ae_title": "A\\B"}, {"port": 70000},
                                 {"destinations": ["PACS-no-port"]}, {"series_idle_s": 0}])
def test_settings_reject_bad_values_clearly(bad: dict) -> None:
    with pytest.raises((ValidationError, ValueError)):
        load_settings(**bad)


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="configuration file not found"):
        load_settings(tmp_path / "missing.yaml")


def test_spool_writes_atomically_keeps_the_first_copy_and_refuses_unsafe_uids(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    entry = spool.store("1.2.3", "1.2.3.4", "1.2.3.4.5", [b"abc", b"def"])
    assert (spool.root / entry.path).read_bytes() == b"abcdef" and not entry.existed
    again = spool.store("1.2.3", "1.2.3.4", "1.2.3.4.5", [b"other"])
    assert again.existed and (spool.root / entry.path).read_bytes() == b"abcdef"
    assert not list(spool.root.rglob("*.part"))
    for bad in ("../../etc", "1.2.3/4", "", "1" * 65):
        with pytest.raises(InputError, match="not a valid UID"):
            spool.store(bad, "1.2", "1.3", [b"x"])
    (spool.root / "1.2.3" / "1.2.3.4" / ".9.9.part").write_bytes(b"partial")
    assert spool.clean_partial() == 1
    assert spool.files() == [Path("1.2.3/1.2.3.4/1.2.3.4.5.dcm")]
    assert spool.remove_study("1.2.3") == 6 and spool.files() == []


def instance(sop: str, study: str = "1.2.9", series: str = "1.2.9.1", expected: int | None = None) -> ReceivedInstance:
    return ReceivedInstance(study, series, sop, "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1",
                            f"{study}/{series}/{sop}.dcm", 100, "MR", "SGPH1", "ACC1", "DWI", expected, "SCANNER")


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    database.upgrade()
    yield database
    database.dispose()


def test_a_quiet_study_becomes_a_job_and_late_instances_start_a_new_version(db: Database, tmp_path: Path) -> None:
    tracker = Tracker(db, Spool(tmp_path / "spool"), series_idle_s=10, retention_hours=24)
    t0 = utcnow()
    with db.session() as s:
        assert record_instances(s, [instance("1.1"), instance("1.2"), instance("1.1")], t0) == 2
    assert tracker.tick(t0 + timedelta(seconds=5)) == []  # not idle yet
    assert len(tracker.tick(t0 + timedelta(seconds=11))) == 1
    with db.session() as s:
        assert record_instances(s, [instance("1.2")], t0) == 0  # a resend is not new data
        assert s.query(Study).one().state == StudyState.QUEUED
        assert record_instances(s, [instance("1.3")], t0 + timedelta(seconds=12)) == 1
        assert s.query(Study).one().state == StudyState.RECEIVING
    assert len(tracker.tick(t0 + timedelta(seconds=23))) == 1
    with db.session() as s:
        assert [j.version for j in s.query(Job).order_by(Job.id)] == [1, 2]


def test_a_study_is_not_quiet_while_an_instance_received_during_it_is_not_yet_recorded(
    db: Database, tmp_path: Path
) -> None:
    """Instances are acknowledged first and recorded later: one still in that backlog, received
    while the study was active, may belong to it, so the study waits for it."""
    t0 = utcnow()
    unsettled: list = [t0 + timedelta(seconds=3)]
    tracker = Tracker(db, Spool(tmp_path / "spool"), series_idle_s=10, retention_hours=24,
                      unsettled_since=lambda: unsettled[0])
    with db.session() as s:
        record_instances(s, [dataclasses.replace(instance("1.1"), received_at=t0)], t0 + timedelta(seconds=20))
    assert tracker.tick(t0 + timedelta(seconds=30)) == []  # idle by its own clock, but one may be on its way
    unsettled[0] = t0 + timedelta(seconds=40)  # what waits now arrived after the study went quiet
    assert len(tracker.tick(t0 + timedelta(seconds=41))) == 1
    with db.session() as s:
        assert s.query(Study).one().last_received_at == t0  # the receive time, not the recording time


def test_expected_count_completes_a_series_before_the_idle_time(db: Database, tmp_path: Path) -> None:
    tracker = Tracker(db, Spool(tmp_path / "spool"), series_idle_s=600, retention_hours=24)
    t0 = utcnow()
    with db.session() as s:
        record_instances(s, [instance("2.1", expected=2)], t0)
    assert tracker.tick(t0) == []
    with db.session() as s:
        record_instances(s, [instance("2.2", expected=2)], t0)
    assert len(tracker.tick(t0)) == 1


def queued_job(db: Database) -> int:
    with db.session() as s:
        record_instances(s, [instance("3.1")], utcnow() - timedelta(hours=1))
    return Tracker(db, Spool(Path(db.url.removeprefix("sqlite:///")).with_suffix(".spool")), 1, 24).tick(utcnow())[0]


def test_a_job_is_claimed_by_one_worker_and_retried_when_its_lease_expires(db: Database) -> None:
    job_id = queued_job(db)
    first = lease.claim(db, "host:1:a", lease_s=60, max_attempts=3)
    assert first is not None and first.id == job_id
    assert lease.claim(db, "host:2:b", lease_s=60, max_attempts=3) is None  # never twice at once
    later = utcnow() + timedelta(seconds=61)
    second = lease.claim(db, "host:2:b", lease_s=60, max_attempts=3, now=later)
    assert second is not None and second.attempts == 2
    assert not lease.finish(db, job_id, "host:1:a", JobState.DONE)  # the first worker lost its lease
    assert lease.finish(db, job_id, "host:2:b", JobState.DONE, findings={"core": 1.0})
    with db.session() as s:
        assert s.get(Study, 1).state == StudyState.DONE


def test_a_worker_whose_lease_was_taken_over_stops_renewing_it(db: Database) -> None:
    job_id = queued_job(db)
    assert lease.claim(db, "host:1:a", lease_s=0.3, max_attempts=3)
    heartbeat = _Heartbeat(db, job_id, "host:1:a", lease_s=0.3)
    try:
        time.sleep(0.5)  # renewed meanwhile: still ours
        assert not heartbeat.lost
        with db.session() as s:  # its lease lapsed (a stalled worker) and another worker took the job
            s.get(Job, job_id).lease_owner = "host:2:b"
        for _ in range(50):
            if heartbeat.lost:
                break
            time.sleep(0.05)
        assert heartbeat.lost  # so its analysis writes and records nothing
        with db.session() as s:
            assert s.get(Job, job_id).lease_owner == "host:2:b"  # the new owner's lease was not renewed away
    finally:
        heartbeat.stop()


def test_dead_local_owners_release_their_jobs_and_attempts_are_bounded(db: Database) -> None:
    job_id = queued_job(db)
    dead = f"{HOST}:999999:zz"
    assert lease.claim(db, dead, lease_s=3600, max_attempts=2)
    assert lease.release_dead_leases(db) == 1
    assert lease.claim(db, "x:1:a", lease_s=0.0, max_attempts=2)  # attempt 2, lease already expired
    assert lease.claim(db, "x:1:b", lease_s=60, max_attempts=2) is None  # attempt 3 > 2: failed
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job.state == JobState.FAILED and "gave up after 2 attempts" in job.error


def test_backoff_doubles_up_to_the_maximum() -> None:
    assert [backoff(n, 2, 30).total_seconds() for n in range(1, 7)] == [2, 4, 8, 16, 30, 30]


def test_outbox_rows_are_written_once_per_object_and_destination(db: Database) -> None:
    job_id = queued_job(db)
    files = [ResultFile(ResultKind.parse("SEG"), "9.1", "1.2.840.10008.5.1.4.1.1.66.4", "a/SEG.dcm"), ResultFile(ResultKind.parse("SR"), "9.2", "1.2.840.10008.5.1.4.1.1.88.34", "a/SR.dcm")]
    for _ in range(2):
        with db.session() as s:
            enqueue(s, s.get(Job, job_id), files, {"PACS@h:1": RESULT_CATEGORIES, "VNA@h:2": RESULT_CATEGORIES})
    with db.session() as s:
        assert s.query(Delivery).count() == 4


def test_the_time_to_the_pacs_is_observed_once_when_the_job_is_done_and_all_is_acknowledged(db: Database) -> None:
    """The sender (at each acknowledgement) and the runner (at the job's end) both ask; only the one
    that sees the job done with nothing left unsent marks it, once, and a later revision's report
    (a new SR for a late NIHSS) does not count again."""
    job_id = queued_job(db)
    owner = "host:1:a"
    assert lease.claim(db, owner, lease_s=60, max_attempts=3) is not None
    files = [ResultFile(ResultKind.parse(k), f"8.{i}", "1.2.840.10008.5.1.4.1.1.66.4", f"c/{k}.dcm")
             for i, k in enumerate(("SEG", "SR"))]
    with db.session() as s:
        enqueue(s, s.get(Job, job_id), files, {"PACS@h:1": RESULT_CATEGORIES})
    def observations() -> float:
        return next(s.value for s in metrics.LAST_INSTANCE_TO_ACK.collect()[0].samples if s.name.endswith("_count"))

    before = observations()

    def sent(kind: str) -> None:
        with db.session() as s:
            for d in s.query(Delivery).join(Delivery.result).filter_by(kind=kind):
                d.state = DeliveryState.SENT

    sent("SEG")
    sent("SR")
    observe_if_all_sent(db, job_id)  # everything acknowledged, the job still running: not yet
    assert lease.finish(db, job_id, owner, JobState.DONE)
    observe_if_all_sent(db, job_id)
    observe_if_all_sent(db, job_id)  # the other side, after: nothing more
    with db.session() as s:
        enqueue(s, s.get(Job, job_id), [ResultFile(ResultKind.parse("SR"), "8.9", "1.2.840.10008.5.1.4.1.1.88.34", "c/SR-r2.dcm")],
                {"PACS@h:1": RESULT_CATEGORIES})
    sent("SR")
    observe_if_all_sent(db, job_id)
    assert observations() - before == 1
    with db.session() as s:
        assert s.get(Job, job_id).delivered_at is not None


def test_deliveries_claimed_by_a_sender_that_died_are_due_again_at_once(db: Database) -> None:
    """A service killed mid-round held its claimed deliveries for claim_s (10 min); at the next
    start those of a dead sender of this host are due at once, a living or remote sender's kept."""
    job_id = queued_job(db)
    files = [ResultFile(ResultKind.parse(k), f"9.{i}", "1.2.840.10008.5.1.4.1.1.66.4", f"a/{k}.dcm")
             for i, k in enumerate(("SEG", "SR", "SUMMARY"))]
    with db.session() as s:
        enqueue(s, s.get(Job, job_id), files, {"PACS@h:1": RESULT_CATEGORIES})
    later = utcnow() + timedelta(minutes=10)
    owners = [f"{HOST}:999999:zz", f"{HOST}:1:live", "elsewhere:1:a"]  # pid 1 lives
    with db.session() as s:
        for delivery, owner in zip(s.query(Delivery).order_by(Delivery.id), owners, strict=True):
            delivery.next_attempt_at, delivery.claimed_by = later, owner
    assert release_dead_claims(db) == 1
    with db.session() as s:
        rows = s.query(Delivery).order_by(Delivery.id).all()
        assert [r.claimed_by for r in rows] == [None, owners[1], owners[2]]
        assert rows[0].next_attempt_at <= utcnow() < rows[1].next_attempt_at


def test_each_destination_gets_only_the_results_it_asks_for(db: Database) -> None:
    viewer = Destination.parse("VIEWER@h:3?send=summary+maps")
    assert viewer.send == ["summary", "maps"] and viewer.name == "VIEWER@h:3"
    with pytest.raises(ValueError, match="send: no result category"):
        Destination.parse("X@h:4?send=seg+pixels")
    job_id = queued_job(db)
    files = [ResultFile(ResultKind.parse(kind), f"7.{n}", "1.2", f"b/{kind}.dcm") for n, kind in
             enumerate(["SEG", "SR", "SUMMARY", "MAP-cbf-001", "PM-cbf"])]
    with db.session() as s:
        enqueue(s, s.get(Job, job_id), files, {viewer.name: viewer.send, "PACS@h:1": RESULT_CATEGORIES})
    with db.session() as s:
        kinds = {(d.destination, d.result.kind) for d in s.query(Delivery)}
    assert {k for d, k in kinds if d == "VIEWER@h:3"} == {"SUMMARY", "MAP-cbf-001"}
    assert len({k for d, k in kinds if d == "PACS@h:1"}) == 5


def test_a_destination_labels_each_result_series_its_own_way(tmp_path: Path) -> None:
    config = tmp_path / "strokegate.yaml"
    config.write_text(
        "destinations:\n"
        "  - {ae_title: PACS, host: pacs, port: 104, series: {seg: {number: 1901}, maps: {number: 2911, description: 'AI {map}'},"
        " values: {description: AI values}, summary: {description: Research summary}}}\n"
    )
    (pacs,) = load_settings(config).destinations
    assert series_label(pacs, ResultKind.parse("SEG")) == SeriesRelabel(number=1901)
    assert series_label(pacs, ResultKind.parse("SR")) is None  # not set: sent as written
    assert series_label(pacs, ResultKind.parse("SUMMARY")) == SeriesRelabel(description="Research summary")  # says it already
    assert series_label(pacs, ResultKind.parse("MAP-cbf-004")) == SeriesRelabel(number=2911, description="AI CBF (RESEARCH)")
    assert series_label(pacs, ResultKind.parse("MAP-tmax-001")) == SeriesRelabel(number=2915, description="AI Tmax (RESEARCH)")  # its place
    assert series_label(pacs, ResultKind.parse("PM-cbv")) == SeriesRelabel(description="AI values CBV (RESEARCH)")
    with pytest.raises(ValidationError, match="series: no result category"):
        Destination(ae_title="X", host="h", port=1, series={"pixels": {"number": 5}})
    with pytest.raises(ValidationError):
        Destination(ae_title="X", host="h", port=1, series={"seg": {"number": 0}})
    longest = Destination(ae_title="X", host="h", port=1, series={"maps": {"description": "x" * 48}})
    assert len(series_label(longest, ResultKind.parse("MAP-tmax-001")).description) <= 64  # LO: the DICOM limit


def test_http_api_health_metrics_and_studies(db: Database) -> None:
    queued_job(db)
    client = TestClient(create_app(db, ready=lambda: True), headers={"Authorization": f"Bearer {tokens.create(db, 'r', tokens.Role.READER)}"})
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    assert "strokegate_build_info" in client.get("/metrics").text
    studies = client.get("/api/studies").json()
    assert studies[0]["study_instance_uid"] == "1.2.9" and studies[0]["state"] == "queued"
    assert client.get("/api/studies/1.2.9").json()["series"][0]["instances"] == 1
    assert client.get("/api/studies/9.9.9").status_code == 404
    assert client.get("/api/summary").json()["jobs"] == {"queued": 1}
    not_ready = TestClient(create_app(db, ready=lambda: False))
    assert not_ready.get("/readyz").status_code == 503


def test_spool_of_finished_studies_is_purged_after_the_retention_period(db: Database, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.store("1.2.9", "1.2.9.1", "5.1", [b"pixels"])
    tracker = Tracker(db, spool, series_idle_s=1, retention_hours=2)
    t0 = utcnow()
    with db.session() as s:
        record_instances(s, [instance("5.1")], t0)
    job_id = tracker.tick(t0 + timedelta(seconds=2))[0]
    assert tracker.purge(t0 + timedelta(hours=3)) == 0  # not finished yet: kept
    owner = "h:1:a"
    assert lease.claim(db, owner, 60, 3, now=t0 + timedelta(seconds=3))
    assert lease.finish(db, job_id, owner, JobState.DONE)
    assert tracker.purge(t0 + timedelta(hours=1)) == 0  # finished, but within retention
    assert tracker.purge(t0 + timedelta(hours=3)) == 1
    assert spool.files() == []
    with db.session() as s:
        assert s.get(Study, 1).purged_at is not None


def test_our_own_results_coming_back_do_not_start_a_new_version(db: Database, tmp_path: Path) -> None:
    tracker = Tracker(db, Spool(tmp_path / "spool"), series_idle_s=1, retention_hours=24)
    t0 = utcnow()
    with db.session() as s:
        record_instances(s, [instance("6.1")], t0)
    job_id = tracker.tick(t0 + timedelta(seconds=2))[0]
    with db.session() as s:
        enqueue(s, s.get(Job, job_id), [ResultFile(ResultKind.parse("SEG"), "6.9", "1.2.840.10008.5.1.4.1.1.66.4", "x/SEG.dcm")], {})
        assert record_instances(s, [instance("6.9", series="1.2.9.901")], t0 + timedelta(seconds=3)) == 0
        assert s.get(Study, 1).state == StudyState.QUEUED
