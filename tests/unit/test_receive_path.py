"""The receive path's own codecs and its journal: what a crash or a recycled segment must not break."""

from __future__ import annotations

import os
import socket
import struct
import time
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pynetdicom.dsutils import decode, encode

from service.errors import InputError
from service.dicomnet.dimse import C_ECHO_RQ, C_STORE_RQ, decode_command, encode_response
from service.ingest import journal as journal_module
from service.ingest.journal import Journal, JournalEntry, claim_folder, remove_orphan
from service.ingest.spool import part10_header
from service.dicomnet.upper_layer import Connection, PeerGone, ProtocolError


def store_request(sop_uid: str = "1.2.826.0.1.3680043.8.498.1") -> bytes:
    ds = Dataset()
    ds.CommandGroupLength = 0
    ds.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.CommandField = C_STORE_RQ
    ds.MessageID = 7
    ds.Priority = 0
    ds.CommandDataSetType = 0x0000
    ds.AffectedSOPInstanceUID = sop_uid
    ds.MoveOriginatorApplicationEntityTitle = "MOVER"
    return encode(ds, True, True)


def test_command_sets_read_and_written_as_pydicom_does() -> None:
    request = decode_command(store_request())
    assert (request.command_field, request.message_id, request.has_dataset) == (C_STORE_RQ, 7, True)
    assert request.sop_instance_uid == "1.2.826.0.1.3680043.8.498.1"
    assert request.move_originator_ae == "MOVER"
    response = decode(BytesIO(encode_response(request, 0xA700, "disk full")), True, True)
    assert response.CommandField == 0x8001 and response.MessageIDBeingRespondedTo == 7
    assert response.Status == 0xA700 and response.ErrorComment == "disk full"
    assert response.AffectedSOPInstanceUID == request.sop_instance_uid
    assert response.CommandDataSetType == 0x0101
    assert response.CommandGroupLength == len(encode_response(request, 0xA700, "disk full")) - 12
    echo = Dataset()
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    echo.CommandField = C_ECHO_RQ
    echo.MessageID = 1
    echo.CommandDataSetType = 0x0101
    echo_request = decode_command(encode(echo, True, True))
    assert not echo_request.has_dataset
    assert "AffectedSOPInstanceUID" not in decode(BytesIO(encode_response(echo_request, 0)), True, True)


@pytest.mark.parametrize("broken", [b"\x00\x00\x00\x01\x04", b"\x08\x00\x16\x00\x02\x00\x00\x00ab", store_request()[:-3]])
def test_malformed_command_sets_are_input_errors(broken: bytes) -> None:
    with pytest.raises(InputError):
        decode_command(broken)


