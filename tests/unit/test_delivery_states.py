"""The outbox's delivery states: pending (to send), uncertain (on the wire, no outcome recorded),
sent; what each outcome moves a delivery to, and the C-FIND identifier the confirmation sends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import ConfirmMode, Destination
from service.delivery.confirm import ObjectKeys, identifier, matched_uid
from service.delivery.outbox import DueObject, Sender
from service.delivery.scu import SendOutcome
from service.findings import ResultKind
from service.ops.startup import open_database
from service.store.database import Database
from service.store.models import Delivery, DeliveryState, Job, ResultObject, Study, StudyState, utcnow

PACS = "PACS@127.0.0.1:104"


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = open_database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    yield database
    database.dispose()


@pytest.fixture
def sender(db: Database, tmp_path: Path) -> Sender:
    return Sender(db, tmp_path, "STROKEGATE", 1.0, 8.0, [Destination.parse(PACS)])


def delivery(db: Database, state: DeliveryState = DeliveryState.PENDING) -> int:
    with db.session() as session:
        study = Study(study_uid="1.2.826.0.1.3680043.8.498.5", state=StudyState.DONE, versions=1)
        job = Job(study=study, version=1, last_instance_at=utcnow())
        result = ResultObject(job=job, kind="SEG", sop_uid="1.2.826.0.1.3680043.8.498.6", sop_class_uid="1.2", path="r.dcm")
        row = Delivery(result=result, destination=PACS, state=state)
        session.add_all([study, job, result, row])
        session.flush()
        return row.id


def row(db: Database, delivery_id: int) -> tuple[DeliveryState, int, str | None]:
    with db.session() as session:
        d = session.get(Delivery, delivery_id)
        return d.state, d.attempts, d.last_error


def test_an_attempt_is_uncertain_until_its_response_is_recorded_then_sent(db: Database, sender: Sender) -> None:
    delivery_id = delivery(db)
    sender._mark_attempt(delivery_id)
    assert row(db, delivery_id) == (DeliveryState.UNCERTAIN, 0, None)
    sender._record(delivery_id, SendOutcome(Path("r.dcm"), 0x0000, None), PACS)
    assert row(db, delivery_id) == (DeliveryState.SENT, 1, None)


def test_a_failure_status_means_the_destination_lacks_it_pending_again(db: Database, sender: Sender) -> None:
    delivery_id = delivery(db, DeliveryState.UNCERTAIN)
    sender._record(delivery_id, SendOutcome(Path("r.dcm"), 0xA700, "status 0xA700"), PACS)
    assert row(db, delivery_id) == (DeliveryState.PENDING, 1, "status 0xA700")


def test_an_object_lost_in_flight_stays_uncertain(db: Database, sender: Sender) -> None:
    delivery_id = delivery(db)
    sender._mark_attempt(delivery_id)
    sender._record(delivery_id, SendOutcome(Path("r.dcm"), None, "association lost: timed out", uncertain=True), PACS)
    assert row(db, delivery_id) == (DeliveryState.UNCERTAIN, 1, "association lost: timed out")
    with db.session() as session:
        assert session.get(Delivery, delivery_id).next_attempt_at > utcnow()  # after a backoff, like any failure


@pytest.mark.parametrize("state", [DeliveryState.PENDING, DeliveryState.UNCERTAIN])
def test_an_object_that_did_not_go_out_keeps_its_state(db: Database, sender: Sender, state: DeliveryState) -> None:
    delivery_id = delivery(db, state)
    sender._record(delivery_id, SendOutcome(Path("r.dcm"), None, "association not established: refused"), PACS)
    assert row(db, delivery_id) == (state, 1, "association not established: refused")


def test_a_confirmed_object_is_sent_without_a_new_attempt(db: Database, sender: Sender) -> None:
    delivery_id = delivery(db, DeliveryState.UNCERTAIN)
    sender._mark_sent(delivery_id)
    assert row(db, delivery_id) == (DeliveryState.SENT, 0, None)


def test_with_confirm_none_uncertain_objects_are_sent_again_without_asking(sender: Sender, tmp_path: Path) -> None:
    item = DueObject(1, tmp_path / "missing.dcm", ResultKind.parse("SEG"), uncertain=True)
    assert sender._confirm(Destination.parse(PACS), [item]) == set()


def test_the_confirm_setting_is_read_from_the_destination_and_checked() -> None:
    assert Destination.parse(PACS).confirm is ConfirmMode.NONE
    destination = Destination.parse(f"{PACS}?send=seg&confirm=find")
    assert destination.confirm is ConfirmMode.FIND and destination.confirm_timeout_s == 10.0
    with pytest.raises(ValueError, match="confirm=none|find"):
        Destination.parse(f"{PACS}?confirm=commitment")
    with pytest.raises(ValidationError):
        Destination(ae_title="PACS", host="h", port=104, confirm_timeout_s=0)


def test_the_c_find_identifier_asks_for_one_instance_at_image_level() -> None:
    keys = ObjectKeys("1.2.3", "1.2.3.4", "1.2.3.4.5")
    encoded = identifier(keys)
    assert matched_uid(encoded) == "1.2.3.4.5"
    assert b"IMAGE" in encoded and encoded.startswith(b"\x08\x00\x18\x00")  # (0008,0018) implicit VR, LE
    # a match cut short names no UID of ours: not held
    assert matched_uid(b"\x08\x00\x18\x00\xff\xff\xff\x7f1") == "1" and matched_uid(b"") == ""
