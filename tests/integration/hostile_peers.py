"""A peer that writes raw bytes: association requests built with pynetdicom's PDU classes, then
PDUs and command sets written by hand, so that tests can send what no well-behaved SCU would; and
the well-behaved sending the hostile tests need around it (files as they are, fresh study copies).

Importable as ``hostile_peers`` (tests/integration/conftest.py puts this directory on sys.path).
Nothing here uses the service's own upper layer.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context

_PDU = struct.Struct(">BxI")


def associate_rq(sop_classes: list[str], transfer_syntax: str = "1.2.840.10008.1.2.1", calling: str = "HOSTILE",
                 called: str = "STROKEGATE") -> bytes:
    """An A-ASSOCIATE-RQ proposing each SOP class (context IDs 1, 3, 5, ...) in one transfer syntax."""
    contexts = [build_context(uid, [transfer_syntax]) for uid in sop_classes]
    for number, context in enumerate(contexts):
        context.context_id = 2 * number + 1
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    primitive.presentation_context_definition_list = contexts
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    primitive.user_information = [maximum]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """One whole PDU (type, body); (0, b"") if the connection closed first."""
    header = _recv_exactly(sock, 6)
    if len(header) < 6:
        return 0, b""
    kind, length = _PDU.unpack(header)
    return kind, _recv_exactly(sock, length)


def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return data


def open_association(port: int, sop_classes: list[str], host: str = "127.0.0.1", source: str | None = None,
                     timeout: float = 10.0) -> socket.socket:
    """A connected socket with an accepted association (AssertionError otherwise)."""
    sock = socket.create_connection((host, port), timeout=timeout, source_address=(source, 0) if source else None)
    sock.sendall(associate_rq(sop_classes))
    kind, _ = read_pdu(sock)
    if kind != 0x02:
        sock.close()
        raise AssertionError(f"association not accepted: PDU type 0x{kind:02x}")
    return sock


def element(group: int, number: int, value: bytes) -> bytes:
    """An Implicit VR Little Endian element (command sets are always in it)."""
    return struct.pack("<HHI", group, number, len(value)) + value


def command_set(elements: list[bytes]) -> bytes:
    body = b"".join(elements)
    return element(0x0000, 0x0000, struct.pack("<I", len(body))) + body


def store_command(sop_class: bytes, sop_instance: bytes, message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set with the UIDs given as raw bytes (padded to even length)."""
    pad = lambda raw: raw + b"\0" * (len(raw) % 2)  # noqa: E731
    return command_set([
        element(0x0000, 0x0002, pad(sop_class)),
        element(0x0000, 0x0100, struct.pack("<H", 0x0001)),
        element(0x0000, 0x0110, struct.pack("<H", message_id)),
        element(0x0000, 0x0700, struct.pack("<H", 0)),
        element(0x0000, 0x0800, struct.pack("<H", 0x0000)),
        element(0x0000, 0x1000, pad(sop_instance)),
    ])


def echo_command(message_id: int = 1) -> bytes:
    return command_set([
        element(0x0000, 0x0002, b"1.2.840.10008.1.1\0"),
        element(0x0000, 0x0100, struct.pack("<H", 0x0030)),
        element(0x0000, 0x0110, struct.pack("<H", message_id)),
        element(0x0000, 0x0800, struct.pack("<H", 0x0101)),
    ])


def p_data(context_id: int, control: int, data: bytes) -> bytes:
    """One P-DATA-TF PDU holding one PDV (control: bit 0 command, bit 1 last fragment)."""
    item = struct.pack(">IBB", len(data) + 2, context_id, control) + data
    return _PDU.pack(0x04, len(item)) + item


def response_status(sock: socket.socket) -> int | None:
    """The Status (0000,0900) of the next command received, or None if the peer aborted or closed."""
    command = b""
    while True:
        kind, body = read_pdu(sock)
        if kind != 0x04:
            return None
        position = 0
        while position < len(body):
            length, _, control = struct.unpack_from(">IBB", body, position)
            command += body[position + 6 : position + 4 + length]
            position += 4 + length
            if control & 0x03 == 0x03:
                offset = 0
                while offset < len(command):
                    group, number, size = struct.unpack_from("<HHI", command, offset)
                    if (group, number) == (0x0000, 0x0900):
                        return struct.unpack_from("<H", command, offset + 8)[0]
                    offset += 8 + size
                return None


def dataset_of(path: Path) -> bytes:
    """The encoded dataset of a DICOM file written in Explicit VR Little Endian: what follows its file meta."""
    data = path.read_bytes()
    (group_length,) = struct.unpack_from("<I", data, 140)
    return data[144 + group_length :]


def store_raw(sock: socket.socket, sop_class: str, sop_instance: bytes, dataset: bytes, message_id: int = 1) -> int | None:
    """C-STORE a raw dataset on context 1 of an open association; the response status."""
    sock.sendall(p_data(1, 0x03, store_command(sop_class.encode(), sop_instance, message_id)))
    for start in range(0, len(dataset), 16000):
        chunk = dataset[start : start + 16000]
        sock.sendall(p_data(1, 0x02 if start + 16000 >= len(dataset) else 0x00, chunk))
    return response_status(sock)


def release(sock: socket.socket) -> None:
    sock.sendall(bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
    read_pdu(sock)
    sock.close()


def resident_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS)."""
    return _status_field(pid, "VmRSS") * 1024


def thread_count(pid: int) -> int:
    return _status_field(pid, "Threads")


def _status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {name} for process {pid}")


def study_copy(series: Path, folder: Path, name: str) -> list[Path]:
    """The files of ``series`` as a new study named ``name`` (UIDs derived from it), in ``folder``."""
    folder.mkdir(parents=True)
    study, new_series = generate_uid(entropy_srcs=[name, "study"]), generate_uid(entropy_srcs=[name, "series"])
    paths = []
    for index, path in enumerate(sorted(series.glob("*.dcm"))):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, new_series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[name, str(index)])
        ds.save_as(folder / path.name, enforce_file_format=True)
        paths.append(folder / path.name)
    return paths


def store_files(port: int, paths: list[Path], sop_class: str = "1.2.840.10008.5.1.4.1.1.4") -> list[int]:
    """C-STORE files as they are on disk over one pynetdicom association (pynetdicom sends a file's
    encoded dataset without decoding it); their statuses."""
    ae = AE(ae_title="PACS")
    ae.add_requested_context(sop_class, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="STROKEGATE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(path).Status) for path in paths]
    finally:
        assoc.release()