@pytest.mark.parametrize("calling_ae", ["STORESCU", "ODD", ""])
def test_file_meta_matches_pydicom(calling_ae: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.12345"
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    meta.ImplementationClassUID = "2.25.991"
    meta.ImplementationVersionName = "STROKEGATE_0.1"
    if calling_ae:
        meta.SourceApplicationEntityTitle = calling_ae
    expected = BytesIO()
    expected.write(bytes(128) + b"DICM")
    write_file_meta_info(expected, meta, enforce_standard=True)
    mine = part10_header("1.2.840.10008.5.1.4.1.1.4", "1.2.826.0.1.3680043.8.498.12345", "1.2.840.10008.1.2.1",
                         "2.25.991", "STROKEGATE_0.1", calling_ae)
    assert mine == expected.getvalue()


def entry(index: int, size: int = 1000) -> JournalEntry:
    return JournalEntry("1.2.840.10008.5.1.4.1.1.2", f"1.2.3.{index}", "1.2.840.10008.1.2.1", "SCU",
                        bytes([index % 251]) * size)


def test_journal_replays_every_record_and_ignores_a_torn_tail(tmp_path: Path) -> None:
    journal = Journal(tmp_path, segment_bytes=1 << 20)
    journal.open()
    for index in range(5):
        journal.append(entry(index))
    journal.close()
    segment = tmp_path / f"{journal.segments()[0]:016d}.wal"
    with open(segment, "r+b") as file:  # a sixth record whose last bytes never reached the disk
        data = file.read()
        end = data.index(b"\0" * 2048)
        record_size = end // 5
        file.seek(end)
        file.write(data[end - record_size : end - 100].replace(b"1.2.3.4", b"1.2.3.5"))
    replayed = [e for _, e in Journal(tmp_path).replay()]
    assert [e.sop_instance_uid for e in replayed] == [f"1.2.3.{i}" for i in range(5)]
    assert replayed[3] == entry(3)


def test_journal_recycles_filed_segments_without_replaying_their_old_records(tmp_path: Path) -> None:
    journal = Journal(tmp_path, segment_bytes=64 << 10)
    journal.open()
    segments = [journal.append(entry(i, 20_000)) for i in range(12)]  # three records per segment
    assert len(set(segments)) == 4
    for segment in segments[:9]:
        journal.filed(segment)  # the first three segments are closed and filed: recycled
    journal.close()
    leftover = [e.sop_instance_uid for _, e in Journal(tmp_path).replay()]
    assert leftover == [f"1.2.3.{i}" for i in range(9, 12)]  # only the unfiled records come back
    restarted = Journal(tmp_path, segment_bytes=64 << 10)
    restarted.open()  # recycles the old segments, stale records and all
    restarted.append(entry(99, 20_000))
    restarted.close()
    assert [e.sop_instance_uid for _, e in Journal(tmp_path).replay()] == ["1.2.3.99"]
    assert len(os.listdir(tmp_path)) <= 5  # current + spares + recycled, not one file per segment ever used


def test_journal_prepares_a_new_segment_in_a_pause_while_a_spare_is_ready(tmp_path: Path, monkeypatch) -> None:
    """Zero-filling a segment during a study would slow every fdatasync of the receive path."""
    monkeypatch.setattr(journal_module, "_QUIET_S", 1.0)
    journal = Journal(tmp_path, segment_bytes=64 << 10)
    journal.open()  # segment 1, spares 2 and 3 ready
    for i in range(4):
        journal.append(entry(i, 20_000))  # the fourth switches to segment 2: segment 4 is now due
    assert not (tmp_path / f"{4:016d}.wal").exists()  # deferred: segment 3 is ready
    deadline = time.monotonic() + 10
    while not (tmp_path / f"{4:016d}.wal").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / f"{4:016d}.wal").exists()  # prepared once the appends paused
    for i in range(4, 10):  # on through segments 3 and 4
        journal.append(entry(i, 20_000))
    journal.close()
    assert len(list(Journal(tmp_path).replay())) == 10


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">IBB", len(data) + 2, context_id, control) + data


def p_data(*items: bytes) -> bytes:
    body = b"".join(items)
    return struct.pack(">BxI", 0x04, len(body)) + body


def test_messages_are_reassembled_from_fragments_however_the_pdus_cut_them() -> None:
    ours, peer = socket.socketpair()
    with ours, peer:
        connection = Connection(ours, timeout_s=5, max_pdu=16384)
        command = store_request()
        dataset = bytes(range(256)) * 40
        peer.sendall(
            p_data(pdv(1, 0x01, command[:10]))  # a command in two fragments
            + p_data(pdv(1, 0x03, command[10:]), pdv(1, 0x00, dataset[:5000]))
            + p_data(pdv(1, 0x00, dataset[5000:9000]), pdv(1, 0x02, dataset[9000:]),
                     pdv(1, 0x03, store_request("1.2.3.9")), pdv(1, 0x02, b"next"))  # the next message shares it
            + bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0])  # A-RELEASE-RQ
        )
        first = connection.read_message({1: None})
        second = connection.read_message({1: None})
        assert bytes(first.dataset) == dataset and first.command.sop_instance_uid.endswith(".1")
        assert bytes(second.dataset) == b"next" and second.command.sop_instance_uid == "1.2.3.9"
        assert connection.read_message({1: None}) is None
        assert peer.recv(10)[:1] == b"\x06"  # A-RELEASE-RP


@pytest.mark.parametrize(
    "stream",
    [
        p_data(pdv(3, 0x03, store_request())),  # a presentation context never accepted
        p_data(pdv(1, 0x02, b"data before any command")),
        bytes([0x01, 0, 0, 0, 0, 4, 0, 0, 0, 0]),  # A-ASSOCIATE-RQ on an established association
        p_data(struct.pack(">IBB", 400, 1, 0x03)),  # a PDV longer than its PDU
    ],
)
def test_protocol_violations_are_protocol_errors(stream: bytes) -> None:
    ours, peer = socket.socketpair()
    with ours, peer:
        peer.sendall(stream)
        with pytest.raises(ProtocolError):
            Connection(ours, timeout_s=5, max_pdu=16384).read_message({1: None})


