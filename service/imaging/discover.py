"""Finding DICOM files in a folder tree and grouping them by study."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

log = logging.getLogger(__name__)


def studies_in(folder: Path) -> tuple[dict[str, list[Path]], list[Path]]:
    """DICOM files under ``folder`` (any depth) by StudyInstanceUID, and the files that are not DICOM."""
    studies: dict[str, list[Path]] = defaultdict(list)
    skipped: list[Path] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            header = dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
            study_uid = str(header.StudyInstanceUID)
        except (InvalidDicomError, AttributeError, OSError, ValueError, EOFError) as error:
            log.debug("not a DICOM instance, skipped: %s (%s)", path, error)
            skipped.append(path)
            continue
        studies[study_uid].append(path)
    return dict(studies), skipped
