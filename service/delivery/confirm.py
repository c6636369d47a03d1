"""Asking a destination whether it already holds result objects: C-FIND at IMAGE level.

An object is *uncertain* when it went on the wire and its C-STORE response was never recorded
(the service died, or the association broke, between the last byte and the response): the PACS
may have stored it. Before sending it again the sender asks, one Study Root query per object over
one association, keyed by the object's Study, Series and SOP Instance UIDs (the hierarchical keys
a strict PACS needs). Only an answer naming that SOP Instance UID counts as held; no match is
absent; anything else (no association, a failure status, a timeout, a malformed answer) is
unknown, and the caller sends the object again: a query never costs a result.
"""

from __future__ import annotations

import enum
import logging
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom.presentation import build_context

from service.config import Destination
from service.dicomnet.dimse import C_FIND_RSP, encode_find_request
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

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
RECEIVE_MAX_PDU = 64 * 1024
MAX_IDENTIFIER_BYTES = 64 * 1024  # one match's identifier: a few UIDs
ABORT_REASON_NOT_SPECIFIED = 0
MAX_MATCHES = 16  # a query keyed by one SOP Instance UID; more answers than this is not an answer


class Holding(enum.Enum):
    """What the destination said about one object."""

    HELD = "held"  # it answered a match with this SOP Instance UID
    ABSENT = "absent"  # it answered, with no such match
    UNKNOWN = "unknown"  # no answer we can trust: send it again


@dataclass(frozen=True)
class ObjectKeys:
    """The UIDs that find one object in a Study Root query."""

    study_uid: str
    series_uid: str
    sop_uid: str


class QueryFailed(Exception):
    """The destination gave no usable answer to one query."""


def identifier(keys: ObjectKeys) -> bytes:
    """The C-FIND identifier for one object, Implicit VR Little Endian."""
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = keys.study_uid
    query.SeriesInstanceUID = keys.series_uid
    query.SOPInstanceUID = keys.sop_uid
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, True
    write_dataset(out, query)
    return out.getvalue()


def matched_uid(encoded: bytes) -> str:
    """The SOP Instance UID of one C-FIND match (Implicit VR Little Endian); QueryFailed if unreadable."""
    try:
        match = read_dataset(BytesIO(encoded), is_implicit_VR=True, is_little_endian=True)
        return str(match.get("SOPInstanceUID", "")).strip("\0 ")
    except Exception as error:  # noqa: BLE001 - pydicom raises many kinds on malformed bytes
        raise QueryFailed(f"unreadable match: {type(error).__name__}") from error


def ask_holding(
    destination: Destination, objects: Sequence[ObjectKeys], calling_ae: str, timeout_s: float,
    tls: ssl.SSLContext | None = None,
) -> list[Holding]:
    """Whether ``destination`` holds each of ``objects``, one C-FIND per object over one association,
    all within ``timeout_s``; UNKNOWN for every object not answered."""
    holdings: list[Holding] = []
    deadline = time.monotonic() + timeout_s

    def rest(reason: str) -> list[Holding]:
        if len(holdings) < len(objects):
            log.warning("confirmation query to %s: %d of %d objects unanswered (%s); they will be sent again",
                        destination.name, len(objects) - len(holdings), len(objects), reason)
        return holdings + [Holding.UNKNOWN] * (len(objects) - len(holdings))

    if not objects:
        return []
    try:
        sock = socket.create_connection((destination.host, destination.port), timeout=timeout_s)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=destination.host)
    except OSError as error:
        return rest(f"association not established: {error}")
    connection = Connection(sock, timeout_s, RECEIVE_MAX_PDU, max_dataset=MAX_IDENTIFIER_BYTES)
    try:
        no_delay(sock)
        accepted, peer_max_pdu = connection.request(
            calling_ae, destination.ae_title, [build_context(STUDY_ROOT_FIND, [ImplicitVRLittleEndian])],
            (IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION),
        )
        if not accepted:
            return rest("Study Root C-FIND not accepted")
        context_id = next(iter(accepted))
        for message_id, keys in enumerate(objects, start=1):
            holdings.append(_one_query(connection, accepted, context_id, peer_max_pdu, message_id, keys, deadline))
        connection.release()
    except AssociationRejected as error:
        return rest(str(error))
    except ProtocolError as error:
        connection.abort(error.reason)
        return rest(f"association aborted: {error}")
    except QueryFailed as error:
        connection.abort(ABORT_REASON_NOT_SPECIFIED)
        return rest(f"association aborted: {error}")
    except (PeerGone, OSError) as error:  # TimeoutError is an OSError
        return rest(f"association lost: {error or type(error).__name__}")
    finally:
        sock.close()
    return holdings


def _one_query(
    connection: Connection, accepted: dict, context_id: int, peer_max_pdu: int, message_id: int, keys: ObjectKeys,
    deadline: float,
) -> Holding:
    """Send one query and read its responses up to the final one."""
    connection.send_message(context_id, encode_find_request(message_id, STUDY_ROOT_FIND),
                            memoryview(identifier(keys)), peer_max_pdu)
    held = False
    for _ in range(MAX_MATCHES + 1):
        if time.monotonic() > deadline:
            raise QueryFailed("no final response within the confirmation timeout")
        response = connection.read_message(accepted)
        if response is None or response.command.command_field != C_FIND_RSP:
            raise ProtocolError("expected a C-FIND response")
        if response.command.responded_to != message_id:
            raise ProtocolError(f"response to message {response.command.responded_to}, expected {message_id}")
        status = response.command.status
        if status in (0xFF00, 0xFF01):  # pending: one match
            if response.dataset and matched_uid(bytes(response.dataset)) == keys.sop_uid:
                held = True
            continue
        if status == 0x0000:
            return Holding.HELD if held else Holding.ABSENT
        log.warning("confirmation query: C-FIND status %s; the object will be sent again",
                    f"0x{status:04X}" if status is not None else "missing")
        return Holding.UNKNOWN  # a failure or cancel status ends this query; the association goes on
    raise QueryFailed(f"more than {MAX_MATCHES} matches for one SOP Instance UID")
