"""Findings -> DICOM Segmentation (BINARY), one segment per labelled region.

The SEG is drawn on the source series' grid: frame ``k`` of every segment is slice ``k`` of the
source series, and empty frames are kept so that viewers align it slice for slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from service.findings import Findings, ModelInfo, SegmentKind
from service.results import identity
from service.results.coding import FINAL_IF_NOT_REPERFUSED, FINAL_IF_REPERFUSED, INFARCT, PENUMBRA, scheme_declarations

POSITION_TOLERANCE_MM = 0.05


@dataclass(frozen=True)
class SegmentType:
    """How one kind of segment is coded (SEG segment description and SR finding)."""

    category: Code
    property_type: Code
    rgb: tuple[int, int, int]


SEGMENT_TYPES: dict[SegmentKind, SegmentType] = {
    # Ischemic core: tissue already infarcted.
    SegmentKind.CORE: SegmentType(codes.SCT.MorphologicallyAbnormalStructure, INFARCT, (255, 0, 0)),
    # Penumbra: hypoperfused, still viable tissue; SNOMED CT has no concept for it (coding.py).
    SegmentKind.PENUMBRA: SegmentType(codes.SCT.MorphologicallyAbnormalStructure, PENUMBRA, (0, 255, 0)),
    # Seed 001's predicted final infarcts (learned, one per reperfusion scenario): local codes.
    SegmentKind.FINAL_IF_REPERFUSED: SegmentType(codes.SCT.MorphologicallyAbnormalStructure, FINAL_IF_REPERFUSED, (255, 200, 0)),
    SegmentKind.FINAL_IF_NOT_REPERFUSED: SegmentType(codes.SCT.MorphologicallyAbnormalStructure, FINAL_IF_NOT_REPERFUSED, (200, 0, 255)),
}
"""Coded property category and type per ``SegmentKind``: SNOMED CT morphologic abnormalities,
99SGATE where SNOMED CT has none."""
SHORT_NAMES = {SegmentKind.FINAL_IF_REPERFUSED: "final", SegmentKind.FINAL_IF_NOT_REPERFUSED: "final"}
"""How a kind reads in the series description and content label, where not by its value."""


def segment_masks(findings: Findings) -> np.ndarray:
    """Check the segments against the source images; return them stacked.

    Returns a uint8 array of 0/1, shape (slices, rows, columns, segments): frame ``k`` belongs
    to ``findings.source_images[k]``. Raises ValueError on any mismatch.
    """
    sources = findings.source_images
    if not sources:
        raise ValueError("findings.source_images is empty: a SEG needs the images it was drawn on")
    if not findings.segments:
        raise ValueError("findings.segments is empty: nothing to encode in a SEG")
    idents = [s.ident for s in findings.segments]
    if len(set(idents)) != len(idents):
        raise ValueError(f"segments must be unique, got {idents}")
    for ds in sources:
        if ds.StudyInstanceUID != findings.study_uid:
            raise ValueError(
                f"source image {ds.SOPInstanceUID} is in study {ds.StudyInstanceUID}, "
                f"not the findings' study {findings.study_uid}"
            )
    series = {ds.SeriesInstanceUID for ds in sources}
    if len(series) != 1:
        raise ValueError(f"source images must come from one series, got {len(series)} series")
    expected = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    if tuple(findings.geometry.shape) != expected:
        raise ValueError(
            f"geometry shape {tuple(findings.geometry.shape)} does not match the source images "
            f"(slices, rows, columns) = {expected}"
        )
    for k, ds in enumerate(sources):
        if (int(ds.Rows), int(ds.Columns)) != expected[1:]:
            raise ValueError(f"source image {k} is {ds.Rows}x{ds.Columns}, image 0 is {expected[1]}x{expected[2]}")
        if "ImagePositionPatient" in ds:
            offset = np.asarray(ds.ImagePositionPatient, dtype=float) - findings.geometry.slice_position(k)
            if np.abs(offset).max() > POSITION_TOLERANCE_MM:
                raise ValueError(
                    f"source image {k} lies {np.abs(offset).max():.3f} mm from slice {k} of the geometry: "
                    "source_images must be ordered like the mask slices"
                )
    stacked = []
    for segment in findings.segments:
        mask = np.asarray(segment.mask)
        if mask.shape != expected:
            raise ValueError(
                f"segment {segment.key!r} mask shape {mask.shape} does not match the "
                f"{len(sources)} source images of {expected[1]}x{expected[2]} (slices, rows, columns) = {expected}"
            )
        if mask.dtype != bool and not np.isin(mask, (0, 1)).all():
            raise ValueError(f"segment {segment.key!r} mask must be boolean or 0/1, got values outside 0/1")
        stacked.append(mask.astype(np.uint8))
    return np.stack(stacked, axis=-1)


def _algorithm(findings: Findings, model: ModelInfo | None) -> hd.AlgorithmIdentificationSequence:
    """StrokeGate's threshold method with its parameters, or the learned model by name and version."""
    if model is not None:
        return hd.AlgorithmIdentificationSequence(
            name=model.name, family=identity.algorithm_family(model), version=model.version,
            source=f"{identity.MANUFACTURER} {findings.algorithm.version}",
            parameters={"sha256": model.sha256, "backend": model.backend},
        )
    parameters = {name: f"{value:g}" for name, value in findings.parameters.items()}
    return hd.AlgorithmIdentificationSequence(
        name=findings.algorithm.name,
        family=identity.algorithm_family(None),
        version=findings.algorithm.version,
        source=identity.MANUFACTURER,
        parameters=parameters or None,
    )


