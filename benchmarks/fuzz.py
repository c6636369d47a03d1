"""Coverage-guided fuzzing (atheris, libFuzzer for Python) of everything that parses received bytes.

Harnesses, each with its contract (anything else is a finding, reported as an uncaught exception):

  pdu      bytes from a peer, read by the upper layer: the A-ASSOCIATE-RQ, its negotiation, then
           DIMSE messages reassembled from P-DATA and each answered. Only ProtocolError and PeerGone.
  dimse    a command set: decoded (or InputError), and then a response and a request always encode.
  journal  a journal segment file, raw or made of records with valid CRCs around fuzzed headers and
           payloads: replay never raises, and yields only entries whose fields are text.
  header   a received dataset's header: parsed and validated, or refused; what is accepted fits the
           database columns and is recorded by the tracker's insert (SQLite) without error.
  filing   a journalled instance filed by the receiver: never an exception (bar OSError), and it is
           either handed to the recorder or quarantined with its reason, exactly one of the two.
  hl7      bytes from an HL7 v2 sender over MLLP, framed by the listener and each message answered:
           never an exception; every answer is one MLLP frame holding an HL7 ACK whose MSA-1 is one
           of AA, AE, AR (or CA, CE, CR); what is stored is a NIHSS of 0-42 for a named patient.

Seeds are made at run time (pynetdicom's association request, our command sets, small DICOM
datasets in Implicit, Explicit and Deflated VR Little Endian); libFuzzer mutates from there. Each
harness runs in its own process (libFuzzer exits when done):

    .venv/bin/python benchmarks/fuzz.py [--runs 10000] [--harness pdu ...] [--seed 1]

It prints per harness the inputs run, the time, and the uncaught exceptions (0, or the process
failed and its crash input is kept under --work). CI runs a short pass as a test
(tests/integration/test_fuzz.py).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HARNESSES = ("pdu", "dimse", "journal", "header", "filing", "hl7")
MAX_LEN = {"pdu": 65536, "dimse": 4096, "journal": 65536, "header": 16384, "filing": 16384, "hl7": 8192}
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
_INSTRUMENTED_LIBRARY = (  # coverage feedback from the library code received bytes reach, function by
    "pydicom.filereader", "pydicom.values", "pydicom.valuerep", "pydicom.charset",  # function (instrumenting
    "pynetdicom.pdu", "pynetdicom.pdu_items", "pynetdicom.utils", "pynetdicom.presentation",  # whole packages,
)  # dictionaries and codecs included, takes minutes to start)
SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99")


# --- seeds ----------------------------------------------------------------------------------


def seed_datasets() -> list[tuple[str, bytes]]:
    """Small CT and MR datasets with every attribute the receive path reads, each encoded in
    Explicit, Implicit and Deflated Explicit VR Little Endian: (transfer syntax, dataset bytes)."""
    from io import BytesIO

    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filewriter import dcmwrite

    made = []
    for index, (sop_class, modality) in enumerate(((CT_IMAGE, "CT"), (MR_IMAGE, "MR"))):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, f"1.2.826.0.1.3680043.8.498.{index + 1}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.100", f"1.2.826.0.1.3680043.8.498.10{index}"
        ds.Modality, ds.PatientID, ds.AccessionNumber = modality, "SGPH00000002", "ACC42"
        ds.SeriesDescription, ds.NumberOfSeriesRelatedInstances = "perfusion", 40
        ds.Rows = ds.Columns = 4
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, index], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.5, 0.5]
        ds.PixelData = np.arange(16, dtype=np.uint16).tobytes()
        for syntax in SYNTAXES:
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = syntax
            ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop_class, ds.SOPInstanceUID
            out = BytesIO()
            dcmwrite(out, ds, enforce_file_format=True)
            data = out.getvalue()
            group_length = int.from_bytes(data[140:144], "little")
            made.append((syntax, data[144 + group_length :]))
    return made


def seed_inputs(harness: str) -> list[bytes]:
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    from service.dicomnet.dimse import encode_store_request

    datasets = seed_datasets()
    command = encode_store_request(7, CT_IMAGE, "1.2.826.0.1.3680043.8.498.1")
    if harness == "dimse":
        return [command, encode_store_request(1, MR_IMAGE, "1.2.3.4.5")]
    if harness in ("header", "filing"):
        return [bytes([SYNTAXES.index(syntax)]) + data for syntax, data in datasets]
    if harness == "journal":
        return [_journal_segment(datasets) + bytes([mode]) for mode in range(4)]  # the provider takes ints from the end
    if harness == "hl7":
        return [bytes([chunk]) + b"\x0b" + message + b"\x1c\r" for chunk in (0, 5) for message in _hl7_messages()]
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = "PACS", "STROKEGATE"
    contexts = [build_context(CT_IMAGE, list(SYNTAXES[:2])), build_context(MR_IMAGE, [SYNTAXES[0]])]
    for number, context in enumerate(contexts):
        context.context_id = 2 * number + 1
    primitive.presentation_context_definition_list = contexts
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    primitive.user_information = [maximum]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    dataset = datasets[0][1]
    stream = (pdu.encode() + _p_data(1, 0x03, command) + _p_data(1, 0x00, dataset[:100])
              + _p_data(1, 0x02, dataset[100:]) + bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
    return [bytes([chunk]) + stream for chunk in (0, 7, 255)]


def _hl7_messages() -> list[bytes]:
    """An ORU^R01 with a NIHSS total, one with the panel code and enhanced acknowledgement, a bad one."""
    header = "MSH|^~\\&|EHR|HOSP|STROKEGATE|HOSP|20261204101500||ORU^R01|{id}|P|2.5.1{tail}"
    patient = "PID|1||123456^^^HOSP^MR||DOE^JANE"
    observation = "OBX|1|NM|{code}^NIH Stroke Scale^LN||{value}|{{score}}|||||F|||20261204101000"
    return [
        "\r".join([header.format(id="M1", tail=""), patient, "OBR|1", observation.format(code="72089-6", value=14)]).encode(),
        "\r".join([header.format(id="M2", tail="|||AL|NE"), patient, observation.format(code="70182-1", value=22)]).encode(),
        "\r".join([header.format(id="M3", tail=""), observation.format(code="72089-6", value="x")]).encode(),
    ]


def _p_data(context_id: int, control: int, data: bytes) -> bytes:
    item = (len(data) + 2).to_bytes(4, "big") + bytes([context_id, control]) + data
    return bytes([0x04, 0]) + len(item).to_bytes(4, "big") + item


def _journal_segment(datasets: list[tuple[str, bytes]]) -> bytes:
    import json

    return b"".join(_journal_record(1, json.dumps({
        "sop_class_uid": CT_IMAGE, "sop_instance_uid": f"1.2.3.{n}", "transfer_syntax_uid": syntax,
        "calling_ae": "PACS"}).encode(), data) for n, (syntax, data) in enumerate(datasets[:2]))


def _journal_record(segment: int, header: bytes, payload: bytes) -> bytes:
    import struct
    import zlib

    numbers = struct.pack("<QIQ", segment, len(header), len(payload))
    crc = zlib.crc32(numbers, zlib.crc32(payload, zlib.crc32(header)))
    return struct.pack("<4sQIQI", b"SGJ1", segment, len(header), len(payload), crc) + header + payload


# --- harnesses ------------------------------------------------------------------------------


class _FakeSocket:
    """Serves the fuzzed bytes in chunks of a fuzzed size; keeps what is sent (``sent``)."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self.data, self.position, self.chunk = data, 0, chunk
        self.sent: list[bytes] = []

    def settimeout(self, _: float | None) -> None:
        pass

    def recv_into(self, view: memoryview) -> int:
        n = min(len(view), len(self.data) - self.position, self.chunk)
        view[:n] = self.data[self.position : self.position + n]
        self.position += n
        return n

    def recv(self, size: int) -> bytes:
        view = memoryview(bytearray(min(size, self.chunk)))
        return bytes(view[: self.recv_into(view)])

    def sendall(self, data: bytes) -> None:
        self.sent.append(bytes(data))


