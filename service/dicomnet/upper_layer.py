"""The DICOM Upper Layer on one socket: PDUs in and out, association negotiation, DIMSE messages.

pynetdicom decodes and encodes the association PDUs and negotiates the presentation contexts;
what this module adds is a direct P-DATA path. pynetdicom's general state machine (a thread per
layer, queues, an object per fragment) costs ~4 ms of CPU per instance, while a CT perfusion study
is hundreds of instances sent one after another, each waiting for its response: here a message's
fragments are read straight from the socket into one buffer. The same connection serves the
sender of results (requestor side), which also avoids a race in pynetdicom's requestor: its reactor
thread can take a response that arrives within microseconds of the request for an unsolicited
message, and the request then waits for its DIMSE timeout.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pydicom.uid import generate_uid
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

import service

from service.errors import InputError
from service.dicomnet.dimse import Command, decode_command

IMPLEMENTATION_CLASS_UID = generate_uid(entropy_srcs=["StrokeGate DICOM implementation"])
IMPLEMENTATION_VERSION = f"STROKEGATE_{service.__version__}"[:16]

ASSOCIATE_RQ = 0x01
ASSOCIATE_AC = 0x02
ASSOCIATE_RJ = 0x03
P_DATA = 0x04
RELEASE_RQ = 0x05
ABORT = 0x07
_PDU_HEADER = struct.Struct(">BxI")
_PDV_HEADER = struct.Struct(">IBB")
RELEASE_RP = 0x06
_RELEASE_RQ = bytes([RELEASE_RQ, 0, 0, 0, 0, 4, 0, 0, 0, 0])
_RELEASE_RP = bytes([0x06, 0, 0, 0, 0, 4, 0, 0, 0, 0])
_SEND_CHUNK = 1 << 20  # dataset fragment size when the peer sets no maximum
MAX_ASSOCIATION_PDU = 64 << 10
"""Longest A-ASSOCIATE-RQ/AC body accepted: a request with 128 presentation contexts of a dozen
transfer syntaxes each is about 40 KiB."""
_MAX_BODY = {ASSOCIATE_RQ: MAX_ASSOCIATION_PDU, ASSOCIATE_AC: MAX_ASSOCIATION_PDU, ASSOCIATE_RJ: 4,
             RELEASE_RQ: 4, RELEASE_RP: 4, ABORT: 4}  # PS3.8 9.3; P-DATA: the negotiated maximum
_FIRST_BUFFER = 64 << 10  # a PDU body buffer starts this size and grows with the bytes that arrive
_MAX_COMMAND = 64 << 10  # a command set is a few hundred bytes
_DEADLINE_SLACK_S = 1.0  # how late a whole-PDU deadline may be noticed (saves a settimeout per read)

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_APPLICATION_CONTEXT = (0x01, 0x01, 0x02)
REJECT_TOO_MANY = (0x02, 0x03, 0x02)
# A-ABORT reasons from the service provider, PS3.8 9.3.8
ABORT_UNRECOGNIZED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_INVALID_PARAMETER = 0x06
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"


def no_delay(sock: socket.socket) -> None:
    """Send small PDUs at once: without it, Nagle's algorithm and the peer's delayed ACK stall
    each request-response exchange by up to 40 ms."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux; None where the system has no such option


def quick_ack(sock: socket.socket) -> bool:
    """Acknowledge what arrived at once instead of after the delayed-ACK timer (up to 40 ms): a
    sender without TCP_NODELAY (most PACS, dcmtk's storescu by default) holds the last part of each
    dataset until its earlier part is acknowledged, and would stall that long per instance. Linux
    clears the mode again as it sees fit, so it is set after each read. False where the system
    has no such option or refuses it (nothing else changes)."""
    if TCP_QUICKACK is None:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
    except OSError:
        return False
    return True


class ProtocolError(Exception):
    """The peer broke the Upper Layer protocol; the association is aborted with ``reason``."""

    def __init__(self, message: str, reason: int = ABORT_UNEXPECTED_PDU) -> None:
        super().__init__(message)
        self.reason = reason


class PeerGone(Exception):
    """The peer aborted or closed the connection."""


class AssociationRejected(Exception):
    """The peer answered our A-ASSOCIATE-RQ with A-ASSOCIATE-RJ."""


@dataclass
class Message:
    """One DIMSE message: its command and, for C-STORE, the encoded dataset exactly as received."""

    context_id: int
    command: Command
    dataset: bytearray = field(default_factory=bytearray)
    command_at: float = 0.0  # time.monotonic() when its command set was complete


@dataclass(frozen=True)
class AssociationRequest:
    calling_ae: str
    called_ae: str
    peer_max_pdu: int
    primitive: A_ASSOCIATE


