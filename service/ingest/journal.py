"""The receive journal: where a received instance becomes durable before Success goes back.

Writing a new file durably (temporary name, fsync, rename, folder fsync) costs ~0.5 ms here, mostly
the file system's own journal commit; appending to a segment file whose blocks are already written
and calling fdatasync costs ~0.18 ms, because no metadata changes. So each instance is appended to
the current segment and synced; the receiver then files it into the spool without syncing, and
once every record of a closed segment is filed, one ``syncfs`` makes those spool files durable and
the segment is recycled. After a crash, ``replay`` yields every whole record of the segments left
over; a torn record at the tail was never acknowledged and is ignored.

With ``sync_each`` off, records are written before Success but synced by a background flush at most
``sync_interval_s`` later (PostgreSQL's ``synchronous_commit = off``): a crash of the service loses
nothing, as the written pages belong to the kernel; a power cut may lose that last interval.

Record: magic, segment number, header and payload lengths, CRC-32 over all of it, a JSON header and
the encoded dataset. The segment number in each record tells records of a recycled segment's
previous life from new ones.

Each receiving process has its own journal, ``<spool>/journal/<owner>``, locked (``flock``) for as
long as the process lives, so that several ingest replicas sharing a spool never append to one
file. A journal whose lock can be taken belongs to a process that is gone: at start a process
takes one such journal over as its own (renamed to its owner name; its segments are replayed and
then recycled), and replays and removes any others (``claim_folder``).
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from service.ingest.spool import fsync_folder

log = logging.getLogger(__name__)

_MAGIC = b"SGJ1"
_RECORD = struct.Struct("<4sQIQI")  # magic, segment, header length, payload length, CRC-32
_ZEROS = bytes(1 << 20)
_SPARES = 2  # segments kept ready (and recycled ones kept) so a switch never waits on the disk
_QUIET_S = 0.2  # heavy upkeep (zero-filling a new segment, syncfs) waits for a pause in appends this long,
_MAX_DEFER_S = 5.0  # or at most this long: run during a study, it slows every append's fdatasync
_TEXT_FIELDS = ("sop_class_uid", "sop_instance_uid", "transfer_syntax_uid", "calling_ae")


@dataclass(frozen=True)
class JournalEntry:
    """One received instance as journalled: enough to file it into the spool later."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    calling_ae: str
    dataset: bytes | bytearray  # the encoded dataset exactly as received


_LOCK_NAME = "owner.lock"


@dataclass
class JournalFolder:
    """The journal folder a process claimed (``lock_fd`` holds its lock for the process's life) and
    the folders of other processes that are gone, to be replayed and removed (``remove_orphan``)."""

    path: Path
    lock_fd: int
    orphans: list[tuple[Path, int]]  # folder, the fd holding its lock

    def release(self) -> None:
        """Unlock the folder (the journal is closed): the next process to start takes it over."""
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1


