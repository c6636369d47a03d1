"""What a hostile or broken sender does to `strokegate serve` (issue 11, findings 1-4), each against
the running service with real peers: pynetdicom and dcmtk SCUs, and raw sockets writing bytes.

Ingest goes on, a restart starts, a bad instance is quarantined with its reason, memory stays
flat, one host cannot take every slot, and a slow association request is cut.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom import config as pydicom_config
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage, Verification

from dicom_tools import requires_storescu, storescu
from hostile_peers import (
    associate_rq,
    dataset_of,
    echo_command,
    open_association,
    p_data,
    read_pdu,
    release,
    resident_bytes,
    response_status,
    store_files,
    store_raw,
    study_copy,
    thread_count,
)
from service.phantom.dicom_writer import uid
from service.phantom.generate import write_patient
from service.phantom.patient import PhantomOptions
from service_harness import Service, StoreSCP, wait_for

pytestmark = [pytest.mark.integration, requires_storescu, pytest.mark.timeout(300)]

MR = str(MRImageStorage)


@pytest.fixture(scope="module")
def dwi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hostile")
    write_patient(2, "mri", out, PhantomOptions(mr_matrix=64, mr_slices=8, mr_frames=3))
    return out / "SGPH00000002" / "dicom" / "MR" / "dwi"


def bad_headers(dwi: Path, folder: Path) -> dict[str, Path]:
    """Instances whose headers were seen to stop ingest: NumberOfSeriesRelatedInstances with two
    values and out of range, and a VR that does not exist (a byte flip)."""
    folder.mkdir(parents=True)
    source = sorted(dwi.glob("*.dcm"))[0]
    made = {}
    for name, value in (("vm2", ["3", "4"]), ("huge", "99999999999999999999")):
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("bad", name), uid("bad", name, "series")
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid("bad", name, "instance")
        previous = pydicom_config.settings.writing_validation_mode  # a value DICOM does not allow
        pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
        try:
            ds.NumberOfSeriesRelatedInstances = value
            ds.save_as(folder / f"{name}.dcm", enforce_file_format=True)
        finally:
            pydicom_config.settings.writing_validation_mode = previous
        made[name] = folder / f"{name}.dcm"
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid("bad", "vr", "instance")
    ds.save_as(folder / "vr.dcm", enforce_file_format=True)
    data = (folder / "vr.dcm").read_bytes()
    tag = b"\x08\x00\x3e\x10LO"  # SeriesDescription, LO -> "L7"
    assert data.count(tag) == 1
    (folder / "vr.dcm").write_bytes(data.replace(tag, b"\x08\x00\x3e\x10L7"))
    made["vr"] = folder / "vr.dcm"
    return made


def test_bad_headers_are_quarantined_ingest_goes_on_and_a_restart_starts(tmp_path: Path, dwi: Path) -> None:
    """Finding 1: a bad header got Success, then stopped filing for good and every restart. Now each
    is quarantined with its reason, the instances around it are filed, the service stays ready, a
    restart (with the bad records still in the journal) starts, and the study completes. Finding 2:
    a non-ASCII Affected SOP Instance UID gets 0xC210 and the association goes on."""
    pacs = StoreSCP(tmp_path / "pacs").start()
    service = Service(tmp_path / "gate", f"sqlite:///{tmp_path / 'db.sqlite'}", [f"{pacs.address}?send=seg+sr"]).start()
    try:
        good = study_copy(dwi, tmp_path / "good", "good")
        bad = bad_headers(dwi, tmp_path / "bad")
        mixed = [*good[:5], bad["vm2"], *good[5:10], bad["huge"], bad["vr"], *good[10:12]]
        assert store_files(service.port, mixed) == [0] * len(mixed)  # all acknowledged: found bad only after
        wait_for(lambda: service.metric("strokegate_instances_quarantined_total") == 3, 30, "three quarantined")
        reasons = {p.stem: p.read_text() for p in (tmp_path / "gate" / "spool" / "quarantine").glob("*.reason")}
        assert sorted(reasons) == sorted(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in bad.values())
        assert any("NumberOfSeriesRelatedInstances has 2 values" in r for r in reasons.values())
        assert any("out of range" in r for r in reasons.values())
        assert any("Unknown Value Representation" in r for r in reasons.values())
        assert service.metric("strokegate_instances_quarantined_total", reason="invalid") == 2
        assert service.metric("strokegate_instances_quarantined_total", reason="undecodable") == 1
        wait_for(lambda: service.metric("strokegate_instances_received_total") == 12, 30, "the good instances filed")
        assert service.ready() and service.metric("strokegate_loop_restarts_total") == 0

        service.kill()  # the bad records are still in the journal's open segment: the restart replays them
        service.start()
        assert "journalled instances filed into the spool" in service.log.read_text()
        assert service.metric("strokegate_instances_quarantined_total") == 3  # quarantined again, not fatal

        with open_association(service.port, [MR]) as sock:  # finding 2, on a raw socket
            dataset = dataset_of(good[12])
            assert store_raw(sock, MR, "1.2.3.\xe9".encode("latin-1"), dataset) == 0xC210
            sock.sendall(p_data(1, 0x03, echo_command(2)))  # on the same association: it goes on
            assert response_status(sock) == 0x0000
            release(sock)

        assert store_files(service.port, good[12:]) == [0] * 4
        study = pydicom.dcmread(good[0], stop_before_pixels=True).StudyInstanceUID
        wait_for(lambda: service.get(f"/api/studies/{study}", {}).get("state") == "done", 120, "the good study analysed")
        analysed = service.get(f"/api/studies/{study}")
        assert analysed["instances"] == 16  # the 12 from before the restart went quiet: a second version
        wait_for(lambda: len(pacs.files()) == 2 * analysed["versions"], 60, "each version's SEG and SR at the PACS")
    finally:
        service.stop()
        pacs.stop()


@pytest.fixture
def limited(tmp_path: Path) -> Service:
    """The service with short deadlines (ARTIM 2 s, 3 s per PDU) and its default slot counts."""
    service = Service(tmp_path / "gate", f"sqlite:///{tmp_path / 'db.sqlite'}", [], env={
        "STROKEGATE_ASSOCIATION_REQUEST_TIMEOUT_S": "2", "STROKEGATE_NETWORK_TIMEOUT_S": "3",
    }).start()
    yield service
    service.stop()


def echo(port: int, source: str) -> int | None:
    """C-ECHO from ``source`` (a loopback address: 127.0.0.2 is another host to the service)."""
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="STROKEGATE", bind_address=(source, 0))
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def test_declared_lengths_cost_no_memory_and_idle_connections_are_bounded(limited: Service, dwi: Path) -> None:
    """Finding 3: a 6-byte header declaring 0xFFFFFFF0 bytes made the service allocate that much,
    per connection; 300 idle connections cost 312 threads and 1 GB. Now 20 such connections (each
    PDU type, before and after association) grow resident memory by less than 100 MB, and idle
    connections beyond the cap are closed at once, their threads and memory given back."""
    pid = limited.process.pid
    assert echo(limited.port, "127.0.0.1") == 0  # warm: every code path of an association has run once
    baseline_rss, baseline_threads = resident_bytes(pid), thread_count(pid)
    sockets = []
    for index in range(20):
        kind = (0x01, 0x02, 0x04, 0x05, 0x07, 0x09)[index % 6]
        if kind == 0x04:
            sock = open_association(limited.port, [MR])  # P-DATA on an established association
        else:
            sock = socket.create_connection(("127.0.0.1", limited.port), timeout=10)
        sock.sendall(struct.pack(">BxI", kind, 0xFFFFFFF0) + bytes(4096))
        sockets.append(sock)
    answers = [read_pdu(sock)[0] for sock in sockets]
    grown = resident_bytes(pid) - baseline_rss
    for sock in sockets:
        sock.close()
    assert all(kind in (0x07, 0) for kind in answers), answers  # A-ABORT (or closed), never a wait for 4 GiB
    assert grown < 100 << 20, f"resident memory grew by {grown >> 20} MB"

    idle = []
    for _ in range(300):
        try:
            idle.append(socket.create_connection(("127.0.0.1", limited.port), timeout=10))
        except OSError:
            break
    time.sleep(0.5)
    assert thread_count(pid) <= baseline_threads + 40, "a thread per idle connection beyond the cap"
    assert echo(limited.port, "127.0.0.2") == 0  # another host still gets in during the flood
    assert resident_bytes(pid) - baseline_rss < 100 << 20
    closed = sum(1 for sock in idle if _closed_within(sock, 4.0))
    assert closed == len(idle)  # cut at once over the cap, or by ARTIM (2 s) under it
    for sock in idle:
        sock.close()
    wait_for(lambda: thread_count(pid) <= baseline_threads + 2, 10, "the connection threads to end")
    # at most 32 (half of max_connections) held at once; a few more got in as ARTIM freed places
    assert limited.metric("strokegate_connections_refused_total", reason="host_share") >= len(idle) - 3 * 32
    assert limited.ready()


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_slow_peers_on_one_host_cannot_keep_another_host_out_and_slow_requests_are_cut(
    limited: Service, dwi: Path
) -> None:
    """Finding 4: 16 connections sending a byte every 25 s held every slot, and a 1-byte/s
    association request was never cut. Now one host holds at most half the slots, a sender from
    another host gets in, a trickling association is aborted when a PDU takes longer than the
    network timeout, and the association request when it takes longer than ARTIM."""
    trickling: list[socket.socket] = []
    refused = 0
    for _ in range(16):
        try:
            sock = open_association(limited.port, [MR])
        except AssertionError:
            refused += 1
            continue
        sock.sendall(struct.pack(">BxI", 0x04, 1000) + b"\0")  # a P-DATA PDU that will take forever
        trickling.append(sock)
    assert len(trickling) == 8 and refused == 8  # max_associations 16: half of them per host

    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(0.5):
            for sock in trickling:
                try:
                    sock.send(b"\0")
                except OSError:
                    pass

    feeder = threading.Thread(target=trickle, daemon=True)
    feeder.start()
    try:
        paths = study_copy(dwi, Path(limited.root) / "legit", "legit")
        storescu(paths, limited.port, "STROKEGATE")  # dcmtk from 127.0.0.1 is refused: the host is full
    except AssertionError:
        pass
    else:
        raise AssertionError("a ninth association from the trickling host was accepted")
    try:
        assert echo(limited.port, "127.0.0.2") == 0  # a legitimate sender from another host gets in

        slowloris = socket.create_connection(("127.0.0.1", limited.port), timeout=10)
        started = time.monotonic()
        request = associate_rq([MR])
        cut_after = None
        for byte in request:
            try:
                slowloris.send(bytes([byte]))
            except OSError:
                cut_after = time.monotonic() - started
                break
            slowloris.settimeout(0.4)
            try:
                if slowloris.recv(10)[:1] in (b"\x07", b""):
                    cut_after = time.monotonic() - started
                    break
            except TimeoutError:
                pass
        slowloris.close()
        assert cut_after is not None and cut_after < 5, "the slow association request was not cut by ARTIM (2 s)"

        wait_for(lambda: all(_closed_within(sock, 0.1) for sock in trickling), 10,
                 "the trickling associations aborted after the 3 s PDU deadline")
    finally:
        stop.set()
        feeder.join()
        for sock in trickling:
            sock.close()
    assert limited.metric("strokegate_associations_aborted_total", reason="timeout") >= 9
    storescu(paths, limited.port, "STROKEGATE")  # the slots are free again
    wait_for(lambda: limited.metric("strokegate_instances_received_total") == 16, 30, "the legitimate study filed")