class Connection:
    """One association's socket, read and written in whole PDUs.

    Nothing a peer declares is allocated before its bytes arrive: each PDU type has a maximum
    length, checked on its 6-byte header, and the body buffer grows with the bytes received. Each
    whole PDU must arrive within ``timeout_s`` of the start of the wait for it (the association's
    idle deadline: a peer trickling one byte at a time is cut, not only a silent one); the
    A-ASSOCIATE-RQ within the deadline given to ``read_association_request`` (ARTIM, PS3.8 9.1.5).
    """

    def __init__(
        self, sock: socket.socket, timeout_s: float, max_pdu: int, max_dataset: int = 0, prompt_ack: bool = False
    ) -> None:
        """``prompt_ack``: acknowledge each read at once (``quick_ack``), for a receiver."""
        self.sock = sock
        self.prompt_ack = prompt_ack and quick_ack(sock)
        self.max_dataset = max_dataset  # longest dataset of one message, bytes; 0 = unlimited
        self.timeout_s = timeout_s
        self._socket_timeout = timeout_s
        self.sock.settimeout(timeout_s)
        self.max_pdu = max_pdu  # what we told the peer; 0 = unlimited
        self._header = bytearray(_PDU_HEADER.size)
        self._header_view = memoryview(self._header)
        self._body = bytearray(0)  # allocated by the first PDU that needs it
        self._pending = b""  # PDV items of the next message that shared a PDU with the last one

    def _read_into(self, view: memoryview, deadline: float) -> None:
        """Fill ``view``. The usual single read costs no clock; a read that returns short is
        followed by reads that check the deadline, so the whole PDU's deadline is kept to within
        one read (a peer trickling bytes is cut at the first read after it)."""
        received = self.sock.recv_into(view)
        if self.prompt_ack:
            quick_ack(self.sock)
        if received == len(view):
            return
        while True:
            if not received:
                raise PeerGone("connection closed by the peer")
            view = view[received:]
            if not view:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the peer did not complete a PDU in time")
            if remaining < self._socket_timeout - _DEADLINE_SLACK_S:
                self._socket_timeout = remaining
                self.sock.settimeout(remaining)
            received = self.sock.recv_into(view)
            if self.prompt_ack:
                quick_ack(self.sock)

    def read_pdu(self, timeout_s: float | None = None) -> tuple[int, memoryview]:
        """The next PDU's type and body (valid until the next call); the whole PDU must arrive
        within ``timeout_s`` (default: the connection's timeout)."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if self._socket_timeout != timeout_s:
            self._socket_timeout = timeout_s
            self.sock.settimeout(timeout_s)
        deadline = time.monotonic() + timeout_s
        self._read_into(self._header_view, deadline)
        kind, length = _PDU_HEADER.unpack(self._header)
        if kind == P_DATA:
            if self.max_pdu and length > self.max_pdu:
                raise ProtocolError(f"P-DATA PDU of {length} bytes exceeds the negotiated maximum", ABORT_INVALID_PARAMETER)
        elif kind not in _MAX_BODY:
            raise ProtocolError(f"unrecognised PDU type 0x{kind:02x}", ABORT_UNRECOGNIZED_PDU)
        elif length > _MAX_BODY[kind]:
            raise ProtocolError(f"PDU type 0x{kind:02x} of {length} bytes exceeds its maximum of {_MAX_BODY[kind]}",
                                ABORT_INVALID_PARAMETER)
        return kind, self._read_body(length, deadline)

    def _read_body(self, length: int, deadline: float) -> memoryview:
        """``length`` bytes into the body buffer, which grows (doubling) only as they arrive."""
        if length > len(self._body):
            filled = 0
            while filled < length:
                if filled == len(self._body):
                    grown = bytearray(min(length, max(2 * len(self._body), _FIRST_BUFFER)))
                    grown[:filled] = memoryview(self._body)[:filled]
                    self._body = grown  # a view a caller still holds keeps the old buffer alive
                end = min(length, len(self._body))
                self._read_into(memoryview(self._body)[filled:end], deadline)
                filled = end
            return memoryview(self._body)[:length]
        body = memoryview(self._body)[:length]
        self._read_into(body, deadline)
        return body

    def read_association_request(self, timeout_s: float | None = None) -> AssociationRequest:
        """The A-ASSOCIATE-RQ that must open every association, whole within ``timeout_s``
        (ARTIM); any other PDU type is refused on its header, before its body is read."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        self.sock.settimeout(timeout_s)
        self._socket_timeout = timeout_s
        deadline = time.monotonic() + timeout_s
        self._read_into(self._header_view, deadline)
        kind, length = _PDU_HEADER.unpack(self._header)
        if kind != ASSOCIATE_RQ:
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{kind:02x}")
        if length > MAX_ASSOCIATION_PDU:
            raise ProtocolError(f"A-ASSOCIATE-RQ of {length} bytes exceeds {MAX_ASSOCIATION_PDU}", ABORT_INVALID_PARAMETER)
        body = self._read_body(length, deadline)
        primitive = self._decode(A_ASSOCIATE_RQ(), body)
        return AssociationRequest(
            calling_ae=str(primitive.calling_ae_title).strip(),
            called_ae=str(primitive.called_ae_title).strip(),
            peer_max_pdu=int(primitive.maximum_length_received or 0),
            primitive=primitive,
        )

    def _decode(self, pdu: A_ASSOCIATE_RQ | A_ASSOCIATE_AC, body: memoryview) -> A_ASSOCIATE:
        """The primitive of the association PDU just read (pynetdicom's decoder); ProtocolError if malformed."""
        try:
            pdu.decode(bytes(self._header) + bytes(body))
            return pdu.to_primitive()
        except Exception as error:  # pynetdicom raises several types for a malformed PDU
            name = type(pdu).__name__.replace("_", "-")
            raise ProtocolError(f"malformed {name}: {error}", ABORT_INVALID_PARAMETER) from error

    def accept(
        self, request: AssociationRequest, supported: list[PresentationContext], implementation: tuple[str, str]
    ) -> dict[int, PresentationContext]:
        """Negotiate the presentation contexts, send A-ASSOCIATE-AC; the accepted contexts by ID."""
        rq = request.primitive
        roles = {
            item.sop_class_uid: (item.scu_role, item.scp_role)
            for item in rq.user_information
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation)
        }
        try:
            results, role_replies = negotiate_as_acceptor(rq.presentation_context_definition_list, supported, roles)
        except Exception as error:  # pynetdicom's negotiation assumes well-formed proposals (e.g. a transfer syntax each)
            raise ProtocolError(f"malformed presentation contexts: {type(error).__name__}: {error}",
                                ABORT_INVALID_PARAMETER) from error
        primitive = A_ASSOCIATE()
        primitive.application_context_name = APPLICATION_CONTEXT
        primitive.calling_ae_title = rq.calling_ae_title
        primitive.called_ae_title = rq.called_ae_title
        primitive.result = 0x00
        primitive.result_source = 0x01
        primitive.presentation_context_definition_results_list = results
        primitive.user_information = [*self._user_information(implementation), *role_replies]
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(primitive)
        self.sock.sendall(pdu.encode())
        return {int(cx.context_id): cx for cx in results if cx.result == 0x00}

    def _user_information(self, implementation: tuple[str, str]) -> list:
        """Our maximum PDU length and implementation class UID and version name."""
        maximum = MaximumLengthNotification()
        maximum.maximum_length_received = self.max_pdu
        class_uid = ImplementationClassUIDNotification()
        class_uid.implementation_class_uid = implementation[0]
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = implementation[1]
        return [maximum, class_uid, version]

    def reject(self, request: AssociationRequest, reason: tuple[int, int, int]) -> None:
        primitive = A_ASSOCIATE()
        primitive.result, primitive.result_source, primitive.diagnostic = reason
        pdu = A_ASSOCIATE_RJ()
        pdu.from_primitive(primitive)
        self.sock.sendall(pdu.encode())

    def abort(self, reason: int) -> None:
        """A-ABORT from the service provider; best effort, the connection is closed afterwards."""
        try:
            self.sock.sendall(bytes([ABORT, 0, 0, 0, 0, 4, 0, 0, 0x02, reason]))
        except OSError:
            pass

    def read_message(self, contexts: dict[int, PresentationContext]) -> Message | None:
        """The next complete DIMSE message; None when the peer asks to release (answered here)."""
        command = bytearray()
        message: Message | None = None
        while True:
            if self._pending:
                body, self._pending = memoryview(self._pending), b""
            else:
                kind, body = self.read_pdu()
                if kind == RELEASE_RQ:
                    if command or message is not None:
                        raise ProtocolError("release requested in the middle of a message")
                    self.sock.sendall(_RELEASE_RP)
                    return None
                if kind == ABORT:
                    raise PeerGone("association aborted by the peer")
                if kind != P_DATA:
                    raise ProtocolError(f"unexpected PDU type 0x{kind:02x} on an established association")
            position = 0
            while position < len(body):
                if position + 6 > len(body):
                    raise ProtocolError("truncated PDV item", ABORT_INVALID_PARAMETER)
                length, context_id, control = _PDV_HEADER.unpack_from(body, position)
                end = position + 4 + length
                if length < 2 or end > len(body) or context_id not in contexts:
                    raise ProtocolError("invalid PDV item", ABORT_INVALID_PARAMETER)
                fragment = body[position + 6 : end]
                position = end
                complete = False
                if control & 0x01:
                    if message is not None:
                        raise ProtocolError("command fragment after the command was complete")
                    command += fragment
                    if len(command) > _MAX_COMMAND:
                        raise ProtocolError("command set longer than 64 KiB", ABORT_INVALID_PARAMETER)
                    if control & 0x02:
                        try:
                            message = Message(context_id, decode_command(command), command_at=time.monotonic())
                        except InputError as error:
                            raise ProtocolError(str(error), ABORT_INVALID_PARAMETER) from error
                        complete = not message.command.has_dataset
                else:
                    if message is None or message.context_id != context_id:
                        raise ProtocolError("dataset fragment before its command")
                    message.dataset += fragment
                    if self.max_dataset and len(message.dataset) > self.max_dataset:
                        raise ProtocolError(f"dataset longer than {self.max_dataset} bytes", ABORT_INVALID_PARAMETER)
                    complete = bool(control & 0x02)
                if complete:
                    self._pending = bytes(body[position:])
                    return message

    def request(
        self, calling_ae: str, called_ae: str, contexts: list[PresentationContext], implementation: tuple[str, str]
    ) -> tuple[dict[int, PresentationContext], int]:
        """Propose an association (requestor side); the accepted contexts by ID and the peer's
        maximum PDU length (0: unlimited). AssociationRejected, PeerGone or ProtocolError otherwise."""
        for number, context in enumerate(contexts):
            context.context_id = 2 * number + 1
        primitive = A_ASSOCIATE()
        primitive.application_context_name = APPLICATION_CONTEXT
        primitive.calling_ae_title = calling_ae
        primitive.called_ae_title = called_ae
        primitive.presentation_context_definition_list = contexts
        primitive.user_information = self._user_information(implementation)
        pdu = A_ASSOCIATE_RQ()
        pdu.from_primitive(primitive)
        self.sock.sendall(pdu.encode())
        kind, body = self.read_pdu()
        if kind == ASSOCIATE_RJ:
            raise AssociationRejected(f"association rejected (result, source, reason = {tuple(body[1:4])})")
        if kind == ABORT:
            raise PeerGone("association aborted by the peer")
        if kind != ASSOCIATE_AC:
            raise ProtocolError(f"expected A-ASSOCIATE-AC, got PDU type 0x{kind:02x}")
        accepted = self._decode(A_ASSOCIATE_AC(), body)
        proposed = {int(cx.context_id): cx for cx in contexts}
        result = {}
        for cx in accepted.presentation_context_definition_results_list:
            if cx.result == 0x00 and int(cx.context_id) in proposed:
                chosen = PresentationContext()
                chosen.context_id = int(cx.context_id)
                chosen.abstract_syntax = proposed[int(cx.context_id)].abstract_syntax
                chosen.transfer_syntax = [cx.transfer_syntax[0]]
                result[chosen.context_id] = chosen
        return result, int(accepted.maximum_length_received or 0)

    def release(self) -> None:
        """A-RELEASE-RQ, then wait for the peer's A-RELEASE-RP (requestor side)."""
        self.sock.sendall(_RELEASE_RQ)
        kind, _ = self.read_pdu()
        if kind != RELEASE_RP:
            raise ProtocolError(f"expected A-RELEASE-RP, got PDU type 0x{kind:02x}")

    def send_message(self, context_id: int, command: bytes, dataset: memoryview, peer_max_pdu: int) -> None:
        """A command set and its dataset, the dataset in fragments that fit the peer's maximum PDU."""
        self.send_command(context_id, command)
        chunk = (peer_max_pdu - 6) if peer_max_pdu else _SEND_CHUNK
        for start in range(0, len(dataset), chunk):
            fragment = dataset[start : start + chunk]
            control = 0x02 if start + chunk >= len(dataset) else 0x00
            header = _PDU_HEADER.pack(P_DATA, len(fragment) + 6) + _PDV_HEADER.pack(len(fragment) + 2, context_id, control)
            self.sock.sendall(header + bytes(fragment))

    def send_command(self, context_id: int, encoded: bytes) -> None:
        """A whole command set in one P-DATA PDU (command sets are small)."""
        item = _PDV_HEADER.pack(len(encoded) + 2, context_id, 0x03) + encoded
        self.sock.sendall(_PDU_HEADER.pack(P_DATA, len(item)) + item)
