"""The DICOM receiver as peers see it: dcmtk and pynetdicom requestors, limits, and broken peers."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_tools import requires_storescu
from service.ingest.scp import ReceivedInstance, Receiver, ReceiverConfig
from service.ingest.spool import Spool
from service.phantom.generate import write_patient
from service.phantom.patient import PhantomOptions
from service_harness import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def start_receiver(root: Path, **overrides: object) -> tuple[Receiver, list[ReceivedInstance]]:
    settings = dict(ae_title="STROKEGATE", host="127.0.0.1", port=0, max_pdu=4 << 20, max_associations=4,
                    allowed_calling_aets=(), allowed_hosts=(), min_free_bytes=0, network_timeout_s=30.0)
    settings.update(overrides)
    received: list[ReceivedInstance] = []
    receiver = Receiver(ReceiverConfig(**settings), Spool(root / "spool"), received.append)
    receiver.recover()
    receiver.start()
    return receiver, received


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[Receiver, list[ReceivedInstance]]]:
    started = start_receiver(tmp_path)
    yield started
    started[0].stop()


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("ct")
    write_patient(5, "ctp", out, PhantomOptions(ct_matrix=64, ct_slices=4, ct_frames=5))
    return sorted((out / "SGPH00000005" / "dicom" / "CT" / "ctp").glob("*.dcm"))


@requires_storescu
def test_echoscu_gets_an_answer(receiver: tuple[Receiver, list]) -> None:
    result = subprocess.run(["echoscu", "-aec", "STROKEGATE", "127.0.0.1", str(receiver[0].port)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_small_pdus_and_either_transfer_syntax_spool_the_dataset_byte_for_byte(
    tmp_path: Path, receiver: tuple[Receiver, list], ct_files: list[Path]
) -> None:
    ae = AE(ae_title="SMALLPDU")
    ae.maximum_pdu_size = 4096  # our responses must fit; our reading must reassemble many fragments
    ae.add_requested_context(CTImageStorage, [ImplicitVRLittleEndian])
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", receiver[0].port, ae_title="STROKEGATE", max_pdu=4096)
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(pydicom.dcmread(path)).Status) for path in ct_files[:6]]
    finally:
        assoc.release()
    assert statuses == [0] * 6
    wait_for(lambda: len(receiver[1]) == 6, 30, "six instances filed")
    for item in receiver[1]:
        spooled = pydicom.dcmread(receiver[0].spool.root / item.path)
        original = pydicom.dcmread(next(p for p in ct_files if pydicom.dcmread(p).SOPInstanceUID == item.sop_uid))
        assert spooled.PixelData == original.PixelData
        assert spooled.file_meta.SourceApplicationEntityTitle == "SMALLPDU"
        assert item.calling_ae == "SMALLPDU"


def test_association_limit_rejects_the_extra_requestor_and_frees_its_slot(tmp_path: Path) -> None:
    receiver, _ = start_receiver(tmp_path, max_associations=1)
    try:
        ae = AE(ae_title="FIRST")
        ae.add_requested_context(Verification)
        first = ae.associate("127.0.0.1", receiver.port, ae_title="STROKEGATE")
        assert first.is_established
        second = ae.associate("127.0.0.1", receiver.port, ae_title="STROKEGATE")
        assert second.is_rejected
        assert first.send_c_echo().Status == 0
        first.release()
        third = wait_for(lambda: (a := ae.associate("127.0.0.1", receiver.port, ae_title="STROKEGATE")).is_established
                         and a, 10, "a free slot after the release")
        third.release()
    finally:
        receiver.stop()


def test_unknown_peers_and_broken_peers_are_cut_off_and_others_go_on(tmp_path: Path) -> None:
    receiver, _ = start_receiver(tmp_path, allowed_calling_aets=("PACS",), association_request_timeout_s=1.0)
    try:
        ae = AE(ae_title="INTRUDER")
        ae.add_requested_context(Verification)
        assert ae.associate("127.0.0.1", receiver.port, ae_title="STROKEGATE").is_rejected

        with socket.create_connection(("127.0.0.1", receiver.port), timeout=5) as garbage:
            garbage.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert garbage.recv(10)[:1] == b"\x07"  # A-ABORT

        with socket.create_connection(("127.0.0.1", receiver.port), timeout=5) as silent:
            assert silent.recv(10)[:1] == b"\x07"  # A-ABORT once the 1 s ARTIM passes, not never

        pacs = AE(ae_title="PACS")
        pacs.add_requested_context(Verification)
        assoc = pacs.associate("127.0.0.1", receiver.port, ae_title="STROKEGATE")
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()
    finally:
        receiver.stop()


def test_a_peer_outside_allowed_hosts_is_refused_before_any_pdu(tmp_path: Path) -> None:
    receiver, _ = start_receiver(tmp_path, allowed_hosts=("192.0.2.1",))
    try:
        with socket.create_connection(("127.0.0.1", receiver.port), timeout=5) as sock:
            assert sock.recv(10) == b""  # closed without a word
    finally:
        receiver.stop()
