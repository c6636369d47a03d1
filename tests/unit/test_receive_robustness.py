"""The receive path's defences, piece by piece: header validation, records the database refuses,
PDU limits checked before allocation, deadlines, restartable loops, a journal on a failing disk."""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset

from service.dicomnet.upper_layer import Connection, ProtocolError
from service.errors import InputError
from service.ingest import journal as journal_module
from service.ingest.header import ReceivedInstance, received_instance
from service.ingest.journal import Journal, JournalEntry
from service.ingest.tracker import RecordingStopped, record_or_quarantine
from service.ops.loops import Loop
from service.store.database import Database
from service.store.models import Instance

from sqlalchemy import select


def header(**values: object) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3", "1.2.3.4", "MR"
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_header_values_the_tracker_uses_are_validated() -> None:
    item = received_instance(header(NumberOfSeriesRelatedInstances=40, AccessionNumber="A" * 16), "p", 1, "PACS")
    assert (item.expected_instances, item.accession_number, item.modality) == (40, "A" * 16, "MR")
    bad = {
        "NumberOfSeriesRelatedInstances": (["3", "4"], "2 values"),
        "AccessionNumber": ("A" * 17, "at most 16"),
        "Modality": ("M.", "code string"),
        "PatientID": ("ID\0X", "control characters"),
        "SOPInstanceUID": ("1.2.3.4.6", "not the one it was sent as"),
        "SeriesInstanceUID": ("", "not a valid UID"),
    }
    for keyword, (value, reason) in bad.items():
        with pytest.raises(InputError, match=reason):
            received_instance(header(**{keyword: value}), "p", 1, "PACS")
    huge = header()
    huge.add_new(0x00201209, "IS", "99999999999999999999")
    with pytest.raises(InputError, match="out of range"):
        received_instance(huge, "p", 1, "PACS")


def instance(sop: str, study: str = "1.2.9", series: str = "1.2.9.1", expected: int | None = None) -> ReceivedInstance:
    return ReceivedInstance(study, series, sop, "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1",
                            f"{study}/{series}/{sop}.dcm", 100, "MR", "SGPH1", "ACC1", "DWI", expected, "SCANNER")


def test_one_record_the_database_refuses_is_quarantined_and_its_batch_recorded(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    db.upgrade()
    quarantined: list[tuple[str, str]] = []
    batch = [instance("1.2.9.1.1"), instance("1.2.9.1.2", expected=10**20),  # too large for an INTEGER
             instance("1.2.9.1.3", study="1.2.8"), instance("1.2.9.1.4")]  # a series of another study
    record_or_quarantine(db, batch, lambda item, reason: quarantined.append((item.sop_uid, reason)), lambda s: False)
    with db.session() as session:
        assert set(session.scalars(select(Instance.sop_uid))) == {"1.2.9.1.1", "1.2.9.1.4"}
    assert [uid for uid, _ in quarantined] == ["1.2.9.1.2", "1.2.9.1.3"]
    assert "another study" in quarantined[1][1]
    db.dispose()


def test_while_the_database_is_down_records_wait_and_none_is_quarantined(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'missing' / 'db.sqlite'}")  # cannot be opened: OperationalError
    waits: list[float] = []
    with pytest.raises(RecordingStopped):
        record_or_quarantine(db, [instance("1.2.9.1.1")], lambda item, reason: pytest.fail(reason),
                             lambda seconds: waits.append(seconds) or len(waits) >= 3)
    assert waits == [0.5, 1.0, 2.0]  # backoff, then the caller stopped it


@pytest.mark.parametrize("kind", [0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x09])
def test_declared_lengths_are_refused_on_the_header_before_any_allocation(kind: int) -> None:
    ours, peer = socket.socketpair()
    with ours, peer:
        peer.sendall(struct.pack(">BxI", kind, 0xFFFFFFF0) + b"\0" * 64)
        connection = Connection(ours, timeout_s=5, max_pdu=16384)
        with pytest.raises(ProtocolError):
            if kind == 0x01:
                connection.read_association_request(5)
            else:
                connection.read_pdu()
        assert len(connection._body) == 0  # nothing allocated for what was only declared


def test_a_body_buffer_grows_with_the_bytes_that_arrive() -> None:
    ours, peer = socket.socketpair()
    with ours, peer:
        connection = Connection(ours, timeout_s=0.5, max_pdu=0)  # unlimited: the peer's length is trusted
        peer.sendall(struct.pack(">BxI", 0x04, 1 << 30) + b"\1" * 100_000)
        with pytest.raises(TimeoutError):
            connection.read_pdu()
        assert len(connection._body) <= 2 * 100_000  # not 1 GiB


def test_a_trickled_association_request_is_cut_at_its_deadline() -> None:
    ours, peer = socket.socketpair()
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(0.2):
            try:
                peer.send(b"\x01")
            except OSError:
                return

    with ours, peer:
        feeder = threading.Thread(target=trickle)
        feeder.start()
        started = time.monotonic()
        try:
            with pytest.raises(TimeoutError):
                Connection(ours, timeout_s=60, max_pdu=16384).read_association_request(1.0)
        finally:
            stop.set()
            feeder.join()
        assert time.monotonic() - started < 2.5  # the ARTIM deadline, not the 60 s per read


def test_a_loop_that_raises_is_down_then_restarted() -> None:
    calls: list[float] = []
    done = threading.Event()

    def target() -> None:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise RuntimeError("bug")
        done.wait(5)

    loop = Loop("test-loop", target, restart_delay_s=0.3)
    loop.start()
    time.sleep(0.15)
    assert not loop.up  # between the crash and its restart
    deadline = time.monotonic() + 5
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.05)
    assert loop.up and loop.restarts == 2
    assert calls[2] - calls[1] >= 0.55  # the delay doubles on a crash in a row
    done.set()
    loop.join(5)
    assert not loop.up


