"""HL7 v2 over MLLP: the NIHSS from ORU^R01 messages, acknowledged per message.

An ORU^R01 gives the patient in PID-3 (the first identifier; its assigning authority, PID-3.4, is
the issuer) and the NIHSS in an OBX whose OBX-3 is LOINC 72089-6 (NIHSS total score) or 70182-1
(the NIHSS panel, its OBX-5 the total). The assessment time is OBX-14, else OBR-7, else MSH-7;
times without an offset are taken as this machine's local time. OBX-11 "D" (deletion) and "W"
(wrong) are refused: deletions are not supported; a correction is sent as a new result ("C").

Acknowledgements (original mode, MSH-15 and MSH-16 empty): AA when stored (a resent message
control ID is acknowledged again without a second record), AE with the reason in MSA-3 and ERR
when the content is wrong, AR when the message is not one StrokeGate takes (type, version) or
cannot be read at all. Enhanced mode: the application acknowledgement is sent on the same
connection when MSH-16 asks for it (AL, or ER on an error, or SU on success), else the accept
acknowledgement (CA/CE/CR) when MSH-15 asks for it, else nothing.

MLLP frames are <VT> message <FS><CR>; a frame longer than ``max_message_bytes``, or bytes
outside a frame, get an AR saying so and the connection is closed; one bad message never stops
the listener.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import hl7

from service.clinical.nihss import NihssReport, ScoreOutOfRange, as_utc, parse_score
from service.errors import InputError
from service.findings import NihssSource
from service.ops.loops import Loop

log = logging.getLogger(__name__)

START, END = b"\x0b", b"\x1c\x0d"
NIHSS_CODES = ("72089-6", "70182-1")
LOINC_SYSTEMS = ("LN", "LNC", "LOINC", "http://loinc.org")
ACCEPTED_STATUSES = ("", "F", "C", "P", "R", "A", "S", "I")
_TS = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,4}))?([+-]\d{4})?$")


class Rejected(Exception):
    """A message StrokeGate does not take at all (AR), with the reason."""


class ContentError(InputError):
    """Wrong content (AE): the reason, and its HL7 table 0357 code for ERR-3."""

    def __init__(self, reason: str, code: str) -> None:
        super().__init__(reason)
        self.code = code


MISSING, DATA_TYPE, TABLE_VALUE = "101", "102", "103"  # HL7 table 0357


@dataclass(frozen=True)
class Acknowledgement:
    """What to answer: the code (AA, AE, AR or CA, CE, CR) and the reason for an error."""

    code: str
    reason: str | None = None
    error_code: str = "207"  # HL7 table 0357


def parse_time(text: str) -> datetime:
    """An HL7 TS/DTM (YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]) as naive UTC; InputError otherwise."""
    match = _TS.match(text.strip())
    if match is None:
        raise InputError(f"time {text[:32]!r} is not an HL7 timestamp (YYYYMMDDHHMM[SS][+ZZZZ])")
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    try:
        moment = datetime(int(year), int(month or 1), int(day or 1), int(hour or 0), int(minute or 0),
                          int(second or 0), int((fraction or "0").ljust(6, "0")[:6]))
    except ValueError:
        raise InputError(f"time {text[:32]!r} is not a valid date and time") from None
    if offset:
        sign = 1 if offset[0] == "+" else -1
        zone = timezone(sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5])))
        moment = moment.replace(tzinfo=zone)
    return as_utc(moment)


_MISSING = (IndexError, KeyError, TypeError, ValueError)
"""What the hl7 package raises for an absent field or component, or one a sender's own delimiters
(MSH-2) made a plain string: read as empty, so that every message still gets an answer."""


def _field(segment: hl7.Segment, index: int) -> str:
    try:
        return str(segment(index)).strip()
    except _MISSING:
        return ""


def _component(segment: hl7.Segment, field: int, component: int) -> str:
    try:
        return str(segment(field)(1)(component)).strip()
    except _MISSING:
        return ""


def _segments(message: hl7.Message, name: str) -> list[hl7.Segment]:
    try:
        return list(message.segments(name))
    except KeyError:
        return []


def check_header(message: hl7.Message) -> None:
    """Rejected when the message is not an HL7 v2 ORU^R01 with a control ID."""
    msh = message.segment("MSH")
    kind = f"{_component(msh, 9, 1)}^{_component(msh, 9, 2)}"
    if kind != "ORU^R01":
        raise Rejected(f"message type {kind} is not taken: StrokeGate takes ORU^R01 (NIHSS results)")
    version = _field(msh, 12)
    if not version.startswith("2."):
        raise Rejected(f"HL7 version {version or '(none)'} is not taken: send HL7 v2.x")


def nihss_report(message: hl7.Message) -> NihssReport:
    """The NIHSS an ORU^R01 carries; InputError with the reason when its content is wrong."""
    msh = message.segment("MSH")
    control_id = _field(msh, 10)
    if not control_id:
        raise ContentError("MSH-10 (message control ID) is empty", MISSING)
    pids = _segments(message, "PID")
    if not pids:
        raise ContentError("no PID segment: the patient is unknown", MISSING)
    patient_id = _component(pids[0], 3, 1)
    if not patient_id:
        raise ContentError("PID-3 (patient identifier) is empty", MISSING)
    issuer = _component(pids[0], 3, 4) or None
    observations = [
        obx for obx in _segments(message, "OBX")
        if _component(obx, 3, 1) in NIHSS_CODES and (_component(obx, 3, 3) or "LN") in LOINC_SYSTEMS
    ]
    if not observations:
        raise ContentError(f"no OBX with LOINC {' or '.join(NIHSS_CODES)} (NIHSS total score)", MISSING)
    obx = next((o for o in observations if _component(o, 3, 1) == NIHSS_CODES[0]), observations[0])
    status = _field(obx, 11)
    if status not in ACCEPTED_STATUSES:
        raise ContentError(f"OBX-11 result status {status[:8]!r} is not taken (deletions are not supported; "
                           "send a correction with status C)", TABLE_VALUE)
    try:
        value = parse_score(_field(obx, 5))
    except ScoreOutOfRange as error:
        raise ContentError(str(error), TABLE_VALUE) from None
    except InputError as error:
        raise ContentError(str(error), DATA_TYPE) from None
    obrs = _segments(message, "OBR")
    when = _field(obx, 14) or (_field(obrs[0], 7) if obrs else "") or _field(msh, 7)
    if not when:
        raise ContentError("no assessment time (OBX-14, OBR-7 or MSH-7)", MISSING)
    try:
        assessed_at = parse_time(when)
    except InputError as error:
        raise ContentError(str(error), DATA_TYPE) from None
    return NihssReport(
        patient_id=patient_id, patient_issuer=issuer, value=value, assessed_at=assessed_at,
        source=NihssSource.HL7, source_id=control_id, detail=f"OBX-11 {status or '(empty)'}",
    )


def _application_ack_wanted(msh: hl7.Segment | None, ok: bool) -> tuple[bool, bool]:
    """(enhanced mode, application acknowledgement wanted) from MSH-15/16."""
    accept = _field(msh, 15) if msh is not None else ""
    application = _field(msh, 16) if msh is not None else ""
    if not accept and not application:
        return False, True
    return True, _condition(application or "AL", ok)


def _condition(mode: str, ok: bool) -> bool:
    return mode == "AL" or (mode == "ER" and not ok) or (mode == "SU" and ok)


def _escape(text: str) -> str:
    """HL7 escapes for the default delimiters, control characters dropped."""
    text = re.sub(r"[\x00-\x1f\x7f]", " ", text)
    for char, escape in (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("~", "\\R\\"), ("&", "\\T\\")):
        text = text.replace(char, escape)
    return text


def build_ack(msh: hl7.Segment | None, ack: Acknowledgement, receiver: str = "STROKEGATE") -> str:
    """An ACK message answering the message with header ``msh`` (None: it could not be read)."""
    sender_app = _field(msh, 3) if msh is not None else ""
    sender_facility = _field(msh, 4) if msh is not None else ""
    control_id = _field(msh, 10) if msh is not None else ""
    trigger = _component(msh, 9, 2) if msh is not None else ""
    version = (_field(msh, 12) if msh is not None else "") or "2.5.1"
    now = datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S+0000")
    segments = [
        f"MSH|^~\\&|{_escape(receiver)}||{_escape(sender_app)}|{_escape(sender_facility)}|{now}||"
        f"ACK^{_escape(trigger)}^ACK|{uuid.uuid4().hex[:20]}|P|{_escape(version)}",
        f"MSA|{ack.code}|{_escape(control_id)}" + (f"|{_escape(ack.reason)[:200]}" if ack.reason else ""),
    ]
    if ack.reason:
        severity = "E"
        segments.append(f"ERR|||{ack.error_code}^{_ERROR_NAMES.get(ack.error_code, 'Application error')}^HL70357|"
                        f"{severity}||||{_escape(ack.reason)[:250]}")
    return "\r".join(segments) + "\r"


_ERROR_NAMES = {
    "100": "Segment sequence error", "101": "Required field missing", "102": "Data type error",
    "103": "Table value not found", "200": "Unsupported message type", "203": "Unsupported version ID",
    "207": "Application internal error",
}


def handle_message(text: str, store: Callable[[NihssReport], bool], receiver: str = "STROKEGATE") -> str | None:
    """Answer one HL7 message: parse it, store its NIHSS with ``store`` (True: new, False: resent)
    and build the acknowledgement; None when MSH-15/16 ask for none."""
    msh = None
    try:
        message = hl7.parse(text.replace("\r\n", "\r").replace("\n", "\r"))
        msh = message.segment("MSH")
        check_header(message)
        report = nihss_report(message)
    except Rejected as error:
        ack, ok = Acknowledgement("AR", str(error), "200"), False
    except ContentError as error:
        ack, ok = Acknowledgement("AE", str(error), error.code), False
    except InputError as error:  # a field StrokeGate cannot store (e.g. a 65-character identifier)
        ack, ok = Acknowledgement("AE", str(error)), False
    except Exception as error:  # noqa: BLE001 - the hl7 parser's errors are not one class: unreadable input
        if msh is None:
            ack = Acknowledgement("AR", f"not an HL7 v2 message: {type(error).__name__}: {str(error)[:120]}", "100")
        else:
            ack = Acknowledgement("AE", f"the message cannot be read: {type(error).__name__}: {str(error)[:120]}")
        ok = False
    else:
        try:
            new = store(report)
        except InputError as error:
            ack, ok = Acknowledgement("AE", str(error)), False
        else:
            log.info("HL7 NIHSS %d stored from message %s (%s)", report.value, report.source_id,
                     "new" if new else "resent: already stored")
            ack, ok = Acknowledgement("AA"), True
    if ack.reason:
        log.warning("HL7 message answered %s: %s", ack.code, ack.reason)
    enhanced, wanted = _application_ack_wanted(msh, ok)
    if not enhanced or wanted:
        return build_ack(msh, ack, receiver)
    if _condition(_field(msh, 15) or "NE", ok):
        commit = {"AA": "CA", "AE": "CE", "AR": "CR"}[ack.code]
        return build_ack(msh, Acknowledgement(commit, ack.reason, ack.error_code), receiver)
    return None


class Hl7Listener:
    """The MLLP listener: one accept loop (``loop``, restarted if it crashes) and one thread per
    connection, at most ``max_connections``; each frame is at most ``max_message_bytes``."""

    def __init__(
        self, host: str, port: int, store: Callable[[NihssReport], bool], *, max_message_bytes: int = 1024 * 1024,
        max_connections: int = 16, timeout_s: float = 60.0, receiver: str = "STROKEGATE",
    ) -> None:
        self.host, self.store, self.receiver = host, store, receiver
        self.max_message_bytes, self.timeout_s = max_message_bytes, timeout_s
        self._slots = threading.BoundedSemaphore(max_connections)
        self._stop = threading.Event()
        self._socket = socket.create_server((host, port))
        self._socket.settimeout(0.5)
        self.loop = Loop("hl7", self._serve)

    @property
    def port(self) -> int:
        return self._socket.getsockname()[1]

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        self._stop.set()
        self.loop.stop()
        self.loop.join(timeout=5)
        self._socket.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, peer = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            if not self._slots.acquire(blocking=False):
                log.warning("HL7 connection from %s refused: %s", peer[0], "too many open connections")
                connection.close()
                continue
            threading.Thread(target=self._connection, args=(connection, peer), name="hl7-connection", daemon=True).start()

    def _connection(self, connection: socket.socket, peer: tuple) -> None:
        try:
            with connection:
                connection.settimeout(self.timeout_s)
                for frame in self._frames(connection, peer):
                    answer = handle_message(frame, self.store, self.receiver)
                    if answer is not None:
                        connection.sendall(START + answer.encode("utf-8") + END)
        except (OSError, TimeoutError) as error:
            log.info("HL7 connection from %s ended: %s", peer[0], error)
        except Exception:  # noqa: BLE001 - one connection's failure never reaches the listener
            log.exception("HL7 connection from %s failed", peer[0])
        finally:
            self._slots.release()

    def _frames(self, connection: socket.socket, peer: tuple):  # noqa: ANN202 - a generator of str
        """Each framed message as text; a broken frame is answered AR and ends the connection."""
        buffer = bytearray()
        while not self._stop.is_set():
            chunk = connection.recv(65536)
            if not chunk:
                if buffer.strip():
                    self._refuse(connection, peer, "broken MLLP frame: the connection closed inside a message")
                return
            buffer += chunk
            while buffer:
                if buffer[:1] != START:
                    if not buffer.strip(b"\r\n"):
                        buffer.clear()
                        break
                    self._refuse(connection, peer, "broken MLLP frame: bytes outside <VT> ... <FS><CR>")
                    return
                end = buffer.find(END)
                if end < 0:
                    if len(buffer) > self.max_message_bytes + 1:
                        self._refuse(connection, peer, f"MLLP frame longer than {self.max_message_bytes} bytes")
                        return
                    break
                if end - 1 > self.max_message_bytes:
                    self._refuse(connection, peer, f"MLLP frame longer than {self.max_message_bytes} bytes")
                    return
                payload = bytes(buffer[1:end])
                del buffer[: end + len(END)]
                yield _decode(payload)

    def _refuse(self, connection: socket.socket, peer: tuple, reason: str) -> None:
        log.warning("HL7 from %s refused: %s", peer[0], reason)
        ack = build_ack(None, Acknowledgement("AR", reason, "100"), self.receiver)
        try:
            connection.sendall(START + ack.encode("utf-8") + END)
        except OSError:
            pass


def _decode(payload: bytes) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        return payload.decode("latin-1")