def test_a_peer_that_hangs_up_mid_pdu_is_gone_not_an_error() -> None:
    ours, peer = socket.socketpair()
    with ours:
        peer.sendall(p_data(pdv(1, 0x03, store_request()))[:20])
        peer.close()
        with pytest.raises(PeerGone):
            Connection(ours, timeout_s=5, max_pdu=16384).read_message({1: None})


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """An accepted TCP connection on loopback and its client end."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
    return accepted, client


@pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="no TCP_QUICKACK on this system")
def test_a_receiving_connection_acknowledges_promptly_and_reads_as_before() -> None:
    ours, peer = tcp_pair()
    with ours, peer:
        connection = Connection(ours, timeout_s=5, max_pdu=16384, prompt_ack=True)
        assert connection.prompt_ack
        dataset = bytes(range(256)) * 40
        stream = p_data(pdv(1, 0x03, store_request()), pdv(1, 0x02, dataset))
        for start in range(0, len(stream), 1000):  # many reads, each followed by a prompt ACK
            peer.sendall(stream[start : start + 1000])
        message = connection.read_message({1: None})
        assert bytes(message.dataset) == dataset
        assert ours.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1


def test_prompt_acknowledgement_is_skipped_where_the_socket_has_no_such_option() -> None:
    ours, peer = socket.socketpair()  # not TCP
    with ours, peer:
        connection = Connection(ours, timeout_s=5, max_pdu=16384, prompt_ack=True)
        assert not connection.prompt_ack
        peer.sendall(p_data(pdv(1, 0x03, store_request()), pdv(1, 0x02, b"pixels")))
        assert bytes(connection.read_message({1: None}).dataset) == b"pixels"


def journalled(folder: Path, first: int, count: int) -> None:
    """``count`` records appended to the journal in ``folder`` and left unfiled, as a crash leaves them."""
    journal = Journal(folder, segment_bytes=1 << 20)
    journal.open()
    for index in range(first, first + count):
        journal.append(entry(index))
    journal.close()


def test_each_receiver_has_its_own_journal_and_one_that_is_gone_is_taken_over(tmp_path: Path) -> None:
    root = tmp_path / "journal"
    first = claim_folder(root, "replica-a")
    second = claim_folder(root, "replica-b")  # a second replica on the same spool, while the first runs
    assert (first.path.name, second.path.name) == ("replica-a", "replica-b")
    journalled(first.path, 0, 3)
    journalled(second.path, 10, 2)
    first.release()  # replica a is gone (a crash releases its lock as well)
    restarted = claim_folder(root, "replica-c")
    assert restarted.path.name == "replica-c" and not first.path.exists() and restarted.orphans == []
    assert [e.sop_instance_uid for _, e in Journal(restarted.path).replay()] == ["1.2.3.0", "1.2.3.1", "1.2.3.2"]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["replica-b", "replica-c"]  # b's is b's
    second.release()
    restarted.release()
    after_both = claim_folder(root, "replica-d")  # one process restarts for two that are gone: one journal is
    assert [folder.name for folder, _ in after_both.orphans] == ["replica-c"]  # its own, the other to replay
    assert [e.sop_instance_uid for _, e in Journal(after_both.path).replay()] == ["1.2.3.10", "1.2.3.11"]
    for folder, lock_fd in after_both.orphans:
        remove_orphan(folder, lock_fd)
    assert sorted(p.name for p in root.iterdir()) == ["replica-d"]


def test_the_one_journal_of_an_earlier_version_moves_into_the_first_receivers_own(tmp_path: Path) -> None:
    root = tmp_path / "journal"
    journalled(root, 0, 2)  # segments directly in the journal folder, as before
    claimed = claim_folder(root, "replica-a")
    assert not list(root.glob("*.wal"))
    assert [e.sop_instance_uid for _, e in Journal(claimed.path).replay()] == ["1.2.3.0", "1.2.3.1"]
