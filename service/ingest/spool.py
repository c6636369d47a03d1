"""The spool: every received instance as a DICOM file on disk, durable before we say Success.

Layout: ``<root>/<study UID>/<series UID>/<SOP instance UID>.dcm``. A file is written to a temporary
name, fsync'd, renamed into place and its folder fsync'd, so after a crash a file is either whole
or absent. UIDs come from the network, so they are checked before they become path components.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from service.errors import InputError

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def check_uid(value: str, what: str) -> str:
    """A syntactically valid UID (digits and dots, at most 64 characters), or InputError."""
    value = (value or "").strip().rstrip("\0")
    if len(value) > 64 or not _UID.match(value):
        raise InputError(f"{what} is not a valid UID: {value[:80]!r}")
    return value


@dataclass(frozen=True)
class SpoolEntry:
    path: Path  # relative to the spool root
    size_bytes: int
    existed: bool  # the same SOP instance was already spooled (a resend)


class Spool:
    """Durable files of received instances under one folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return Path(
            check_uid(study_uid, "StudyInstanceUID"),
            check_uid(series_uid, "SeriesInstanceUID"),
            check_uid(sop_uid, "SOPInstanceUID") + ".dcm",
        )

    def store(self, study_uid: str, series_uid: str, sop_uid: str, chunks: list[bytes]) -> SpoolEntry:
        """Write the file made of ``chunks`` atomically and durably; a resend keeps the first copy."""
        relative = self.relative_path(study_uid, series_uid, sop_uid)
        final = self.root / relative
        if final.exists():
            return SpoolEntry(relative, final.stat().st_size, existed=True)
        folder = final.parent
        folder.mkdir(parents=True, exist_ok=True)
        temporary = folder / f".{sop_uid}.{os.getpid()}.{id(chunks)}.part"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            size = 0
            for chunk in chunks:
                size += os.write(fd, chunk)
            os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            temporary.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(temporary, final)
        _fsync_folder(folder)
        return SpoolEntry(relative, size, existed=False)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def files(self) -> list[Path]:
        """Every spooled instance, relative to the root (temporary files excluded)."""
        return [p.relative_to(self.root) for p in self.root.glob("*/*/*.dcm")]

    def remove_study(self, study_uid: str) -> int:
        """Delete a study's files (retention); returns the bytes freed."""
        folder = self.root / check_uid(study_uid, "StudyInstanceUID")
        if not folder.exists():
            return 0
        freed = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        shutil.rmtree(folder)
        return freed

    def clean_partial(self) -> int:
        """Remove temporary files left by a crash mid-write; they were never acknowledged."""
        count = 0
        for part in self.root.glob("*/*/.*.part"):
            part.unlink(missing_ok=True)
            count += 1
        return count

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("*/*/*.dcm"))


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
