"""The spool: every received instance as a DICOM file on disk.

Layout: ``<root>/<study UID>/<series UID>/<SOP instance UID>.dcm``. A file is written to a temporary
name and renamed into place, so a reader never sees half a file; it is fsync'd (with its folder)
when ``durable``, and otherwise made durable later by the receive journal's sync, the journal
holding its copy until then. UIDs come from the network, so they are checked before they become
path components. Instances whose header cannot be filed or recorded wait in ``<root>/quarantine``,
each with a ``.reason`` file.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
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

    def store(
        self, study_uid: str, series_uid: str, sop_uid: str, chunks: list[bytes], durable: bool = True,
        replace: bool = False,
    ) -> SpoolEntry:
        """Write the file made of ``chunks`` atomically; a resend keeps the first copy unless ``replace``."""
        relative = self.relative_path(study_uid, series_uid, sop_uid)
        final = self.root / relative
        existed = final.exists()
        if existed and not replace:
            return SpoolEntry(relative, final.stat().st_size, existed=True)
        size = self._write(final, chunks, durable)
        return SpoolEntry(relative, size, existed=existed)

    def quarantine(self, sop_uid: str, chunks: list[bytes], reason: str) -> Path:
        """Keep an instance that cannot be filed, with a ``.reason`` file beside it, for the
        operator to inspect; its path."""
        try:
            name = check_uid(sop_uid, "SOPInstanceUID")
        except InputError:  # named after what it claims to be only where that is a safe file name
            name = "invalid-" + hashlib.sha256(sop_uid.encode("utf-8", "replace")).hexdigest()[:32]
        path = self.root / "quarantine" / (name + ".dcm")
        self._write(path, chunks, durable=False)
        path.with_suffix(".reason").write_text(reason + "\n", encoding="utf-8")
        return path

    def quarantine_file(self, relative: Path, reason: str) -> Path:
        """Move a spooled file that cannot be recorded into the quarantine folder; its new path."""
        target = self.root / "quarantine" / relative.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.root / relative, target)
        target.with_suffix(".reason").write_text(reason + "\n", encoding="utf-8")
        return target

    def _write(self, final: Path, chunks: list[bytes], durable: bool) -> int:
        folder = final.parent
        folder.mkdir(parents=True, exist_ok=True)
        temporary = folder / f".{final.stem}.{os.getpid()}.{id(chunks)}.part"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            size = 0
            for chunk in chunks:
                size += os.write(fd, chunk)
            if durable:
                os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            temporary.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(temporary, final)
        if durable:
            fsync_folder(folder)
        return size

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
        for part in [*self.root.glob("*/*/.*.part"), *self.root.glob("quarantine/.*.part")]:
            part.unlink(missing_ok=True)
            count += 1
        return count

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("*/*/*.dcm"))


def part10_header(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, implementation_class_uid: str,
    implementation_version: str, source_ae: str = "",
) -> bytes:
    """Preamble, "DICM" and the file meta information group that make a received dataset a DICOM file
    (PS3.10 7.1). Written directly: pydicom's general writer costs ~0.2 ms, once per instance."""

    def element(number: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
        value += pad * (len(value) % 2)
        return struct.pack("<HH2sH", 0x0002, number, vr, len(value)) + value

    body = struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\0\1"
    body += element(0x0002, b"UI", sop_class_uid.encode("ascii"), b"\0")
    body += element(0x0003, b"UI", sop_instance_uid.encode("ascii"), b"\0")
    body += element(0x0010, b"UI", transfer_syntax_uid.encode("ascii"), b"\0")
    body += element(0x0012, b"UI", implementation_class_uid.encode("ascii"), b"\0")
    body += element(0x0013, b"SH", implementation_version.encode("ascii"), b" ")
    if source_ae:
        body += element(0x0016, b"AE", source_ae.encode("ascii", "replace"), b" ")
    return bytes(128) + b"DICM" + struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body


def fsync_folder(folder: Path) -> None:
    """Make a folder's entries (new names, renames) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
