"""Sending result objects to one destination by C-STORE, over one association.

The files are sent as written (their encoded dataset after the file meta, in their own transfer
syntax), with the upper layer the receiver uses (``dicomnet/upper_layer.py`` says why not
pynetdicom's requestor): association negotiation by pynetdicom's PDU classes, our P-DATA path.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pynetdicom.presentation import build_context

from service.config import Destination
from service.dicomnet.dimse import C_STORE_RSP, encode_store_request
from service.dicomnet.upper_layer import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION,
    AssociationRejected,
    Connection,
    PeerGone,
    ProtocolError,
    no_delay,
)

log = logging.getLogger(__name__)

RECEIVE_MAX_PDU = 1 << 20  # responses are a few hundred bytes


@dataclass(frozen=True)
class SendOutcome:
    path: Path
    status: int | None  # None: no response (not sent: no association, no context; or lost in flight)
    error: str | None
    uncertain: bool = False  # it went on the wire and no response came back: the peer may hold it

    @property
    def delivered(self) -> bool:
        """Success, or a warning status (the object was stored); a failure status is not a delivery."""
        return self.status is not None and (self.status == 0x0000 or self.status in (0x0001, 0x0107, 0x0116) or (self.status & 0xF000) == 0xB000)


def dataset_bytes(data: bytes) -> memoryview:
    """The encoded dataset of a DICOM file: what follows its file meta group."""
    if data[128:132] != b"DICM" or data[132:138] != b"\x02\x00\x00\x00UL":
        raise ValueError("not a DICOM file with a file meta group length")
    (group_length,) = struct.unpack_from("<I", data, 140)
    return memoryview(data)[144 + group_length :]


@dataclass(frozen=True)
class SeriesRelabel:
    """The series number and description one destination wants on one object (None: as written)."""

    number: int | None = None
    description: str | None = None


def relabelled(data: bytes, label: SeriesRelabel) -> memoryview:
    """The encoded dataset of a DICOM file with the series number and description a destination
    wants; its UIDs stay (the same object, labelled as that PACS asks, as routers' tag morphing does)."""
    dataset = dcmread(BytesIO(data))
    if label.number is not None:
        dataset.SeriesNumber = label.number
    if label.description is not None:
        dataset.SeriesDescription = label.description
    with BytesIO() as out:
        dataset.save_as(out, enforce_file_format=True)
        return dataset_bytes(out.getvalue())


def send_files(
    destination: Destination, paths: list[Path], calling_ae: str, timeout_s: float = 30.0,
    labels: Sequence[SeriesRelabel | None] | None = None, tls: ssl.SSLContext | None = None,
    on_outcome: Callable[[int, SendOutcome], None] | None = None, on_attempt: Callable[[int], None] | None = None,
) -> list[SendOutcome]:
    """C-STORE every file to ``destination`` over one association; one outcome per file.
    ``labels``, one per file, relabel its series on the way (None: sent as written); ``tls``: over DICOM
    TLS with this context.
    ``on_outcome(index, outcome)`` is called as each file's outcome is known, before the next
    file is sent: a caller that records it then resends at most the file in flight after a crash.
    ``on_attempt(index)`` is called just before a file goes on the wire: a caller that records it
    knows, after a crash, which file may have reached the destination without an answer."""
    outcomes: list[SendOutcome] = []
    in_flight = -1  # the index of the file on the wire, awaiting its response

    def settle(outcome: SendOutcome) -> None:
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(len(outcomes) - 1, outcome)

    def settle_rest(error: str) -> list[SendOutcome]:
        for index, path in enumerate(paths[len(outcomes):], start=len(outcomes)):
            settle(SendOutcome(path, None, error, uncertain=index == in_flight))
        return outcomes

    labels = labels or [None] * len(paths)
    try:
        metas = [read_file_meta_info(p) for p in paths]
    except (OSError, ValueError, EOFError) as error:  # a result file we cannot read: nothing is sent
        return settle_rest(f"result file unreadable: {error}")
    keys = sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas})
    contexts = [build_context(sop_class, [syntax]) for sop_class, syntax in keys]
    try:
        sock = socket.create_connection((destination.host, destination.port), timeout=timeout_s)
        if tls is not None:  # the handshake fails with an ssl.SSLError (an OSError) and closes the socket
            sock = tls.wrap_socket(sock, server_hostname=destination.host)
    except OSError as error:
        return settle_rest(f"association not established: {error}")
    connection = Connection(sock, timeout_s, RECEIVE_MAX_PDU)
    try:
        no_delay(sock)
        accepted, peer_max_pdu = connection.request(
            calling_ae, destination.ae_title, contexts, (IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION)
        )
        by_key = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])): cid for cid, cx in accepted.items()}
        for message_id, (path, meta, label) in enumerate(zip(paths, metas, labels, strict=True), start=1):
            key = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
            if key not in by_key:
                settle(SendOutcome(path, None, f"no accepted presentation context for {key[0]} in {key[1]}"))
                continue
            command = encode_store_request(message_id, key[0], str(meta.MediaStorageSOPInstanceUID))
            try:
                data = path.read_bytes()
                dataset = dataset_bytes(data) if label is None else relabelled(data, label)
            except (OSError, ValueError) as error:  # this file only; the others go on
                settle(SendOutcome(path, None, f"result file unreadable: {error}"))
                continue
            if on_attempt is not None:
                on_attempt(message_id - 1)
            in_flight = message_id - 1
            connection.send_message(by_key[key], command, dataset, peer_max_pdu)
            response = connection.read_message(accepted)
            if response is None or response.command.command_field != C_STORE_RSP:
                raise ProtocolError("expected a C-STORE response")
            if response.command.responded_to != message_id:
                raise ProtocolError(f"response to message {response.command.responded_to}, expected {message_id}")
            status = response.command.status
            in_flight = -1
            settle(SendOutcome(path, status, None if status == 0 else f"status 0x{status:04X}" if status is not None else "no status"))
        connection.release()
    except AssociationRejected as error:
        return settle_rest(str(error))
    except ProtocolError as error:
        connection.abort(error.reason)
        settle_rest(f"association aborted: {error}")
    except (PeerGone, OSError) as error:  # TimeoutError is an OSError
        settle_rest(f"association lost: {error or type(error).__name__}")
    finally:
        sock.close()
    return outcomes