def segment_descriptions(findings: Findings) -> list[hd.seg.SegmentDescription]:
    """One automatic segment description per ``findings.segments`` item, numbered from 1."""
    descriptions = []
    for number, segment in enumerate(findings.segments, start=1):
        kind = SEGMENT_TYPES[segment.key]
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=segment.label,
                segmented_property_category=kind.category,
                segmented_property_type=kind.property_type,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=_algorithm(findings, segment.model),
                tracking_uid=tracking_uid(findings, segment.ident),
                tracking_id=segment.label,
                anatomic_regions=[codes.SCT.Brain],
                display_color=hd.color.CIELabColor.from_rgb(*kind.rgb),
            )
        )
    return descriptions


def tracking_uid(findings: Findings, ident: str) -> str:
    """Tracking UID of segment ``ident`` (``Segment.ident``): the same in the SEG and in the SR
    that measures it."""
    return identity.result_uid(findings.study_uid, findings.version, f"tracking-{ident}")


def build_seg(findings: Findings) -> Dataset:
    """Encode ``findings.segments`` as a BINARY Segmentation of ``findings.source_images``.

    Each segment mask is boolean [slice, row, column] on the source grid; the SEG has
    slices x segments frames (empty ones included), content label "CORE_PENUMBRA" (the kinds joined),
    series number 901 and UIDs from
    ``result_uid(study, version, "seg" | "seg-series")``. Patient and study attributes are
    copied from the source images, whose headers alone (no pixel data) suffice.
    """
    pixel_array = segment_masks(findings)
    # a model's segments beside the threshold ones; both predicted final infarcts read as one "final"
    kinds = list(dict.fromkeys(SHORT_NAMES.get(s.key, s.key.value) for s in findings.segments))
    seg = hd.seg.Segmentation(
        source_images=findings.source_images,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(findings),
        series_instance_uid=identity.result_uid(findings.study_uid, findings.version, "seg-series"),
        series_number=identity.SEG_SERIES_NUMBER,
        sop_instance_uid=identity.result_uid(findings.study_uid, findings.version, "seg"),
        instance_number=1,
        manufacturer=identity.MANUFACTURER,
        manufacturer_model_name=identity.MANUFACTURER_MODEL_NAME,
        software_versions=identity.SOFTWARE_VERSIONS,
        device_serial_number=identity.DEVICE_SERIAL_NUMBER,
        content_description=identity.RESEARCH_USE_ONLY,
        content_label="_".join(kinds).upper()[:16],
        omit_empty_frames=False,
        series_description=f"StrokeGate {'+'.join(kinds)} SEG v{findings.version} - research use only",
        institution_name=identity.INSTITUTION_NAME,
        content_qualification=hd.ContentQualificationValues.RESEARCH,
    )
    local_schemes = scheme_declarations(SEGMENT_TYPES[s.key].property_type for s in findings.segments)
    if local_schemes:
        seg.CodingSchemeIdentificationSequence = local_schemes
    return seg