def make_harness(name: str, work: Path):  # noqa: ANN201 - returns the TestOneInput callable
    import atheris

    import importlib
    import types

    for module_name in _INSTRUMENTED_LIBRARY:
        module = importlib.import_module(module_name)
        for value in list(vars(module).values()):
            functions = [value] if isinstance(value, types.FunctionType) else (
                [v for v in vars(value).values() if isinstance(v, types.FunctionType)] if isinstance(value, type) else [])
            for function in functions:
                if function.__module__ == module_name:
                    atheris.instrument_func(function)
    with atheris.instrument_imports(include=["service"]):
        from pynetdicom.presentation import build_context

        from service.dicomnet.dimse import decode_command, encode_response, encode_store_request
        from service.dicomnet.upper_layer import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION, Connection, PeerGone, ProtocolError
        from service.errors import InputError
        from service.ingest.header import parse_header, received_instance
        from service.ingest.journal import Journal, JournalEntry
        from service.ingest.scp import Receiver, ReceiverConfig, STORAGE_CLASSES, TRANSFER_SYNTAXES, file_meta
        from service.ingest.spool import Spool
        from service.ingest.tracker import record_instances

    if name == "pdu":
        supported = [build_context(c, list(TRANSFER_SYNTAXES)) for c in STORAGE_CLASSES]
        implementation = (IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION)

        def pdu(data: bytes) -> None:
            if not data:
                return
            connection = Connection(_FakeSocket(data[1:], 1 + 61 * data[0]), 5.0, 16384, 1 << 20)
            try:
                request = connection.read_association_request(5.0)
                contexts = connection.accept(request, supported, implementation) or {1: supported[0]}
                for _ in range(64):
                    message = connection.read_message(contexts)
                    if message is None:
                        return
                    encode_response(message.command, 0x0000)
            except (ProtocolError, PeerGone):
                pass

        return pdu

    if name == "dimse":
        def dimse(data: bytes) -> None:
            try:
                command = decode_command(data)
            except InputError:
                return
            encode_response(command, 0xC210, "fuzzed")
            encode_store_request(command.message_id, command.sop_class_uid, command.sop_instance_uid)

        return dimse

    if name == "journal":
        import json

        folder = work / "journal"
        folder.mkdir(parents=True, exist_ok=True)
        segment = folder / f"{1:016d}.wal"

        names = ("sop_class_uid", "sop_instance_uid", "transfer_syntax_uid", "calling_ae", "extra")

        def fuzzed_header(provider: atheris.FuzzedDataProvider) -> bytes:
            """A JSON header whose fields are present or not, of fuzzed types and values."""
            fields = {}
            for name in names:
                kind = provider.ConsumeIntInRange(0, 5)
                if kind == 0 or (name == "extra" and kind < 5):
                    continue
                fields[name] = (provider.ConsumeUnicode(40), provider.ConsumeInt(8), None, [provider.ConsumeUnicode(8)],
                                provider.ConsumeFloat())[kind - 1]
            return json.dumps(fields).encode()

        def journal(data: bytes) -> None:
            provider = atheris.FuzzedDataProvider(data)
            mode = provider.ConsumeIntInRange(0, 3)
            if mode == 0:
                content = provider.ConsumeBytes(provider.remaining_bytes())
            else:  # records with valid CRCs: what is inside them must still be checked
                content = b""
                while provider.remaining_bytes():
                    header = (fuzzed_header(provider) if mode == 3
                              else provider.ConsumeBytes(provider.ConsumeIntInRange(0, 400)))
                    payload = provider.ConsumeBytes(provider.ConsumeIntInRange(0, 2000))
                    content += _journal_record(provider.ConsumeIntInRange(1, 2) if mode == 2 else 1, header, payload)
            segment.write_bytes(content)
            for _, entry in Journal(folder).replay():
                fields = (entry.sop_class_uid, entry.sop_instance_uid, entry.transfer_syntax_uid, entry.calling_ae)
                if not all(isinstance(f, str) for f in fields) or not isinstance(entry.dataset, bytes):
                    raise AssertionError(f"journal replay yielded a malformed entry: {entry!r:.200}")

        return journal

    if name == "header":
        from sqlalchemy import create_engine
        from sqlalchemy.orm import Session

        from service.store.models import Base, Instance, Series, Study

        engine = create_engine("sqlite://")
        Base.metadata.create_all(engine)
        limits = {}
        for table in (Study.__table__, Series.__table__, Instance.__table__):
            for column in table.columns:
                length = getattr(column.type, "length", None)
                if length:
                    limits[(table.name, column.name)] = length

        def header(data: bytes) -> None:
            if not data:
                return
            entry = JournalEntry(CT_IMAGE, "1.2.826.0.1.3680043.8.498.1", SYNTAXES[data[0] % 3], "FUZZ", data[1:])
            try:
                item = received_instance(parse_header(file_meta(entry) + entry.dataset), "a/b/c.dcm", len(data), "FUZZ")
            except InputError:
                return
            except Exception:  # noqa: BLE001 - a dataset pydicom cannot read: the filer quarantines it
                return
            for table, column, value in (
                ("studies", "patient_id", item.patient_id), ("studies", "accession_number", item.accession_number),
                ("series", "modality", item.modality), ("series", "description", item.series_description),
                ("studies", "study_uid", item.study_uid), ("series", "series_uid", item.series_uid),
            ):
                if value is not None and (len(value) > limits[(table, column)] or "\0" in value):
                    raise AssertionError(f"{column} {value!r:.100} does not fit its column")
            with Session(engine) as session:
                record_instances(session, [item], __import__("datetime").datetime(2026, 1, 1))
                session.rollback()

        return header

    if name == "filing":
        config = ReceiverConfig(ae_title="FUZZ", host="127.0.0.1", port=0, max_pdu=16384, max_associations=1,
                                allowed_calling_aets=(), allowed_hosts=(), min_free_bytes=0, network_timeout_s=5)
        recorded: list = []
        spool_root = work / "spool"
        receiver = Receiver(config, Spool(spool_root), recorded.append)
        quarantine = spool_root / "quarantine"
        counter = [0]

        def filing(data: bytes) -> None:
            if not data:
                return
            counter[0] += 1
            if counter[0] % 500 == 0:  # keep the spool small
                for child in spool_root.iterdir():
                    if child.name != "journal":
                        shutil.rmtree(child, ignore_errors=True)
            reason = quarantine / "1.2.826.0.1.3680043.8.498.1.reason"
            reason.unlink(missing_ok=True)
            before = len(recorded)
            entry = JournalEntry(CT_IMAGE, "1.2.826.0.1.3680043.8.498.1", SYNTAXES[data[0] % 3], "FUZZ", data[1:])
            receiver._file(entry, replace=True)
            outcomes = (len(recorded) - before) + int(reason.exists())
            if outcomes != 1:
                raise AssertionError(f"an instance was recorded and quarantined {outcomes} times")
            del recorded[:]

        return filing

    if name == "hl7":
        with atheris.instrument_imports(include=["service", "hl7"]):
            import hl7

            from service.clinical.hl7 import END, START, Hl7Listener, handle_message

        listener = Hl7Listener("127.0.0.1", 0, lambda report: True, max_message_bytes=4096)
        listener._socket.close()  # only its framing and answering are fuzzed, never its accept loop
        codes = {"AA", "AE", "AR", "CA", "CE", "CR"}

        def store(report) -> bool:  # noqa: ANN001 - a NihssReport
            if not (0 <= report.value <= 42 and report.patient_id.strip()):
                raise AssertionError(f"stored a NIHSS the edge should have refused: {report}")
            return True

        def hl7_stream(data: bytes) -> None:
            if not data:
                return
            connection = _FakeSocket(data[1:], 1 + 37 * data[0])
            for frame in listener._frames(connection, ("127.0.0.1", 0)):  # as _connection, without its catch-all
                answer = handle_message(frame, store)
                if answer is not None:
                    connection.sendall(START + answer.encode("utf-8") + END)
            for frame in connection.sent:
                if not (frame.startswith(START) and frame.endswith(END)):
                    raise AssertionError(f"an answer is not one MLLP frame: {frame[:80]!r}")
                ack = hl7.parse(frame[1:-2].decode("utf-8").replace("\r\n", "\r"))
                if str(ack.segment("MSA")[1]) not in codes:
                    raise AssertionError(f"an answer's MSA-1 is not an acknowledgement code: {frame[:200]!r}")

        return hl7_stream

    raise ValueError(f"no harness {name!r}")


