"""The DICOM receiver: accepts associations, answers C-ECHO and C-STORE.

The receive path never decodes pixel data. Each instance's encoded dataset is appended to the
receive journal and synced before Success goes back (journal.py says why a journal and not a file
per instance); right after answering, the instance is filed into the spool and handed to the
recorder while the sender is already sending the next one.

Nothing one peer or one instance does stops the receiver. What is known to be bad before Success
gets a failure status, as pynetdicom's ``attempt`` does: a SOP Instance UID that is not a UID or no
dataset 0xC210, a SOP class other than its presentation context's 0xA900, a journal or spool that
cannot be written (or a disk below the watermark) 0xA700, anything unexpected 0xC000. What is found
bad after Success (a header that does not parse or holds values the tracker cannot use) is
quarantined with its reason, a log line and a metric. A filing that fails to write keeps its
journal record and is retried; meanwhile new instances get 0xA700 and ``accepting`` is False
(readiness). Peers are bounded before they cost anything: open connections and established
associations are capped in all and per host, the A-ASSOCIATE-RQ must arrive within
``association_request_timeout_s`` (ARTIM) and each PDU within ``network_timeout_s``.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
import dataclasses
from dataclasses import dataclass
from datetime import datetime

from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    EnhancedSRStorage,
    BasicTextSRStorage,
    MRImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    ParametricMapStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    Verification,
)

from service.errors import InputError
from service.dicomnet import tls
from service.dicomnet.dimse import C_ECHO_RQ, C_STORE_RQ, encode_response
from service.ingest.header import ReceivedInstance, parse_header, received_instance
from service.ingest.journal import Journal, JournalEntry, claim_folder, remove_orphan
from service.ingest.spool import Spool, check_uid, part10_header
from service.dicomnet.upper_layer import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION,
    REJECT_CALLED_AE,
    REJECT_CALLING_AE,
    REJECT_TOO_MANY,
    AssociationRequest,
    Connection,
    PeerGone,
    ProtocolError,
    no_delay,
)
from service.ops import metrics
from service.ops.loops import Loop
from service.ops.owners import new_owner
from service.store.models import utcnow

log = logging.getLogger(__name__)

STORAGE_CLASSES = (
    CTImageStorage,
    EnhancedCTImageStorage,
    MRImageStorage,
    EnhancedMRImageStorage,
    SecondaryCaptureImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    ParametricMapStorage,
    SegmentationStorage,
    BasicTextSRStorage,
    EnhancedSRStorage,
    ComprehensiveSRStorage,
    Comprehensive3DSRStorage,
)
TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)
_SOP_NAMES = {uid: UID(uid).keyword or uid for uid in STORAGE_CLASSES}

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SOP_CLASS_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_PROCESSING_FAILURE = 0xC000
FILING_BACKLOG_BYTES = 256 << 20  # journalled but not yet filed; beyond it, receiving waits for the filer
FILING_QUIET_S = 0.05  # the filer works when receiving pauses this long, or when the backlog is full,
FILING_MAX_LAG_S = 1.0  # or when its oldest instance was received this long ago
FILING_RETRY_S = (0.5, 10.0)  # a filing that failed to write is retried after 0.5 s, doubling up to 10 s
REFUSAL_LOG_S = 10.0
_LONG_AGO = datetime(1970, 1, 1)
_DISK_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.ENOMEM})
"""Errors of the disk rather than of one instance: the instance waits in the journal and is retried."""
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass(frozen=True)
class ReceiverConfig:
    ae_title: str
    host: str
    port: int
    max_pdu: int
    max_associations: int
    allowed_calling_aets: tuple[str, ...]
    allowed_hosts: tuple[str, ...]
    min_free_bytes: int
    network_timeout_s: float
    sync_each: bool = True  # fdatasync the journal before each Success
    sync_interval_s: float = 0.01  # otherwise, at most this long after it
    tls: ssl.SSLContext | None = None  # DICOM TLS for peers that open with a TLS handshake
    accept_plain: bool = True  # False: a plain association request is rejected
    max_connections: int = 64  # open TCP connections, associated or not; one host may hold half
    max_associations_per_host: int | None = None  # None: half of max_associations (at least 1)
    association_request_timeout_s: float = 10.0  # ARTIM: the whole A-ASSOCIATE-RQ within this
    max_instance_bytes: int = 0  # longest dataset of one C-STORE; 0 = unlimited

    @property
    def associations_per_host(self) -> int:
        if self.max_associations_per_host is not None:
            return self.max_associations_per_host
        return max(1, self.max_associations // 2)

    @property
    def connections_per_host(self) -> int:
        return max(1, self.max_connections // 2)


class Receiver:
    """Accepts associations on a TCP port, journals and spools instances, hands each to ``on_instance``."""

    def __init__(self, config: ReceiverConfig, spool: Spool, on_instance: Callable[[ReceivedInstance], None]) -> None:
        self.config = config
        self.spool = spool
        self.on_instance = on_instance
        self.journal_folder = claim_folder(spool.root / "journal", new_owner().replace(":", "-"))
        self.journal = Journal(self.journal_folder.path, sync_each=config.sync_each, sync_interval_s=config.sync_interval_s)
        self.contexts = [build_context(Verification)]
        self.contexts += [build_context(sop_class, list(TRANSFER_SYNTAXES)) for sop_class in STORAGE_CLASSES]
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._connections: dict[socket.socket, str] = {}  # open sockets and their peer's address
        self._per_host: Counter[str] = Counter()  # open connections per peer address
        self._established = 0
        self._established_per_host: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._backlog: deque[tuple[int, JournalEntry, datetime]] = deque()
        self._backlog_bytes = 0
        self._backlog_changed = threading.Condition()
        self._last_received = 0.0
        self._unrecovered: dict[int, int] = {}  # journal segments from before a start not yet filed: offset reached
        self._spool_writable = True  # False from a filing that failed to write until one succeeds
        self._journal_writable = True  # False from an append that failed until one succeeds
        self._retry_at = 0.0
        self._retry_delay = FILING_RETRY_S[0]
        self._refusals_logged: dict[str, float] = {}
        self.loops = [Loop("dicom-receiver", self._accept_loop), Loop("dicom-filer", self._filing_loop)]

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        if self._listener is None:
            raise RuntimeError("receiver not started")
        return self._listener.getsockname()[1]

    @property
    def accepting(self) -> bool:
        """Whether new instances can be made durable now (for readiness): the journal is open and
        writable, the spool writable, and free space above ``min_free_bytes``."""
        try:
            free = self.spool.free_bytes()
        except OSError:
            free = 0
        accepting = (self.journal.is_open and self._journal_writable and self._spool_writable
                     and free >= self.config.min_free_bytes)
        metrics.RECEIVER_READY.set(int(accepting))
        return accepting

    def recover(self) -> int:
        """File what the journal holds from before a crash; call before ``start``. Returns the count.

        Never raises for a record: a bad one is quarantined; one that cannot be written (a full
        disk) stays in its journal segment, which is kept and retried by the filer, so that the
        service starts and answers 0xA700 meanwhile.
        """
        count = 0
        for segment in self.journal.segments():
            if self._unrecovered:
                self._unrecovered[segment] = 0  # after a failed write: the rest waits for the retries
                continue
            offset = 0
            try:
                for offset_after, entry in self.journal.replay_segment(segment):
                    self._file(entry, replace=True)
                    count += 1
                    offset = offset_after
            except OSError as error:
                metrics.FILING_FAILURES.inc()
                log.error("could not file journalled instances at start (%s); they stay in the journal "
                          "and are retried, new instances get 0xA700 meanwhile", error)
                self._unrecovered[segment] = offset
                self._spool_writable = False
        count += self._recover_orphans()
        self._open_journal()
        return count

    def _recover_orphans(self) -> int:
        """File the records of the journals of other receivers that are gone (replicas sharing the
        spool), then remove them; one that cannot be filed now stays for the next start."""
        count = 0
        for folder, lock_fd in self.journal_folder.orphans:
            orphan = Journal(folder)
            try:
                for segment in orphan.segments():
                    for _, entry in orphan.replay_segment(segment):
                        self._file(entry, replace=True)
                        count += 1
                orphan.close()
                remove_orphan(folder, lock_fd)
                log.info("filed the journal %s of a receiver that is gone", folder.name)
            except OSError as error:
                orphan.close()
                os.close(lock_fd)
                metrics.FILING_FAILURES.inc()
                log.error("could not file the journal %s of a receiver that is gone (%s); the next start tries again",
                          folder.name, error)
        self.journal_folder.orphans = []
        return count

    def _open_journal(self) -> None:
        try:
            self.journal.open(keep=self._unrecovered)
        except OSError as error:
            log.error("could not open the receive journal (%s); new instances get 0xA700 until it can be", error)

    def start(self) -> None:
        self._listener = socket.create_server((self.config.host, self.config.port), backlog=64)
        self._listener.settimeout(0.2)
        for loop in self.loops:
            loop.start()
        log.info("DICOM receiver %s listening on %s:%d", self.config.ae_title, self.config.host, self.port)

    def stop(self) -> None:
        """Stop listening, abort open associations, file what was received, close the journal."""
        self._stopping.set()
        for loop in self.loops:
            loop.stop()
        self.loops[0].join(timeout=10)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            connections = list(self._connections)
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _ in range(100):
            with self._lock:
                if not self._connections:
                    break
            time.sleep(0.05)
        with self._backlog_changed:
            self._backlog_changed.notify_all()
        self.loops[1].join(timeout=60)  # what is still unfiled after that is replayed at the next start
        self.journal.close()
        self.journal_folder.release()

    def _accept_loop(self) -> None:
        allowed = frozenset(self.config.allowed_hosts)
        while not self._stopping.is_set():
            try:
                sock, address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as error:
                if self._stopping.is_set():
                    return
                if error.errno in _RESOURCE_ERRORS:  # out of descriptors: wait for some to close
                    log.error("DICOM receiver cannot accept connections now: %s", error)
                    self._stopping.wait(0.5)
                    continue
                raise
            host = address[0]
            if allowed and host not in allowed:
                log.warning("refused connection from %s: address not in allowed_hosts", host)
                metrics.ASSOCIATIONS.labels(result="rejected").inc()
                sock.close()
                continue
            refusal = self._admit(sock, host)
            if refusal is not None:
                metrics.CONNECTIONS_REFUSED.labels(reason=refusal[0]).inc()
                log.warning("refused connection from %s: %s", host, refusal[1])
                sock.close()
                continue
            try:
                no_delay(sock)
                threading.Thread(target=self._associate, args=(sock, host), name="dicom-association", daemon=True).start()
            except (OSError, RuntimeError) as error:  # no thread to be had: the peer may try again later
                log.error("could not serve the connection from %s: %s", host, error)
                self._forget(sock, host)
                sock.close()

    def _admit(self, sock: socket.socket, host: str) -> tuple[str, str] | None:
        """Count a new connection in, or say why it must be closed at once (metric reason, log
        text): too many open in all, or this host holding its half of them already."""
        with self._lock:
            if len(self._connections) >= self.config.max_connections:
                return "connections", f"already {len(self._connections)} open connections (max_connections)"
            if self._per_host[host] >= self.config.connections_per_host:
                return "host_share", f"this host already holds {self._per_host[host]} connections (half of max_connections)"
            self._connections[sock] = host
            self._per_host[host] += 1
            return None

    def _forget(self, sock: socket.socket, host: str) -> None:
        with self._lock:
            self._connections.pop(sock, None)
            self._per_host[host] -= 1
            if self._per_host[host] <= 0:
                del self._per_host[host]

    def _secure(self, sock: socket.socket, host: str) -> tuple[socket.socket, bool] | None:
        """The connection the upper layer reads (TLS after the handshake when the peer opens one)
        and whether it is encrypted; None when the handshake failed (the socket is closed)."""
        if self.config.tls is None:
            return sock, False
        try:
            secured, encrypted = tls.accept(sock, self.config.tls, self.config.network_timeout_s)
        except (OSError, PeerGone) as error:  # ssl.SSLError and TimeoutError are OSErrors
            log.warning("TLS handshake with %s failed: %s", host, error)
            metrics.ASSOCIATIONS.labels(result="rejected").inc()
            self._forget(sock, host)
            sock.close()
            return None
        if encrypted:
            with self._lock:
                self._connections.pop(sock, None)
                self._connections[secured] = host
        return secured, encrypted

    def _associate(self, sock: socket.socket, host: str) -> None:
        secured = self._secure(sock, host)
        if secured is None:
            return
        sock, encrypted = secured
        connection = Connection(sock, self.config.network_timeout_s, self.config.max_pdu, self.config.max_instance_bytes,
                                prompt_ack=True)
        holds_slot = established = False
        try:
            request = connection.read_association_request(self.config.association_request_timeout_s)
            refusal = self._refusal(request, host, encrypted)
            if refusal is not None:
                connection.reject(request, refusal)
                return
            holds_slot = True
            contexts = connection.accept(request, self.contexts, (IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION))
            established = True
            metrics.ASSOCIATIONS.labels(result="accepted").inc()
            metrics.ASSOCIATIONS_ACTIVE.inc()
            self._serve(connection, contexts, request.calling_ae)
        except ProtocolError as error:
            metrics.ASSOCIATIONS_ABORTED.labels(reason="protocol").inc()
            log.warning("aborted the association from %s: %s", host, error)
            connection.abort(error.reason)
        except PeerGone as error:
            log.info("association from %s ended: %s", host, error)
        except TimeoutError:
            metrics.ASSOCIATIONS_ABORTED.labels(reason="timeout").inc()
            phase = "an association request" if not established else "a PDU"
            log.warning("aborted the association from %s: %s did not arrive in time", host, phase)
            connection.abort(0x00)
        except OSError as error:
            if not self._stopping.is_set():
                log.warning("association from %s failed: %s", host, error)
        except Exception:  # noqa: BLE001 - the association's edge: one peer never ends the receiver
            metrics.ASSOCIATIONS_ABORTED.labels(reason="internal").inc()
            log.exception("aborted the association from %s after an internal error", host)
            connection.abort(0x00)
        finally:
            with self._lock:
                if holds_slot:
                    self._established -= 1
                    self._established_per_host[host] -= 1
                    if self._established_per_host[host] <= 0:
                        del self._established_per_host[host]
            self._forget(sock, host)
            if established:
                metrics.ASSOCIATIONS_ACTIVE.dec()
            sock.close()

    def _refusal(self, request: AssociationRequest, address: str, encrypted: bool = False) -> tuple[int, int, int] | None:
        """Why the association must be rejected (A-ASSOCIATE-RJ reason), or None to accept it."""
        allowed = [ae.strip() for ae in self.config.allowed_calling_aets]
        if not encrypted and not self.config.accept_plain:
            reason, why = tls.REJECT_PLAIN, "plain DICOM on a TLS-only port (dicom_transport tls)"
        elif request.called_ae != self.config.ae_title:
            reason, why = REJECT_CALLED_AE, f"called AE title {request.called_ae!r} is not ours ({self.config.ae_title})"
        elif allowed and request.calling_ae not in allowed:
            reason, why = REJECT_CALLING_AE, "calling AE title not in allowed_calling_aets"
        else:
            with self._lock:
                share = self.config.associations_per_host
                if self._established < self.config.max_associations and self._established_per_host[address] < share:
                    self._established += 1
                    self._established_per_host[address] += 1
                    return None
                full = self._established >= self.config.max_associations
            reason = REJECT_TOO_MANY
            why = (f"already {self.config.max_associations} associations (max_associations)" if full
                   else f"this host already holds {share} associations (max_associations_per_host)")
        metrics.ASSOCIATIONS.labels(result="rejected").inc()
        log.warning("rejected association from %s (calling AE %r): %s", address, request.calling_ae, why)
        return reason

    def _serve(self, connection: Connection, contexts: dict[int, PresentationContext], calling_ae: str) -> None:
        while True:
            message = connection.read_message(contexts)
            if message is None:
                return
            command = message.command
            if command.command_field == C_ECHO_RQ:
                connection.send_command(message.context_id, encode_response(command, STATUS_SUCCESS))
            elif command.command_field == C_STORE_RQ:
                received = time.monotonic()
                entry = JournalEntry(command.sop_class_uid, command.sop_instance_uid,
                                     str(contexts[message.context_id].transfer_syntax[0]), calling_ae, message.dataset)
                status, segment = self._store(entry, str(contexts[message.context_id].abstract_syntax), command.has_dataset)
                metrics.RECEIVE_SECONDS.labels(phase="dataset").observe(received - message.command_at)
                metrics.RECEIVE_SECONDS.labels(phase="durable").observe(time.monotonic() - received)
                connection.send_command(message.context_id, encode_response(command, status))
                if segment is not None:
                    self._hand_to_filer(segment, entry)
            else:
                raise ProtocolError(f"DIMSE command 0x{command.command_field:04x} is not supported here")

    def _store(self, entry: JournalEntry, abstract_syntax: str, has_dataset: bool) -> tuple[int, int | None]:
        """The status of one C-STORE, and its journal segment when it was made durable; an
        unexpected failure is 0xC000 for this instance, never the end of the association."""
        try:
            return self._journal(entry, abstract_syntax, has_dataset)
        except Exception:  # noqa: BLE001 - pynetdicom's ``attempt``: the failure becomes a status
            metrics.INSTANCES_REJECTED.labels(reason="internal").inc()
            log.exception("could not take an instance from %r", entry.calling_ae)
            return STATUS_PROCESSING_FAILURE, None

    def _journal(self, entry: JournalEntry, abstract_syntax: str, has_dataset: bool = True) -> tuple[int, int | None]:
        """Make the instance durable: its status, and its journal segment when it was accepted."""
        try:
            check_uid(entry.sop_instance_uid, "Affected SOP Instance UID")
            if not has_dataset or not entry.dataset:
                raise InputError("C-STORE request without a dataset")
        except InputError as error:
            metrics.INSTANCES_REJECTED.labels(reason="invalid").inc()
            log.warning("refused an instance from %r: %s", entry.calling_ae, error)
            return STATUS_CANNOT_UNDERSTAND, None
        if entry.sop_class_uid != abstract_syntax:
            metrics.INSTANCES_REJECTED.labels(reason="invalid").inc()
            log.warning("refused an instance from %r: its SOP class is not its presentation context's", entry.calling_ae)
            return STATUS_SOP_CLASS_MISMATCH, None
        if not self._spool_writable:
            metrics.INSTANCES_REJECTED.labels(reason="spool_unwritable").inc()
            self._log_refusal("spool_unwritable", "refused instances with 0xA700: the spool cannot be written "
                              "(filing is being retried)")
            return STATUS_OUT_OF_RESOURCES, None
        free = self.spool.free_bytes()
        metrics.SPOOL_FREE_BYTES.set(free)
        if free < self.config.min_free_bytes:
            metrics.INSTANCES_REJECTED.labels(reason="disk_full").inc()
            self._log_refusal("disk_full", f"refused instances with 0xA700: {free} bytes free, below min_free_bytes")
            return STATUS_OUT_OF_RESOURCES, None
        try:
            segment = self.journal.append(entry)
        except OSError as error:
            self._journal_writable = False
            metrics.INSTANCES_REJECTED.labels(reason="write_failed").inc()
            self._log_refusal("write_failed", f"refused instances with 0xA700: the journal cannot be written: {error}")
            return STATUS_OUT_OF_RESOURCES, None
        self._journal_writable = True
        return STATUS_SUCCESS, segment

    def _log_refusal(self, reason: str, message: str) -> None:
        """An error line per reason at most every REFUSAL_LOG_S (a PACS retrying would flood the
        log); the metric counts every refusal."""
        now = time.monotonic()
        if now - self._refusals_logged.get(reason, -REFUSAL_LOG_S) >= REFUSAL_LOG_S:
            self._refusals_logged[reason] = now
            log.error("%s (repeats are counted in strokegate_instances_rejected_total)", message)

    def _hand_to_filer(self, segment: int, entry: JournalEntry) -> None:
        """Queue a journalled instance for filing, waiting while the backlog is full."""
        with self._backlog_changed:
            while self._backlog_bytes > FILING_BACKLOG_BYTES and not self._stopping.is_set():
                self._backlog_changed.wait(1)
            if not self._backlog or self._backlog_bytes > FILING_BACKLOG_BYTES // 2:
                self._backlog_changed.notify_all()  # else the filer is awake already, waiting for a pause
            self._backlog.append((segment, entry, utcnow()))
            self._backlog_bytes += len(entry.dataset)
            self._last_received = time.monotonic()

    def unfiled_since(self) -> datetime | None:
        """When the oldest instance acknowledged but not yet filed (so not yet in the database)
        was received, or None: the tracker must not call a study complete while one of its
        instances might still be in this backlog, or in a journal segment still to be filed."""
        if self._unrecovered:
            return _LONG_AGO
        with self._backlog_changed:
            return self._backlog[0][2] if self._backlog else None

    def _filing_loop(self) -> None:
        """Files journalled instances, off the receive path: in the pauses between instances of a
        study (the sender's CPU time and ours would otherwise compete), at once when the backlog is
        full or its oldest instance waited FILING_MAX_LAG_S. A filing that fails to write is
        retried with backoff, the instance staying first in the backlog; journal segments left from
        before a start (a full disk then) and a journal that could not be opened are retried in the
        same way. Drains the backlog on stop, unless writing fails."""
        while True:
            with self._backlog_changed:
                while not self._stopping.is_set():
                    now = time.monotonic()
                    retrying = not self._spool_writable or self._unrecovered or not self.journal.is_open
                    if retrying and now < self._retry_at:
                        self._backlog_changed.wait(self._retry_at - now)
                        continue
                    busy = now - self._last_received < FILING_QUIET_S
                    if self._backlog and (
                        retrying
                        or not busy
                        or self._backlog_bytes > FILING_BACKLOG_BYTES // 2
                        or (utcnow() - self._backlog[0][2]).total_seconds() > FILING_MAX_LAG_S
                    ):
                        break
                    if retrying:
                        break
                    self._backlog_changed.wait(FILING_QUIET_S if self._backlog else None)
                if self._stopping.is_set() and (not self._backlog or not self._spool_writable):
                    return
                head = self._backlog[0] if self._backlog else None
            if head is not None:
                segment, entry, received_at = head
                if not self._attempt(lambda: self._file(entry, received_at=received_at)):
                    continue
                self.journal.filed(segment)
                with self._backlog_changed:  # out of the backlog only once recorded, for unfiled_since
                    self._backlog.popleft()
                    self._backlog_bytes -= len(entry.dataset)
                    self._backlog_changed.notify_all()
            elif self._unrecovered:
                self._attempt(self._file_unrecovered)
            elif not self.journal.is_open:
                self._attempt(self._reopen_journal)
            else:
                self._spool_writable = True  # nothing is left that failed

    def _attempt(self, write: Callable[[], None]) -> bool:
        """Run a filing step; on a write failure note it, schedule the retry and return False."""
        try:
            write()
        except OSError as error:
            metrics.FILING_FAILURES.inc()
            if self._spool_writable:
                log.error("could not write into the spool (%s); the instance stays in the journal, "
                          "retried; new instances get 0xA700 meanwhile", error)
            self._spool_writable = False
            self._retry_at = time.monotonic() + self._retry_delay
            self._retry_delay = min(2 * self._retry_delay, FILING_RETRY_S[1])
            return False
        if not self._spool_writable:
            log.info("the spool can be written again: receiving resumes")
        self._spool_writable = True
        self._retry_delay = FILING_RETRY_S[0]
        return True

    def _file_unrecovered(self) -> None:
        """File the records of journal segments kept at start; release each once filed."""
        for segment, offset in sorted(self._unrecovered.items()):
            for offset_after, entry in self.journal.replay_segment(segment, offset):
                self._file(entry, replace=True)
                self._unrecovered[segment] = offset_after
            del self._unrecovered[segment]
            self.journal.release(segment)
            log.info("filed the rest of journal segment %d from before the start", segment)

    def _reopen_journal(self) -> None:
        self.journal.open(keep=self._unrecovered)
        self._journal_writable = True
        log.info("the receive journal is open again")

    def _file(self, entry: JournalEntry, replace: bool = False, received_at: datetime | None = None) -> None:
        """Write a journalled instance to the spool (or quarantine it) and record it. Raises only
        OSError for a write that failed for want of space or a working disk (to be retried)."""
        meta = b""
        try:
            meta = file_meta(entry)
            header = parse_header(meta + entry.dataset)
            item = received_instance(header, "", 0, entry.calling_ae, received_at)
        except InputError as error:
            self._quarantine(entry, meta, "invalid", str(error))
            return
        except Exception as error:  # noqa: BLE001 - pydicom raises many types for a corrupt dataset
            self._quarantine(entry, meta, "undecodable", f"{type(error).__name__}: {error}")
            return
        try:
            stored = self.spool.store(item.study_uid, item.series_uid, item.sop_uid, [meta, entry.dataset],
                                      durable=False, replace=replace)
        except OSError as error:
            if error.errno in _DISK_ERRORS or error.errno is None:
                raise
            self._quarantine(entry, meta, "unwritable", f"{type(error).__name__}: {error}")
            return
        item = dataclasses.replace(item, path=stored.path.as_posix(), size_bytes=stored.size_bytes)
        self.on_instance(item)
        if not stored.existed:
            sop_class = _SOP_NAMES.get(item.sop_class_uid, "other")
            metrics.INSTANCES_RECEIVED.labels(modality=metrics.modality_label(item.modality), sop_class=sop_class).inc()
            metrics.BYTES_RECEIVED.inc(stored.size_bytes)
            metrics.SPOOL_BYTES.inc(stored.size_bytes)

    def _quarantine(self, entry: JournalEntry, meta: bytes, reason: str, detail: str) -> None:
        path = self.spool.quarantine(entry.sop_instance_uid, [meta, entry.dataset], detail)
        metrics.INSTANCES_QUARANTINED.labels(reason=reason).inc()
        log.warning("quarantined an instance from %r as %s: %s", entry.calling_ae, path.name, detail)


def file_meta(entry: JournalEntry) -> bytes:
    """Preamble, DICM prefix and file meta information for a received dataset."""
    return part10_header(entry.sop_class_uid, entry.sop_instance_uid, entry.transfer_syntax_uid,
                         IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION, entry.calling_ae)