def entry(index: int, size: int = 20_000) -> JournalEntry:
    return JournalEntry("1.2.840.10008.5.1.4.1.1.2", f"1.2.3.{index}", "1.2.840.10008.1.2.1", "SCU", bytes(size))


def test_a_segment_that_cannot_be_prepared_fails_the_append_and_the_journal_goes_on(tmp_path: Path, monkeypatch) -> None:
    journal = Journal(tmp_path, segment_bytes=64 << 10)
    journal.open()
    for i in range(3):
        journal.append(entry(i))
    real = journal_module.Journal._prepare
    failing = [True]

    def prepare(self: Journal, segment: int) -> Path:
        if failing[0]:
            raise OSError(28, "No space left on device")
        return real(self, segment)

    monkeypatch.setattr(journal_module.Journal, "_prepare", prepare)
    journal._spares[0] = journal._maintenance.submit(prepare, journal, 2)  # the spare for the next segment failed
    with pytest.raises(OSError):
        journal.append(entry(3))  # the segment is full and no next one: the append fails, nothing else
    failing[0] = False
    deadline = time.monotonic() + 5
    while True:  # once the disk has room, the next append switches and succeeds
        try:
            journal.append(entry(3))
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    journal.close()
    assert [e.sop_instance_uid for _, e in Journal(tmp_path).replay()] == [f"1.2.3.{i}" for i in range(4)]


def test_open_keeps_the_segments_asked_for_and_recycles_the_rest(tmp_path: Path) -> None:
    journal = Journal(tmp_path, segment_bytes=64 << 10)
    journal.open()
    segments = [journal.append(entry(i)) for i in range(6)]
    journal.close()
    kept = Journal(tmp_path, segment_bytes=64 << 10)
    kept.open(keep={segments[0]})
    assert [e.sop_instance_uid for _, e in kept.replay_segment(segments[0])] == ["1.2.3.0", "1.2.3.1", "1.2.3.2"]
    kept.release(segments[0])
    kept.close()
    assert segments[0] not in Journal(tmp_path).segments()


def test_a_presentation_context_without_a_transfer_syntax_is_a_protocol_error() -> None:
    """Found by benchmarks/fuzz.py: pynetdicom's negotiation raised IndexError on it."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE
    from pynetdicom.presentation import build_context

    from service.ingest.scp import STORAGE_CLASSES, TRANSFER_SYNTAXES

    context = build_context("1.2.840.10008.5.1.4.1.1.2")
    context.context_id = 1
    context._transfer_syntax = []  # what a malformed A-ASSOCIATE-RQ decodes to
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = "PEER", "STROKEGATE"
    primitive.presentation_context_definition_list = [context]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    ours, peer = socket.socketpair()
    with ours, peer:
        peer.sendall(pdu.encode())
        connection = Connection(ours, timeout_s=5, max_pdu=16384)
        request = connection.read_association_request(5)
        supported = [build_context(c, list(TRANSFER_SYNTAXES)) for c in STORAGE_CLASSES]
        with pytest.raises(ProtocolError, match="presentation contexts"):
            connection.accept(request, supported, ("1.2.3", "TEST"))