def run_one(name: str, runs: int, seed: int, work: Path) -> None:
    """In this process: fuzz one harness for ``runs`` inputs (libFuzzer exits at the end)."""
    import atheris

    import logging

    logging.disable(logging.CRITICAL)  # quarantines log a warning per input
    import warnings

    warnings.simplefilter("ignore")
    harness = make_harness(name, work / f"scratch-{name}")  # first: its imports are instrumented
    corpus = work / f"corpus-{name}"
    corpus.mkdir(parents=True, exist_ok=True)
    for index, data in enumerate(seed_inputs(name)):
        (corpus / f"seed-{index}").write_bytes(data)
    argv = [sys.argv[0], f"-runs={runs}", f"-seed={seed}", f"-max_len={MAX_LEN[name]}", "-timeout=20",
            "-rss_limit_mb=4096", f"-artifact_prefix={work}/crash-{name}-", str(corpus)]
    atheris.Setup(argv, harness)
    atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10_000, help="inputs per harness")
    parser.add_argument("--harness", nargs="*", choices=HARNESSES, default=list(HARNESSES))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--work", type=Path, help="corpora and crash inputs (default: a temporary folder)")
    parser.add_argument("--jobs", type=int, default=1, help="harnesses run at once")
    parser.add_argument("--run-one", choices=HARNESSES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="strokegate-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.run_one:
        run_one(args.run_one, args.runs, args.seed, work)
        return 0

    print(f"fuzzing {', '.join(args.harness)}: {args.runs} inputs each (atheris), work folder {work}")
    pending = list(args.harness)
    running: dict[str, tuple[subprocess.Popen, float, Path]] = {}
    results = {}
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            log = work / f"{name}.log"
            with open(log, "wb") as output:
                process = subprocess.Popen(
                    [sys.executable, __file__, "--run-one", name, "--runs", str(args.runs), "--seed", str(args.seed),
                     "--work", str(work)], stdout=output, stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONHASHSEED": "0"},
                )
            running[name] = (process, time.perf_counter(), log)
        for name, (process, started, log) in list(running.items()):
            if process.poll() is None:
                continue
            del running[name]
            text = log.read_text(errors="replace")
            done = re.search(r"Done (\d+) runs in (\d+) second", text)
            crashed = process.returncode != 0 or "Uncaught Python exception" in text
            results[name] = (int(done.group(1)) if done else 0, time.perf_counter() - started, crashed, text)
        time.sleep(0.05)

    print(f"{'harness':8}  {'inputs':>7}  {'seconds':>7}  uncaught exceptions")
    failed = False
    for name in args.harness:
        inputs, seconds, crashed, text = results[name]
        print(f"{name:8}  {inputs:7d}  {seconds:7.1f}  {1 if crashed else 0}")
        if crashed or inputs < args.runs:
            failed = True
            tail = "\n".join(text.splitlines()[-40:])
            print(f"--- {name}: {'uncaught exception' if crashed else f'only {inputs} inputs'} (log {work / (name + '.log')}):\n{tail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