def _try_lock(folder: Path) -> int | None:
    """An fd holding ``folder``'s lock, or None while its process lives."""
    fd = os.open(folder / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def claim_folder(root: Path, owner: str) -> JournalFolder:
    """This process's journal folder under ``root``, named ``owner`` and locked: the folder of a
    process that is gone, taken over (the first found), or a new one; the segments of the older
    layout (directly in ``root``, one journal for all) are moved into it. The other folders of
    processes that are gone come back as orphans. One process at a time looks (a lock on ``root``)."""
    root.mkdir(parents=True, exist_ok=True)
    guard = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(guard, fcntl.LOCK_EX)
        mine = root / owner
        lock_fd: int | None = None
        orphans: list[tuple[Path, int]] = []
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            fd = _try_lock(folder)
            if fd is None:
                continue  # a live process's journal
            if lock_fd is None:
                folder.rename(mine)
                lock_fd = fd
            else:
                orphans.append((folder, fd))
        if lock_fd is None:
            mine.mkdir()
            lock_fd = _try_lock(mine)
        for legacy in [*root.glob("*.wal"), *root.glob("*.free")]:
            os.replace(legacy, mine / legacy.name)
        fsync_folder(root)
        return JournalFolder(mine, lock_fd, orphans)
    finally:
        os.close(guard)


def remove_orphan(folder: Path, lock_fd: int) -> None:
    """Delete a gone process's journal folder once every record in it is filed."""
    shutil.rmtree(folder)
    os.close(lock_fd)


class Journal:
    """Append-only, recycled segment files in one folder (on the spool's file system)."""

    def __init__(
        self, folder: Path, segment_bytes: int = 64 << 20, sync_each: bool = True, sync_interval_s: float = 0.01
    ) -> None:
        self.folder = folder
        self.segment_bytes = segment_bytes
        self.sync_each = sync_each
        self.sync_interval_s = sync_interval_s
        self._unsynced = threading.Event()
        self._flusher: threading.Thread | None = None
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._segment = 0
        self._offset = 0
        self._outstanding: dict[int, int] = {}  # appended but not yet filed, per segment
        self._last_append = 0.0
        self._spares: list[Future[Path]] = []
        self._maintenance = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal")

    def _path(self, segment: int) -> Path:
        return self.folder / f"{segment:016d}.wal"

    def segments(self) -> list[int]:
        return sorted(int(p.stem) for p in self.folder.glob("*.wal") if p.stem.isdigit())

    def replay(self) -> Iterator[tuple[int, JournalEntry]]:
        """Every whole record left in the segments, oldest first (call before ``open``)."""
        for segment in self.segments():
            for _, entry in self.replay_segment(segment):
                yield segment, entry

    def replay_segment(self, segment: int, offset: int = 0) -> Iterator[tuple[int, JournalEntry]]:
        """The whole records of one segment from ``offset`` on, each with the offset after it. A
        record that does not parse ends the segment like a torn tail: its CRC could not match."""
        with open(self._path(segment), "rb") as file:
            data = file.read()
        while offset + _RECORD.size <= len(data):
            magic, number, header_length, payload_length, crc = _RECORD.unpack_from(data, offset)
            start = offset + _RECORD.size
            end = start + header_length + payload_length
            if magic != _MAGIC or number != segment or end > len(data):
                return
            if zlib.crc32(data[offset + 4 : offset + 24], zlib.crc32(data[start:end])) != crc:
                return
            try:
                header = json.loads(data[start : start + header_length])
                entry = JournalEntry(dataset=data[start + header_length : end], **header)
                if not all(isinstance(getattr(entry, name), str) for name in _TEXT_FIELDS):
                    raise TypeError("a journal header field is not text")
            except (ValueError, TypeError) as error:  # a CRC-valid record we did not write
                log.error("journal segment %d: unreadable record at offset %d (%s); the rest is skipped",
                          segment, offset, error)
                return
            offset = end
            yield offset, entry

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def open(self, keep: Collection[int] = ()) -> None:
        """Start a new segment. The old ones are recycled, so call it once everything replayed is
        filed, except the segments in ``keep``: they stay until ``release``. OSError (the
        journal stays closed) when no segment can be prepared, e.g. on a full disk."""
        old = self.segments()
        if any(segment not in keep for segment in old):
            _sync_filesystem(self.folder)
        for segment in old:
            if segment not in keep:
                self._retire_file(segment)
        for partial in self.folder.glob("*.new"):
            partial.unlink(missing_ok=True)
        segment = (old[-1] + 1) if old else 1
        fd = os.open(self._prepare(segment), os.O_RDWR)
        with self._lock:
            self._segment, self._fd, self._offset = segment, fd, 0
            self._outstanding[segment] = 0
            self._spares = []
            for n in range(1, _SPARES + 1):  # ready before the first association, so none waits on the disk
                try:
                    self._spares.append(_done(self._prepare(segment + n)))
                except OSError as error:  # the switch tries again
                    self._spares.append(_failed(error))
        if not self.sync_each and self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_loop, name="journal-flush", daemon=True)
            self._flusher.start()

    def release(self, segment: int) -> None:
        """A segment kept at ``open`` is filed completely: recycle it."""
        self._maintenance.submit(self._retire, segment)

    def append(self, entry: JournalEntry) -> int:
        """Write ``entry`` durably; returns its segment, to be passed to ``filed`` once it is spooled."""
        header = json.dumps(
            {"sop_class_uid": entry.sop_class_uid, "sop_instance_uid": entry.sop_instance_uid,
             "transfer_syntax_uid": entry.transfer_syntax_uid, "calling_ae": entry.calling_ae}
        ).encode()
        body_crc = zlib.crc32(entry.dataset, zlib.crc32(header))
        size = _RECORD.size + len(header) + len(entry.dataset)
        with self._lock:
            if self._fd is None:
                raise OSError("the receive journal is not open")
            if self._offset and self._offset + size > self.segment_bytes:
                self._switch()
            numbers = struct.pack("<QIQ", self._segment, len(header), len(entry.dataset))
            record = _RECORD.pack(_MAGIC, self._segment, len(header), len(entry.dataset), zlib.crc32(numbers, body_crc))
            written = os.pwritev(self._fd, [record, header, entry.dataset], self._offset)
            if written != size:
                raise OSError(f"short journal write ({written} of {size} bytes)")
            if self.sync_each:
                os.fdatasync(self._fd)
            else:
                self._unsynced.set()
            self._offset += size
            self._outstanding[self._segment] += 1
            self._last_append = time.monotonic()
            return self._segment

    def filed(self, segment: int) -> None:
        """One record of ``segment`` is in the spool; a closed segment with none left is retired."""
        with self._lock:
            self._outstanding[segment] -= 1
            if segment != self._segment and self._outstanding[segment] == 0:
                del self._outstanding[segment]
                self._maintenance.submit(self._retire, segment)

    def close(self) -> None:
        """Stop appending; what is left unfiled stays for the next start's replay."""
        with self._lock:
            if self._fd is not None:
                try:
                    os.fdatasync(self._fd)
                except OSError as error:  # what it held is replayed from the file at the next start
                    log.error("could not sync the receive journal on close: %s", error)
                os.close(self._fd)
                self._fd = None
        self._unsynced.set()
        if self._flusher is not None:
            self._flusher.join(timeout=10)
        self._maintenance.shutdown(wait=True)

    def _flush_loop(self) -> None:
        """Background syncs when ``sync_each`` is off: at most ``sync_interval_s`` after a write."""
        while True:
            self._unsynced.wait()
            time.sleep(self.sync_interval_s)
            self._unsynced.clear()
            with self._lock:
                if self._fd is None:
                    return
                fd = os.dup(self._fd)
            try:
                os.fdatasync(fd)  # outside the lock: appends go on meanwhile
            except OSError as error:  # written pages stay the kernel's: a crash of the service loses nothing
                log.error("background sync of the receive journal failed: %s", error)
            finally:
                os.close(fd)

    def _switch(self) -> None:
        """Continue in the next segment. If the spare for it could not be prepared (a full disk),
        it is prepared again and OSError raised: the current segment stays, the append fails."""
        try:
            path = self._spares[0].result()
        except OSError:
            self._spares[0] = self._maintenance.submit(self._prepare, self._segment + 1)
            raise
        fd = os.open(path, os.O_RDWR)
        self._spares.pop(0)
        finished = self._segment
        os.fdatasync(self._fd)
        os.close(self._fd)
        self._fd = fd
        self._segment += 1
        self._offset = 0
        self._outstanding[self._segment] = 0
        if self._outstanding[finished] == 0:
            del self._outstanding[finished]
            self._maintenance.submit(self._retire, finished)
        self._spares.append(self._maintenance.submit(self._prepare, self._segment + _SPARES))

    def _prepare(self, segment: int) -> Path:
        """A segment ready to append to: a recycled one if any waits, else a new zero-filled one
        (appending into already written blocks is what makes fdatasync cheap)."""
        path = self._path(segment)
        free = sorted(self.folder.glob("*.free"))
        if free:
            os.replace(free[0], path)
        else:
            self._wait_for_quiet()
            temporary = path.with_suffix(".new")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                for _ in range(0, self.segment_bytes, len(_ZEROS)):
                    os.write(fd, _ZEROS)
                os.fsync(fd)
            except OSError:
                temporary.unlink(missing_ok=True)  # a full disk must not keep a half-written segment
                raise
            finally:
                os.close(fd)
            os.replace(temporary, path)
        fsync_folder(self.folder)
        return path

    def _retire(self, segment: int) -> None:
        """Make the spool files filed from ``segment`` durable, then recycle the segment."""
        self._wait_for_quiet()
        _sync_filesystem(self.folder)
        self._retire_file(segment)
        fsync_folder(self.folder)

    def _wait_for_quiet(self) -> None:
        """Until appends have paused for _QUIET_S, as long as a spare segment is ready: with none,
        the next switch would make the receiver wait, so the upkeep runs at once."""
        deadline = time.monotonic() + _MAX_DEFER_S
        while (now := time.monotonic()) < deadline and any(spare.done() for spare in list(self._spares)):
            idle = now - self._last_append
            if idle >= _QUIET_S:
                return
            time.sleep(min(_QUIET_S - idle, deadline - now))

    def _retire_file(self, segment: int) -> None:
        try:
            if len(list(self.folder.glob("*.free"))) < _SPARES:
                os.replace(self._path(segment), self.folder / f"{segment:016d}.free")
            else:
                self._path(segment).unlink()
        except FileNotFoundError:  # retired already (a released segment, then a reopen)
            pass


def _done(path: Path) -> Future[Path]:
    future: Future[Path] = Future()
    future.set_result(path)
    return future


def _failed(error: OSError) -> Future[Path]:
    future: Future[Path] = Future()
    future.set_exception(error)
    return future


_libc = ctypes.CDLL(None, use_errno=True)


def _sync_filesystem(folder: Path) -> None:
    """Flush every dirty page of the file system holding ``folder`` (syncfs; sync where absent)."""
    syncfs = getattr(_libc, "syncfs", None)
    fd = os.open(folder, os.O_RDONLY)
    try:
        if syncfs is None or syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)
