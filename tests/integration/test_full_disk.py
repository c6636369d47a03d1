"""A full disk under the spool (issue 11, finding 5), on a real file system: a 256 MB tmpfs mounted
for the test (root, or passwordless sudo, is needed to mount; the test is skipped otherwise).

Before: stores got Success while their filings failed with ENOSPC and were dropped, a partial
study was analysed, and a restart on the full disk exited 1. Now a failed filing keeps its journal
record and is retried, new instances get 0xA700, the study waits, a restart starts (answering
0xA700, not ready), and once space is freed everything acknowledged is filed and analysed whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from dicom_tools import requires_storescu
from hostile_peers import store_files, study_copy
from service.phantom.generate import write_patient
from service.phantom.patient import PhantomOptions
from service_harness import Service, StoreSCP, wait_for

pytestmark = [pytest.mark.integration, requires_storescu, pytest.mark.timeout(300)]


@contextlib.contextmanager
def small_filesystem(mount_point: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of ``size_mb`` at ``mount_point`` for the duration (skips the test if it cannot be mounted)."""
    mount_point.mkdir(parents=True)
    command = ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(mount_point)]
    if os.geteuid() != 0:
        command = ["sudo", "-n", *command]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root or passwordless sudo): {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        unmount = ["umount", str(mount_point)] if os.geteuid() == 0 else ["sudo", "-n", "umount", str(mount_point)]
        if subprocess.run(unmount, capture_output=True).returncode != 0:
            subprocess.run([*unmount[:-1], "-l", str(mount_point)], capture_output=True)


def fill(folder: Path, leave_bytes: int) -> Path:
    """A file that takes the free space of ``folder``'s file system but ``leave_bytes``."""
    filler = folder / "filler"
    free = shutil.disk_usage(folder).free
    with open(filler, "wb") as file:
        remaining = free - leave_bytes
        while remaining > 0:
            remaining -= file.write(bytes(min(remaining, 1 << 20)))
    return filler


def test_a_full_disk_loses_nothing_acknowledged_and_a_restart_on_it_starts(tmp_path: Path) -> None:
    out = tmp_path / "phantom"
    write_patient(2, "mri", out, PhantomOptions(mr_matrix=64, mr_slices=8, mr_frames=3))
    dwi = out / "SGPH00000002" / "dicom" / "MR" / "dwi"
    first, second = study_copy(dwi, tmp_path / "first", "first"), study_copy(dwi, tmp_path / "second", "second")
    first_uid = pydicom.dcmread(first[0], stop_before_pixels=True).StudyInstanceUID
    second_uid = pydicom.dcmread(second[0], stop_before_pixels=True).StudyInstanceUID

    with small_filesystem(tmp_path / "disk", 256) as disk:
        pacs = StoreSCP(tmp_path / "pacs").start()
        service = Service(tmp_path / "gate", f"sqlite:///{tmp_path / 'db.sqlite'}", [f"{pacs.address}?send=seg+sr"])
        service.root.mkdir(parents=True)
        (service.root / "spool").symlink_to(disk, target_is_directory=True)  # the spool (and its journal) on the tmpfs
        service.start()  # the journal's segments are written now, before the disk fills
        try:
            filler = fill(disk, leave_bytes=40 << 10)  # room for about four instances
            answered = store_files(service.port, first)
            acknowledged = answered.count(0)  # journalled; once a filing failed, the rest were refused
            assert acknowledged >= 1 and answered == [0] * acknowledged + [0xA700] * (16 - acknowledged), answered
            wait_for(lambda: service.metric("strokegate_filing_failures_total") >= 1, 30, "a filing to fail on the full disk")
            assert store_files(service.port, second) == [0xA700] * 16  # out of resources while the spool cannot be written
            assert not service.ready()
            time.sleep(3)  # twice series_idle_s: a study with instances waiting must not go quiet
            assert service.get("/api/jobs") == []
            assert service.get(f"/api/studies/{first_uid}", {}).get("instances", 0) < 16

            service.kill()
            service.start(ready=False)  # on the full disk: it starts, not ready, and refuses with 0xA700
            assert not service.ready()
            assert store_files(service.port, second[:2]) == [0xA700, 0xA700]
            assert service.get("/api/jobs") == []

            filler.unlink()  # the operator frees space
            wait_for(service.ready, 30, "the service to be ready once space is free")
            assert store_files(service.port, first[acknowledged:] + second) == [0] * (32 - acknowledged)
            for study in (first_uid, second_uid):
                wait_for(lambda study=study: service.get(f"/api/studies/{study}", {}).get("state") == "done", 120,
                         "both studies analysed")
                assert service.get(f"/api/studies/{study}")["instances"] == 16  # whole, not partial
            assert len(service.get("/api/jobs")) == 2
            wait_for(lambda: len(pacs.files()) == 4, 60, "each study's SEG and SR at the PACS")
        finally:
            service.stop()
            pacs.stop()
