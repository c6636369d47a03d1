"""The DICOM receiver: accepts associations, answers C-ECHO and C-STORE.

The receive path never decodes pixel data. Each instance's encoded dataset is appended to the
receive journal and synced before Success goes back (journal.py says why a journal and not a file
per instance); right after answering, the instance is filed into the spool and handed to the
recorder while the sender is already sending the next one. Checks that need no parsing (disk
watermark, the SOP Instance UID, the SOP class) answer with a DIMSE status; an instance whose
header turns out unreadable after it was acknowledged is quarantined with a logged reason and a
metric. An association ends only by release, abort or a protocol error, never by a bad instance.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections import deque
from datetime import datetime
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset
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
from service.ingest.journal import Journal, JournalEntry
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
_HEADER_TAGS = [
    "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "PatientID",
    "AccessionNumber", "SeriesDescription", "NumberOfSeriesRelatedInstances",
]
_SOP_NAMES = {uid: UID(uid).keyword or uid for uid in STORAGE_CLASSES}

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SOP_CLASS_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
FILING_BACKLOG_BYTES = 256 << 20  # journalled but not yet filed; beyond it, receiving waits for the filer
FILING_QUIET_S = 0.05  # the filer works when receiving pauses this long, or when the backlog is full,
FILING_MAX_LAG_S = 1.0  # or when its oldest instance was received this long ago


@dataclass(frozen=True)
class ReceivedInstance:
    """What the tracker needs to know about one spooled instance."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str  # relative to the spool root
    size_bytes: int
    modality: str | None
    patient_id: str | None
    accession_number: str | None
    series_description: str | None
    expected_instances: int | None
    calling_ae: str | None
    received_at: datetime | None = None  # when it was acknowledged (naive UTC); None: when recorded


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


def parse_header(file_bytes: bytes) -> Dataset:
    """The filing attributes (and file meta) of an encoded DICOM file; stops before the pixel data."""
    return dcmread(BytesIO(file_bytes), stop_before_pixels=True, specific_tags=_HEADER_TAGS)


def received_instance(
    header: Dataset, path: str, size_bytes: int, calling_ae: str | None, received_at: datetime | None = None
) -> ReceivedInstance:
    """The tracker's record of one spooled file, from its parsed header."""
    meta = header.file_meta

    def text(keyword: str) -> str | None:
        value = header.get(keyword)
        return str(value)[:64] if value not in (None, "") else None

    expected = header.get("NumberOfSeriesRelatedInstances")
    return ReceivedInstance(
        study_uid=str(header.StudyInstanceUID),
        series_uid=str(header.SeriesInstanceUID),
        sop_uid=str(meta.MediaStorageSOPInstanceUID),
        sop_class_uid=str(meta.MediaStorageSOPClassUID),
        transfer_syntax_uid=str(meta.TransferSyntaxUID),
        path=path,
        size_bytes=size_bytes,
        modality=text("Modality"),
        patient_id=text("PatientID"),
        accession_number=text("AccessionNumber"),
        series_description=text("SeriesDescription"),
        expected_instances=int(expected) if expected not in (None, "") else None,
        calling_ae=calling_ae or None,
        received_at=received_at,
    )


