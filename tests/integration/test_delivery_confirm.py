"""Uncertain result objects (sent, no outcome recorded) against real destinations: dcmtk dcmqrscp,
which answers C-FIND and logs every C-STORE it receives, confirms the one it holds, which is then
not sent again; storescp, which answers no query, gets it again (at least once, never lost);
Orthanc answers the same query."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from dicom_tools import find_orthanc, requires_storescu, run_orthanc
from service.config import ConfirmMode, Destination
from service.delivery.confirm import Holding, ObjectKeys, ask_holding
from service.delivery.outbox import Sender
from service.delivery.scu import send_files
from service.ops import metrics
from service.ops.startup import open_database
from service.phantom.generate import write_patient
from service.phantom.patient import PhantomOptions
from service.store.database import Database
from service.store.models import Delivery, DeliveryState, Job, ResultObject, Study, StudyState, utcnow
from service_harness import QueryRetrieveSCP, StoreSCP, free_port

pytestmark = [pytest.mark.integration, requires_storescu, pytest.mark.timeout(120),
              pytest.mark.skipif(shutil.which("dcmqrscp") is None, reason="dcmtk dcmqrscp not installed")]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results folder with three DICOM objects (stand-ins for result objects: any storable instance)."""
    out = tmp_path_factory.mktemp("confirm")
    write_patient(4, "mri", out / "phantom", PhantomOptions(mr_matrix=32, mr_slices=3, mr_frames=3))
    folder = out / "results"
    folder.mkdir()
    for number, path in enumerate(sorted((out / "phantom").rglob("*.dcm"))[:3]):
        shutil.copy(path, folder / f"R{number}.dcm")
    return folder


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = open_database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    yield database
    database.dispose()


def outbox(db: Database, results: Path, destination: str, states: list[DeliveryState]) -> list[int]:
    """One delivery of R0, R1 ... to ``destination`` in each of ``states``; their ids."""
    ids = []
    with db.session() as session:
        study = Study(study_uid="1.2.826.0.1.3680043.8.498.11", state=StudyState.DONE, versions=1)
        job = Job(study=study, version=1, last_instance_at=utcnow())
        session.add_all([study, job])
        for number, state in enumerate(states):
            path = f"R{number}.dcm"
            meta = pydicom.dcmread(results / path, stop_before_pixels=True)
            result = ResultObject(job=job, kind="SEG", sop_uid=str(meta.SOPInstanceUID),
                                  sop_class_uid=str(meta.SOPClassUID), path=path)
            delivery = Delivery(result=result, destination=destination, state=state, attempts=1 if state != DeliveryState.PENDING else 0)
            session.add_all([result, delivery])
            session.flush()
            ids.append(delivery.id)
    return ids


def states(db: Database) -> list[DeliveryState]:
    with db.session() as session:
        return [d.state for d in session.query(Delivery).order_by(Delivery.id)]


def uid(results: Path, number: int) -> str:
    return str(pydicom.dcmread(results / f"R{number}.dcm", stop_before_pixels=True).SOPInstanceUID)


def keys(results: Path, number: int) -> ObjectKeys:
    header = pydicom.dcmread(results / f"R{number}.dcm", stop_before_pixels=True)
    return ObjectKeys(str(header.StudyInstanceUID), str(header.SeriesInstanceUID), str(header.SOPInstanceUID))


