"""Who made a result object, and its deterministic UIDs.

Every SEG and SR StrokeGate emits carries the same equipment attributes and names the same
observer device. UIDs are name-based: a result of (study, version, kind) always gets the same
UID, so resending one result version is a duplicate at the PACS, never a second object.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

import service
from service.findings import ModelInfo

MANUFACTURER = "StrokeGate"
MANUFACTURER_MODEL_NAME = "StrokeGate acute stroke analysis"
SOFTWARE_VERSIONS = service.__version__
DEVICE_SERIAL_NUMBER = "SG-0001"
INSTITUTION_NAME = "StrokeGate"

RESEARCH_USE_ONLY = "RESEARCH USE ONLY - NOT FOR DIAGNOSIS"

SEG_SERIES_NUMBER = 901
SR_SERIES_NUMBER = 902

_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:strokegate:results")


def result_uid(study_uid: str, version: int, kind: str) -> str:
    """A deterministic UID, ``2.25.<int of uuid5(study_uid/version/kind)>`` (at most 44 chars).

    ``kind`` names the object, e.g. "seg", "seg-series", "sr", "sr-series", "tracking-core".
    """
    if not study_uid:
        raise ValueError("study_uid must be a non-empty UID")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"version must be a non-negative int, got {version!r}")
    if not kind:
        raise ValueError("kind must be a non-empty string")
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, f'{study_uid}/{version}/{kind}').int}"


DEVICE_OBSERVER_UID = f"2.25.{uuid.uuid5(_UID_NAMESPACE, 'device-observer').int}"
"""The one UID of StrokeGate as an SR observer device (TID 1004), the same in every report."""

def stamp_revision(dataset: Dataset, study_uid: str, version: int, kind: str, revision: int) -> None:
    """Make ``dataset`` (a copy of a result) revision ``revision`` of it: its own SOP Instance UID
    (``<kind>-r<revision>``), Instance Number ``revision``, content and creation time now."""
    now = datetime.now(timezone.utc)
    dataset.SOPInstanceUID = result_uid(study_uid, version, f"{kind}-r{revision}")
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.InstanceNumber = revision
    dataset.ContentDate, dataset.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    dataset.InstanceCreationDate, dataset.InstanceCreationTime = dataset.ContentDate, dataset.ContentTime


def algorithm_family(model: ModelInfo | None) -> Code:
    """CID 7162 algorithm family of what drew a result: a learned model is Artificial Intelligence
    (DCM 123110); the threshold methods on image values (ADC, Tmax, rCBF) are Histogram Analysis
    (DCM 123105), the nearest CID 7162 term."""
    return codes.DCM.HistogramAnalysis if model is None else codes.DCM.ArtificialIntelligence
