"""What the tracker and the database take from a received instance's header, validated on the way in.

A header comes from a sender we do not control: every value the tracker and the database use is
checked for its type, value multiplicity and range before it becomes a row, so that one odd
instance fails alone (quarantined with the reason) instead of failing a database batch or a loop.
The limits are the DICOM ones for each value representation (PS3.5 6.2), which are also the widths
of the database columns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO

from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from service.errors import InputError
from service.ingest.spool import check_uid

_HEADER_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "PatientID",
    "IssuerOfPatientID",
    "AccessionNumber", "SeriesDescription", "NumberOfSeriesRelatedInstances", "NumberOfTemporalPositions",
    "ImagesInAcquisition", "ImagePositionPatient",
]
_TAGS = {keyword: tag_for_keyword(keyword) for keyword in _HEADER_TAGS}
_CODE_STRING = re.compile(r"^[A-Z0-9_ ]*$")
_CONTROL = re.compile(r"[\x00-\x1a\x1c-\x1f\x7f]")  # ESC (0x1b) may switch character sets (ISO 2022)
MAX_EXPECTED_INSTANCES = 2**31 - 1  # a database INTEGER


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
    patient_issuer: str | None = None  # IssuerOfPatientID: whose identifier PatientID is (joins the NIHSS)
    temporal_positions: int | None = None  # NumberOfTemporalPositions, where usable
    images_in_acquisition: int | None = None  # ImagesInAcquisition, where usable
    slice_position: str | None = None  # ImagePositionPatient to 0.01 mm ("x\\y\\z"), where usable


def parse_header(file_bytes: bytes | bytearray) -> Dataset:
    """The filing attributes (and file meta) of an encoded DICOM file; stops before the pixel data."""
    return dcmread(BytesIO(file_bytes), stop_before_pixels=True, specific_tags=_HEADER_TAGS)


def received_instance(
    header: Dataset, path: str, size_bytes: int, calling_ae: str | None, received_at: datetime | None = None
) -> ReceivedInstance:
    """The tracker's record of one spooled file, from its parsed header; InputError naming the
    attribute when a value is not what DICOM allows (the instance is then quarantined)."""
    meta = header.file_meta
    sop_uid = check_uid(str(meta.MediaStorageSOPInstanceUID), "SOP Instance UID")
    sop_class_uid = check_uid(str(meta.MediaStorageSOPClassUID), "SOP Class UID")
    for keyword, sent in (("SOPInstanceUID", sop_uid), ("SOPClassUID", sop_class_uid)):
        own = _text(header, keyword, 64)
        if own is not None and own != sent:
            raise InputError(f"the dataset's {keyword} {own[:64]!r} is not the one it was sent as ({sent})")
    study_uid = _text(header, "StudyInstanceUID", 64)
    series_uid = _text(header, "SeriesInstanceUID", 64)
    modality = _text(header, "Modality", 16)
    if modality is not None and not _CODE_STRING.match(modality):
        raise InputError(f"Modality {modality!r} is not a code string (A-Z, 0-9, space, underscore)")
    return ReceivedInstance(
        study_uid=check_uid(study_uid or "", "StudyInstanceUID"),
        series_uid=check_uid(series_uid or "", "SeriesInstanceUID"),
        sop_uid=sop_uid,
        sop_class_uid=sop_class_uid,
        transfer_syntax_uid=check_uid(str(meta.TransferSyntaxUID), "Transfer Syntax UID"),
        path=path,
        size_bytes=size_bytes,
        modality=modality,
        patient_id=_text(header, "PatientID", 64),
        patient_issuer=_text(header, "IssuerOfPatientID", 64),
        accession_number=_text(header, "AccessionNumber", 16),
        series_description=_text(header, "SeriesDescription", 64),
        expected_instances=_expected_instances(header),
        calling_ae=calling_ae or None,
        received_at=received_at,
        temporal_positions=_count_hint(header, "NumberOfTemporalPositions"),
        images_in_acquisition=_count_hint(header, "ImagesInAcquisition"),
        slice_position=_slice_position(header),
    )


def _value(header: Dataset, keyword: str) -> object:
    """The single value of ``keyword``, None when absent or empty; InputError for several values."""
    element = header.get(_TAGS[keyword])  # by tag: one lookup, no keyword-to-tag search
    if element is None:
        return None
    value = element.value
    if isinstance(value, MultiValue | list | tuple):
        if len(value) > 1:
            raise InputError(f"{keyword} has {len(value)} values; one expected")
        value = value[0] if value else None
    return None if value is None or value == "" else value


def _text(header: Dataset, keyword: str, max_length: int) -> str | None:
    """A text value of at most ``max_length`` characters without control characters, or None."""
    value = _value(header, keyword)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InputError(f"{keyword} is a {type(value).__name__}, not text")
    value = value.strip(" \0")
    if len(value) > max_length:
        raise InputError(f"{keyword} is {len(value)} characters long; at most {max_length} allowed")
    if _CONTROL.search(value):
        raise InputError(f"{keyword} holds control characters")
    return value or None


def _expected_instances(header: Dataset) -> int | None:
    """NumberOfSeriesRelatedInstances: one integer from 1 to 2**31 - 1, or None when absent."""
    value = _value(header, "NumberOfSeriesRelatedInstances")
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError) as error:
        raise InputError(f"NumberOfSeriesRelatedInstances {str(value)[:32]!r} is not an integer") from error
    if not 1 <= number <= MAX_EXPECTED_INSTANCES:
        raise InputError(f"NumberOfSeriesRelatedInstances {str(value)[:32]} is out of range (1 to {MAX_EXPECTED_INSTANCES})")
    return number


def _count_hint(header: Dataset, keyword: str) -> int | None:
    """A count that only lets a series complete before its idle time (NumberOfTemporalPositions,
    ImagesInAcquisition): one integer from 1 to 2**31 - 1, else None. An unusable value is not the
    instance's fault and costs it nothing: its series then completes on the idle time."""
    try:
        value = _value(header, keyword)
        number = int(value) if value is not None else None
    except (InputError, TypeError, ValueError, OverflowError):
        return None
    return number if number is not None and 1 <= number <= MAX_EXPECTED_INSTANCES else None


MAX_POSITION_MM = 1e6
"""Larger coordinates are no patient's: the position is then unusable for completion."""


def _slice_position(header: Dataset) -> str | None:
    """ImagePositionPatient rounded to 0.01 mm as "x\\y\\z" (instances at one place share it), or
    None when absent or not three finite numbers within MAX_POSITION_MM (the series then completes on
    the idle time; the analysis reports what is wrong with the geometry)."""
    element = header.get(_TAGS["ImagePositionPatient"])
    try:
        values = [float(v) for v in element.value] if element is not None and element.value else []
    except (TypeError, ValueError, OverflowError):
        return None
    if len(values) != 3 or not all(abs(v) <= MAX_POSITION_MM for v in values):  # NaN fails the comparison
        return None
    return "\\".join(f"{round(v, 2) + 0.0:.2f}" for v in values)  # + 0.0: no "-0.00"
