"""Our C-STORE sender against dcmtk's storescp: every kind of result object, small PDUs, a peer
that is down."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_tools import requires_storescu
from service.config import Destination
from service.delivery.scu import send_files
from service.phantom.generate import write_patient
from service.phantom.patient import PhantomOptions
from service_harness import StoreSCP, free_port, wait_for

pytestmark = [pytest.mark.integration, requires_storescu, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("scu")
    write_patient(3, "all", out, PhantomOptions(ct_matrix=64, ct_slices=4, ct_frames=3, mr_matrix=48, mr_slices=4,
                                                mr_frames=3))
    return sorted(out.rglob("*.dcm"))


@pytest.mark.parametrize("max_pdu", [16384, 4096])
def test_every_file_arrives_byte_for_byte_whatever_the_peer_pdu_size(tmp_path: Path, files: list[Path], max_pdu: int) -> None:
    pacs = StoreSCP(tmp_path / "pacs")
    pacs.folder.mkdir(parents=True)
    process = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(pacs.folder), "--max-pdu", str(max_pdu),
                                str(pacs.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: send_files(Destination.parse(f"PACS@127.0.0.1:{pacs.port}"), files[:1], "STROKEGATE")[0].delivered
                 or None, 10, "storescp up")
        outcomes = send_files(Destination.parse(f"PACS@127.0.0.1:{pacs.port}"), files, "STROKEGATE")
        assert [o.status for o in outcomes] == [0] * len(files), {o.error for o in outcomes}
        received = {pydicom.dcmread(p).SOPInstanceUID: p for p in pacs.folder.iterdir()}
        for sent in files[::7]:
            original = pydicom.dcmread(sent)
            copy = pydicom.dcmread(received[original.SOPInstanceUID])
            assert np.array_equal(copy.pixel_array, original.pixel_array)
            assert copy.SOPClassUID == original.SOPClassUID
    finally:
        process.terminate()
        process.wait(10)


def test_a_destination_that_is_down_gets_nothing_and_says_why(files: list[Path]) -> None:
    outcomes = send_files(Destination.parse(f"PACS@127.0.0.1:{free_port()}"), files[:3], "STROKEGATE", timeout_s=2)
    assert [o.delivered for o in outcomes] == [False] * 3
    assert all("not established" in o.error for o in outcomes)