class Receiver:
    """Accepts associations on a TCP port, journals and spools instances, hands each to ``on_instance``."""

    def __init__(self, config: ReceiverConfig, spool: Spool, on_instance: Callable[[ReceivedInstance], None]) -> None:
        self.config = config
        self.spool = spool
        self.on_instance = on_instance
        self.journal = Journal(spool.root / "journal", sync_each=config.sync_each, sync_interval_s=config.sync_interval_s)
        self.contexts = [build_context(Verification)]
        self.contexts += [build_context(sop_class, list(TRANSFER_SYNTAXES)) for sop_class in STORAGE_CLASSES]
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._established = 0
        self._lock = threading.Lock()
        self._backlog: deque[tuple[int, JournalEntry, datetime]] = deque()
        self._backlog_bytes = 0
        self._backlog_changed = threading.Condition()
        self._last_received = 0.0
        self._filer: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        if self._listener is None:
            raise RuntimeError("receiver not started")
        return self._listener.getsockname()[1]

    def recover(self) -> int:
        """File what the journal holds from before a crash; call before ``start``. Returns the count."""
        count = 0
        for _, entry in self.journal.replay():
            self._file(entry, replace=True)
            count += 1
        self.journal.open()
        return count

    def start(self) -> None:
        self._listener = socket.create_server((self.config.host, self.config.port), backlog=64)
        self._listener.settimeout(0.2)
        self._filer = threading.Thread(target=self._filing_loop, name="dicom-filer", daemon=True)
        self._filer.start()
        self._thread = threading.Thread(target=self._accept_loop, name="dicom-receiver", daemon=True)
        self._thread.start()
        log.info("DICOM receiver %s listening on %s:%d", self.config.ae_title, self.config.host, self.port)

    def stop(self) -> None:
        """Stop listening, abort open associations, file what was received, close the journal."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
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
            self._stopping.wait(0.05)
        with self._backlog_changed:
            self._backlog_changed.notify_all()
        if self._filer is not None:
            self._filer.join(timeout=60)  # what is still unfiled after that is replayed at the next start
        self.journal.close()

    def _accept_loop(self) -> None:
        allowed = frozenset(self.config.allowed_hosts)
        while not self._stopping.is_set():
            try:
                sock, address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as error:
                if not self._stopping.is_set():
                    log.error("DICOM receiver stopped accepting: %s", error)
                return
            if allowed and address[0] not in allowed:
                log.warning("refused connection from %s: address not in allowed_hosts", address[0])
                metrics.ASSOCIATIONS.labels(result="rejected").inc()
                sock.close()
                continue
            no_delay(sock)
            with self._lock:
                self._connections.add(sock)
            threading.Thread(target=self._associate, args=(sock, address[0]), name="dicom-association", daemon=True).start()

    def _secure(self, sock: socket.socket, address: str) -> tuple[socket.socket, bool] | None:
        """The connection the upper layer reads (TLS after the handshake when the peer opens one)
        and whether it is encrypted; None when the handshake failed (the socket is closed)."""
        if self.config.tls is None:
            return sock, False
        try:
            secured, encrypted = tls.accept(sock, self.config.tls, self.config.network_timeout_s)
        except (OSError, PeerGone) as error:  # ssl.SSLError and TimeoutError are OSErrors
            log.warning("TLS handshake with %s failed: %s", address, error)
            metrics.ASSOCIATIONS.labels(result="rejected").inc()
            with self._lock:
                self._connections.discard(sock)
            sock.close()
            return None
        if encrypted:
            with self._lock:
                self._connections.discard(sock)
                self._connections.add(secured)
        return secured, encrypted

    def _associate(self, sock: socket.socket, address: str) -> None:
        secured = self._secure(sock, address)
        if secured is None:
            return
        sock, encrypted = secured
        connection = Connection(sock, self.config.network_timeout_s, self.config.max_pdu)
        holds_slot = established = False
        try:
            request = connection.read_association_request()
            refusal = self._refusal(request, address, encrypted)
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
            log.warning("aborted the association from %s: %s", address, error)
            connection.abort(error.reason)
        except PeerGone as error:
            log.info("association from %s ended: %s", address, error)
        except TimeoutError:
            log.warning("aborted the association from %s: no data for %.0f s", address, self.config.network_timeout_s)
            connection.abort(0x00)
        except OSError as error:
            if not self._stopping.is_set():
                log.warning("association from %s failed: %s", address, error)
        finally:
            with self._lock:
                self._connections.discard(sock)
                if holds_slot:
                    self._established -= 1
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
                if self._established < self.config.max_associations:
                    self._established += 1
                    return None
            reason, why = REJECT_TOO_MANY, f"already {self.config.max_associations} associations (max_associations)"
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
                context = contexts[message.context_id]
                entry = JournalEntry(command.sop_class_uid, command.sop_instance_uid, str(context.transfer_syntax[0]),
                                     calling_ae, message.dataset)
                status, segment = self._journal(entry, str(context.abstract_syntax))
                connection.send_command(message.context_id, encode_response(command, status))
                if segment is not None:
                    self._hand_to_filer(segment, entry)
            else:
                raise ProtocolError(f"DIMSE command 0x{command.command_field:04x} is not supported here")

    def _journal(self, entry: JournalEntry, abstract_syntax: str) -> tuple[int, int | None]:
        """Make the instance durable: its status, and its journal segment when it was accepted."""
        try:
            check_uid(entry.sop_instance_uid, "Affected SOP Instance UID")
        except InputError as error:
            metrics.INSTANCES_REJECTED.labels(reason="invalid").inc()
            log.warning("refused an instance from %r: %s", entry.calling_ae, error)
            return STATUS_CANNOT_UNDERSTAND, None
        if entry.sop_class_uid != abstract_syntax:
            metrics.INSTANCES_REJECTED.labels(reason="invalid").inc()
            log.warning("refused an instance from %r: its SOP class is not its presentation context's", entry.calling_ae)
            return STATUS_SOP_CLASS_MISMATCH, None
        free = self.spool.free_bytes()
        metrics.SPOOL_FREE_BYTES.set(free)
        if free < self.config.min_free_bytes:
            metrics.INSTANCES_REJECTED.labels(reason="disk_full").inc()
            log.error("refused an instance from %r: %d bytes free, below min_free_bytes", entry.calling_ae, free)
            return STATUS_OUT_OF_RESOURCES, None
        try:
            return STATUS_SUCCESS, self.journal.append(entry)
        except OSError as error:
            metrics.INSTANCES_REJECTED.labels(reason="write_failed").inc()
            log.error("could not journal an instance from %r: %s", entry.calling_ae, error)
            return STATUS_OUT_OF_RESOURCES, None

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
        instances might still be in this backlog."""
        with self._backlog_changed:
            return self._backlog[0][2] if self._backlog else None

    def _filing_loop(self) -> None:
        """Files journalled instances, off the receive path: in the pauses between instances of a
        study (the sender's CPU time and ours would otherwise compete), at once when the backlog is
        full or its oldest instance waited FILING_MAX_LAG_S. Drains the backlog on stop."""
        while True:
            with self._backlog_changed:
                while not self._stopping.is_set():
                    busy = time.monotonic() - self._last_received < FILING_QUIET_S
                    if self._backlog and (
                        not busy
                        or self._backlog_bytes > FILING_BACKLOG_BYTES // 2
                        or (utcnow() - self._backlog[0][2]).total_seconds()
                        > FILING_MAX_LAG_S
                    ):
                        break
                    self._backlog_changed.wait(FILING_QUIET_S if self._backlog else None)
                if not self._backlog:
                    return
                segment, entry, received_at = self._backlog[0]
            try:
                self._file(entry, received_at=received_at)
            except OSError as error:  # stays in the journal, filed again at the next start
                log.error("could not file a received instance into the spool: %s", error)
            else:
                self.journal.filed(segment)
            with self._backlog_changed:  # out of the backlog only once recorded, for unfiled_since
                self._backlog.popleft()
                self._backlog_bytes -= len(entry.dataset)
                self._backlog_changed.notify_all()

    def _file(self, entry: JournalEntry, replace: bool = False, received_at: datetime | None = None) -> None:
        """Write a journalled instance to the spool (or quarantine it) and record it."""
        meta = file_meta(entry)
        try:
            header = parse_header(meta + entry.dataset)
            stored = self.spool.store(
                str(header.get("StudyInstanceUID", "")), str(header.get("SeriesInstanceUID", "")),
                entry.sop_instance_uid, [meta, entry.dataset], durable=False, replace=replace,
            )
        except InputError as error:
            self._quarantine(entry, meta, "invalid", str(error))
            return
        except OSError:
            raise
        except Exception as error:  # pydicom raises many types for a corrupt dataset
            self._quarantine(entry, meta, "undecodable", f"{type(error).__name__}: {error}")
            return
        item = received_instance(header, stored.path.as_posix(), stored.size_bytes, entry.calling_ae, received_at)
        self.on_instance(item)
        if not stored.existed:
            sop_class = _SOP_NAMES.get(item.sop_class_uid, "other")
            metrics.INSTANCES_RECEIVED.labels(modality=metrics.modality_label(item.modality), sop_class=sop_class).inc()
            metrics.BYTES_RECEIVED.inc(stored.size_bytes)
            metrics.SPOOL_BYTES.inc(stored.size_bytes)

    def _quarantine(self, entry: JournalEntry, meta: bytes, reason: str, detail: str) -> None:
        path = self.spool.quarantine(entry.sop_instance_uid, [meta, entry.dataset])
        metrics.INSTANCES_REJECTED.labels(reason=reason).inc()
        log.warning("quarantined an instance from %r as %s: %s", entry.calling_ae, path.name, detail)


def file_meta(entry: JournalEntry) -> bytes:
    """Preamble, DICM prefix and file meta information for a received dataset."""
    return part10_header(entry.sop_class_uid, entry.sop_instance_uid, entry.transfer_syntax_uid,
                         IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION, entry.calling_ae)
