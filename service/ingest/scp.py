"""The DICOM receiver: a pynetdicom acceptor for C-ECHO and C-STORE.

The receive path never decodes pixel data: the encoded dataset is prefixed with its file meta
and written to the spool (fsync'd) before Success goes back; a few header attributes are parsed
to file it. Every failure maps to a DIMSE status with a logged reason, and never ends the
association: 0xA700 out of resources (disk below the watermark, write failed), 0xC210 cannot
understand (undecodable header, invalid UIDs).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
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
from pynetdicom import AE, evt
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
from pynetdicom.transport import ThreadedAssociationServer

import service
from service.errors import InputError
from service.ingest.spool import Spool
from service.ops import metrics

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
STATUS_CANNOT_UNDERSTAND = 0xC210


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


def no_delay(sock: socket.socket) -> None:
    """Send small PDUs at once: without it, Nagle's algorithm and the peer's delayed ACK stall
    each request-response exchange by up to 40 ms."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def no_delay_on_open(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler for requestors (SCUs): TCP_NODELAY on the new connection."""
    sock = event.assoc.dul.socket.socket
    if sock is not None:
        no_delay(sock)


def parse_header(file_bytes: bytes) -> Dataset:
    """The filing attributes (and file meta) of an encoded DICOM file; stops before the pixel data."""
    return dcmread(BytesIO(file_bytes), stop_before_pixels=True, specific_tags=_HEADER_TAGS)


def received_instance(header: Dataset, path: str, size_bytes: int, calling_ae: str | None) -> ReceivedInstance:
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
    )


class Receiver:
    """Accepts associations, spools instances and hands each to ``on_instance``."""

    def __init__(self, config: ReceiverConfig, spool: Spool, on_instance: Callable[[ReceivedInstance], None]) -> None:
        self.config = config
        self.spool = spool
        self.on_instance = on_instance
        self.ae = AE(ae_title=config.ae_title)
        self.ae.maximum_pdu_size = config.max_pdu
        self.ae.maximum_associations = config.max_associations
        self.ae.network_timeout = config.network_timeout_s
        self.ae.dimse_timeout = config.network_timeout_s
        self.ae.acse_timeout = config.network_timeout_s
        self.ae.require_calling_aet = list(config.allowed_calling_aets)
        self.ae.implementation_version_name = f"STROKEGATE_{service.__version__}"[:16]
        self.ae.add_supported_context(Verification)
        for sop_class in STORAGE_CLASSES:
            self.ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        self._server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None
        self._established: set[int] = set()
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        if self._server is None:
            raise RuntimeError("receiver not started")
        return self._server.server_address[1]

    def start(self) -> None:
        handlers = [
            (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        allowed = frozenset(self.config.allowed_hosts)

        class Server(ThreadedAssociationServer):
            def verify_request(self, request, client_address) -> bool:  # noqa: ANN001
                if allowed and client_address[0] not in allowed:
                    log.warning("refused connection from %s: address not in allowed_hosts", client_address[0])
                    metrics.ASSOCIATIONS.labels(result="rejected").inc()
                    return False
                no_delay(request)
                return True

        self._server = self.ae.make_server(
            (self.config.host, self.config.port), evt_handlers=handlers, server_class=Server
        )
        self._thread = threading.Thread(target=self._server.serve_forever, name="dicom-receiver", daemon=True)
        self._thread.start()
        self.ae._servers.append(self._server)  # as AE.start_server does, so shutdown() can find it
        log.info("DICOM receiver %s listening on %s:%d", self.config.ae_title, self.config.host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()  # also aborts open associations and closes the socket
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _on_established(self, event: evt.Event) -> None:
        metrics.ASSOCIATIONS.labels(result="accepted").inc()
        with self._lock:
            self._established.add(id(event.assoc))
        metrics.ASSOCIATIONS_ACTIVE.inc()

    def _on_closed(self, event: evt.Event) -> None:
        with self._lock:
            if id(event.assoc) not in self._established:
                return
            self._established.discard(id(event.assoc))
        metrics.ASSOCIATIONS_ACTIVE.dec()

    def _on_rejected(self, event: evt.Event) -> None:
        metrics.ASSOCIATIONS.labels(result="rejected").inc()
        requestor = event.assoc.requestor
        log.warning(
            "rejected association from %s (calling AE %r): not in allowed_calling_aets or too many associations",
            requestor.address, requestor.ae_title,
        )

    def _on_store(self, event: evt.Event) -> int:
        calling_ae = event.assoc.requestor.ae_title
        free = self.spool.free_bytes()
        metrics.SPOOL_FREE_BYTES.set(free)
        if free < self.config.min_free_bytes:
            metrics.INSTANCES_REJECTED.labels(reason="disk_full").inc()
            log.error("refused an instance from %r: %d bytes free, below min_free_bytes", calling_ae, free)
            return STATUS_OUT_OF_RESOURCES
        request = event.request
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = request.AffectedSOPClassUID
        meta.MediaStorageSOPInstanceUID = request.AffectedSOPInstanceUID
        meta.TransferSyntaxUID = event.context.transfer_syntax
        meta.ImplementationClassUID = self.ae.implementation_class_uid
        meta.ImplementationVersionName = self.ae.implementation_version_name
        if calling_ae:
            meta.SourceApplicationEntityTitle = calling_ae
        head = BytesIO()
        head.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(head, meta, enforce_standard=True)
        dataset = request.DataSet.getvalue()
        try:
            header = parse_header(head.getvalue() + dataset)
            entry = self.spool.store(
                str(header.get("StudyInstanceUID", "")),
                str(header.get("SeriesInstanceUID", "")),
                str(request.AffectedSOPInstanceUID or ""),
                [head.getvalue(), dataset],
            )
        except InputError as error:
            metrics.INSTANCES_REJECTED.labels(reason="invalid").inc()
            log.warning("refused an instance from %r: %s", calling_ae, error)
            return STATUS_CANNOT_UNDERSTAND
        except OSError as error:
            metrics.INSTANCES_REJECTED.labels(reason="write_failed").inc()
            log.error("could not spool an instance from %r: %s", calling_ae, error)
            return STATUS_OUT_OF_RESOURCES
        except Exception as error:  # pydicom raises many types for a corrupt dataset
            metrics.INSTANCES_REJECTED.labels(reason="undecodable").inc()
            log.warning("refused an undecodable instance from %r: %s: %s", calling_ae, type(error).__name__, error)
            return STATUS_CANNOT_UNDERSTAND
        item = received_instance(header, entry.path.as_posix(), entry.size_bytes, calling_ae)
        self.on_instance(item)
        if not entry.existed:
            sop_class = _SOP_NAMES.get(item.sop_class_uid, "other")
            metrics.INSTANCES_RECEIVED.labels(modality=item.modality or "unknown", sop_class=sop_class).inc()
            metrics.BYTES_RECEIVED.inc(entry.size_bytes)
            metrics.SPOOL_BYTES.inc(entry.size_bytes)
        return STATUS_SUCCESS