def test_an_uncertain_object_the_pacs_holds_is_confirmed_by_c_find_and_not_sent_again(
    tmp_path: Path, results: Path, db: Database,
) -> None:
    pacs = QueryRetrieveSCP(tmp_path / "pacs").start()
    try:
        destination = Destination.parse(f"{pacs.address}?confirm=find")
        # R0 reached the PACS before the crash, R1 did not (both uncertain); R2 was never tried
        assert send_files(destination, [results / "R0.dcm"], "STROKEGATE")[0].delivered
        assert pacs.stores() == [uid(results, 0)]
        outbox(db, results, destination.name, [DeliveryState.UNCERTAIN, DeliveryState.UNCERTAIN, DeliveryState.PENDING])
        held_before = metrics.DELIVERY_CONFIRMATIONS.labels(answer="held")._value.get()
        absent_before = metrics.DELIVERY_CONFIRMATIONS.labels(answer="absent")._value.get()

        sender = Sender(db, results, "STROKEGATE", 0.1, 1.0, [destination])
        assert sender.send_due(utcnow()) == 3

        assert states(db) == [DeliveryState.SENT] * 3
        assert sorted(pacs.stores()) == sorted([uid(results, 0), uid(results, 1), uid(results, 2)])  # R0 once
        assert metrics.DELIVERY_CONFIRMATIONS.labels(answer="held")._value.get() == held_before + 1
        assert metrics.DELIVERY_CONFIRMATIONS.labels(answer="absent")._value.get() == absent_before + 1
        with db.session() as session:
            first = session.query(Delivery).order_by(Delivery.id).first()
            assert first.attempts == 1 and first.sent_at is not None  # confirmed, not attempted again
        assert ask_holding(destination, [keys(results, n) for n in range(3)], "STROKEGATE", 10) == [Holding.HELD] * 3
    finally:
        pacs.stop()


def test_an_uncertain_object_is_sent_again_when_the_query_fails(tmp_path: Path, results: Path, db: Database) -> None:
    pacs = StoreSCP(tmp_path / "pacs", extra_args=("+uf",)).start()  # stores, answers no C-FIND
    try:
        destination = Destination.parse(f"{pacs.address}?confirm=find")
        assert send_files(destination, [results / "R0.dcm"], "STROKEGATE")[0].delivered
        outbox(db, results, destination.name, [DeliveryState.UNCERTAIN])
        unknown_before = metrics.DELIVERY_CONFIRMATIONS.labels(answer="unknown")._value.get()

        assert Sender(db, results, "STROKEGATE", 0.1, 1.0, [destination]).send_due(utcnow()) == 1

        assert states(db) == [DeliveryState.SENT]
        assert [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in pacs.files()] == [uid(results, 0)] * 2
        assert metrics.DELIVERY_CONFIRMATIONS.labels(answer="unknown")._value.get() == unknown_before + 1
    finally:
        pacs.stop()


def test_a_destination_that_is_down_leaves_an_uncertain_object_uncertain(results: Path, db: Database) -> None:
    destination = Destination(ae_title="PACS", host="127.0.0.1", port=free_port(), confirm=ConfirmMode.FIND,
                              confirm_timeout_s=2)
    outbox(db, results, destination.name, [DeliveryState.UNCERTAIN, DeliveryState.PENDING])
    assert ask_holding(destination, [keys(results, 0)], "STROKEGATE", 2) == [Holding.UNKNOWN]

    assert Sender(db, results, "STROKEGATE", 0.1, 1.0, [destination]).send_due(utcnow()) == 0

    assert states(db) == [DeliveryState.UNCERTAIN, DeliveryState.PENDING]  # nothing went out: as they were
    with db.session() as session:
        assert all(d.attempts >= 1 and d.next_attempt_at > utcnow() and "not established" in d.last_error
                   for d in session.query(Delivery))


@pytest.mark.skipif(find_orthanc() is None, reason="Orthanc not installed")
def test_orthanc_answers_the_confirmation_query(tmp_path: Path, results: Path) -> None:
    with run_orthanc(tmp_path / "orthanc", overrides={"DicomAlwaysAllowFind": True}) as orthanc:
        destination = Destination(ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port, confirm=ConfirmMode.FIND)
        assert send_files(destination, [results / "R0.dcm"], "STROKEGATE")[0].delivered
        assert ask_holding(destination, [keys(results, 0), keys(results, 1)], "STROKEGATE", 10) == [Holding.HELD, Holding.ABSENT]
