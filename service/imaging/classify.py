"""What a series is: DWI, ADC, DSC perfusion, CT perfusion, CT perfusion map, FLAIR or other.

Decided from the headers alone (no pixel data): Modality, ImageType, SeriesDescription and
ProtocolName, b-values, and how many images share each slice position (dynamic series repeat
every position once per time point). The text rules are regular expressions in a small
dataclass, so a site can adapt them to its protocol names without code changes.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from service.findings import SeriesKind
from service.imaging.volumes import b_value

@dataclass(frozen=True)
class ClassifyRules:
    """Case-insensitive regular expressions, searched in ImageType values (joined by spaces),
    SeriesDescription and ProtocolName; and the count that makes a series dynamic."""

    adc: str = r"\bADC\b|apparent[ _-]?diff|\bE?ADC[_ ]?MAP\b|\bdADC\b"
    dwi: str = r"\bDWI\b|\bDIFFUSION\b|\bTRACE(W)?\b|\bep2d_diff|\bDW[I_ ]|\bb[ =_-]?(500|800|1000|1500|2000)\b"
    pwi: str = r"\bPERFUSION\b|\bPWI\b|\bDSC\b|\bep2d_perf|\bPERF\b"
    ctp: str = r"\bPERFUSION\b|\bCTP\b|\bPERF\b|\b4D\b|\bDYNAMIC\b|\bVPCT\b"
    ct_map: str = r"\bCBF\b|\bCBV\b|\bMTT\b|\bTTP\b|\bTMAX\b|\bTTD\b|\bDELAY\b|\bPS\b"
    flair: str = r"FLAIR|DARK[ _-]?FLUID|\bT2[ _-]?IR\b|\bSPACE[ _-]?IR\b"
    min_dynamic_frames: int = 8
    """A series with at least this many images per slice position is dynamic (PWI, CTP)."""


DEFAULT_RULES = ClassifyRules()


def classify(headers: Sequence[Dataset], rules: ClassifyRules = DEFAULT_RULES) -> SeriesKind:
    """The kind of one series (a list of its instances' headers).

    MR: ADC (ImageType ADC or a matching description) before DWI (a b-value above 0, or the
    ImageType or description), then dynamic series (or perfusion-named multi-time-point ones)
    as "pwi", then FLAIR (description, or an inversion recovery with TI >= 1500 ms).
    CT: derived images naming a perfusion parameter are "ct-map", dynamic (or perfusion-named
    multi-time-point) series are "ctp". Anything else is "other".
    """
    if not headers:
        return SeriesKind.OTHER
    first = headers[0]
    modality = str(first.get("Modality", "")).upper()
    image_type = " ".join(str(v) for v in (first.get("ImageType") or [])).upper()
    text = " ".join(str(first.get(k) or "") for k in ("SeriesDescription", "ProtocolName"))
    frames = _frames_per_position(headers)
    if modality == "MR":
        return _classify_mr(headers, image_type, text, frames, rules)
    if modality == "CT":
        return _classify_ct(first, image_type, text, frames, rules)
    return SeriesKind.OTHER


def _matches(pattern: str, *texts: str) -> bool:
    return any(re.search(pattern, t, flags=re.IGNORECASE) for t in texts if t)


def _classify_mr(headers: Sequence[Dataset], image_type: str, text: str, frames: int, rules: ClassifyRules) -> SeriesKind:
    image_type_words = set(image_type.split())
    if "ADC" in image_type_words or _matches(rules.adc, text):
        return SeriesKind.ADC
    b_values = {b for b in (b_value(ds) for ds in headers) if b is not None}
    if any(b > 0 for b in b_values) or _matches(rules.dwi, image_type, text):
        return SeriesKind.DWI
    if frames >= rules.min_dynamic_frames or (frames > 1 and _matches(rules.pwi, image_type, text)):
        return SeriesKind.PWI
    first = headers[0]
    if _matches(rules.flair, text):
        return SeriesKind.FLAIR
    sequence = " ".join(str(v) for v in (first.get("ScanningSequence") or [])).upper()
    inversion = _number(first.get("InversionTime"))
    if "IR" in sequence.split() and inversion is not None and inversion >= 1500:
        return SeriesKind.FLAIR
    return SeriesKind.OTHER


def _classify_ct(first: Dataset, image_type: str, text: str, frames: int, rules: ClassifyRules) -> SeriesKind:
    derived = "DERIVED" in image_type.split()
    if derived and _matches(rules.ct_map, image_type, text):
        return SeriesKind.CT_MAP
    if frames >= rules.min_dynamic_frames:
        return SeriesKind.CTP
    if frames > 1 and _matches(rules.ctp, image_type, text):
        return SeriesKind.CTP
    return SeriesKind.OTHER


def _frames_per_position(headers: Sequence[Dataset]) -> int:
    """Most images sharing one slice position (1 for an ordinary stack).

    Uses NumberOfTemporalPositions when given; else counts ImagePositionPatient repeats.
    """
    declared = _number(headers[0].get("NumberOfTemporalPositions"))
    if declared is not None and declared >= 1:
        return int(declared)
    positions = Counter()
    for ds in headers:
        position = ds.get("ImagePositionPatient")
        if position is None:
            continue
        positions[tuple(np.round(np.asarray(position, dtype=float), 2))] += 1
    return max(positions.values(), default=1)


def _number(value: object) -> float | None:
    """A header value as one finite number, or None when it is absent or not a single number
    (a received header may hold anything)."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None
