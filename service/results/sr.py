"""Findings -> TID 1500 Measurement Report in a Comprehensive 3D SR.

The report holds one volumetric measurement group (TID 1411) per SEG segment, with the segment's
volume in ml and a reference to the segment, and one study-level group (TID 1501) for every other
measurement (hypoperfused and mismatch volumes in ml, mismatch ratio, hypoperfusion intensity
ratio, with UCUM units), the DEFUSE 3 target-mismatch verdict as a qualitative evaluation (SCT
Yes / No) and each QC flag as a TEXT item (concept "Quality control flag", the flag's words as
its value). Concepts that DICOM has no code for use the local coding scheme ``99SGATE``,
declared in the Coding Scheme Identification Sequence.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
import math
from datetime import timezone

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import SegmentationStorage

from service.findings import NIHSS_NOT_AVAILABLE, Findings, FusionOutcomeRecord, Measurement, ModelInfo, NihssUsed, OutcomeRecord
from service.results import identity
from service.results.coding import (
    CLINICAL_INPUT, NIHSS_ASSESSED, NIHSS_SOURCE, NIHSS_TOTAL, OUTCOME_INPUTS, POOR_OUTCOME_90D, QC_FLAG, TARGET_MISMATCH,
    local_code, scheme_declarations,
)
from service.results.seg import SEGMENT_TYPES, tracking_uid

VERDICT_MEASUREMENT = Measurement.TARGET_MISMATCH
"""The measurement (1 = met, 0 = not) reported as the TARGET_MISMATCH qualitative evaluation."""

MILLILITER = Code("ml", "UCUM", "milliliter")
SCORE = Code("{score}", "UCUM", "score")
PROBABILITY = Code("{probability}", "UCUM", "probability")
CLINICAL_GROUP = "Clinical input (NIHSS)"
"""Tracking identifier of the measurement group that names the NIHSS used (found again by
``revise_sr``)."""
UCUM_UNITS: dict[str, Code] = {
    "ml": MILLILITER,
    "mm": codes.UCUM.Millimeter,
    "s": codes.UCUM.Second,
    "%": Code("%", "UCUM", "percent"),
    "1": codes.UCUM.NoUnits,
    "ratio": codes.UCUM.Ratio,
    "mL/100 g/min": codes.UCUM.MilliliterPer100GramPerMinute,
    "mL/100 g": Code("ml/[100]g", "UCUM", "milliliter per 100 gram"),
}
"""UCUM code of each unit string a ``Measurement`` may have."""

PROCEDURES: dict[str, Code] = {
    # CID 100 holds LN 39142-5; StrokeGate's CT analyses all read CT perfusion of the head.
    "CT": codes.LN.CTPerfusionHeadWithContrastIV,
    # CID 100 is extensible and has no brain MRI entry; LN 24590-2 "MR Brain" names the exam.
    "MR": codes.LN.BrainMRI,
}
"""Procedure reported (TID 1500 row 3), chosen by the Modality of the source images."""


def _volume_measurement_names(findings: Findings) -> dict[Measurement, float]:
    """Measurements that repeat the volume of a segment the verdict uses, mapped to that volume (ml)."""
    return {Measurement(f"{s.key}_volume_ml"): float(s.volume_ml) for s in findings.segments if findings.uses(s)}


def _check(findings: Findings, seg: Dataset) -> None:
    if seg.get("SOPClassUID") != SegmentationStorage:
        raise ValueError(f"seg must be a Segmentation Storage instance, got SOP class {seg.get('SOPClassUID')}")
    if seg.StudyInstanceUID != findings.study_uid:
        raise ValueError(f"seg is in study {seg.StudyInstanceUID}, not the findings' study {findings.study_uid}")
    labels = [item.SegmentLabel for item in seg.SegmentSequence]
    expected = [s.label for s in findings.segments]
    if labels != expected:
        raise ValueError(f"seg segments {labels} do not match the findings' segments {expected}")
    if findings.source_images and findings.source_images[0].get("Modality") not in PROCEDURES:
        raise ValueError(
            f"no procedure code for source modality {findings.source_images[0].get('Modality')!r}; "
            f"known: {sorted(PROCEDURES)}"
        )
    for flag in findings.qc_flags:
        if not flag.strip():
            raise ValueError(f"QC flag {flag!r} must not be empty")
    verdict = findings.measurements.get(VERDICT_MEASUREMENT)
    if verdict is not None and verdict not in (0.0, 1.0):
        raise ValueError(f"measurement {VERDICT_MEASUREMENT!r} must be 0 or 1, got {verdict}")
    volumes = _volume_measurement_names(findings)
    for segment in findings.segments:
        if not math.isfinite(segment.volume_ml) or segment.volume_ml < 0:
            raise ValueError(f"segment {segment.key!r} volume must be a finite, non-negative ml value")
    for name, value in findings.measurements.items():
        if not math.isfinite(value):
            raise ValueError(f"measurement {name!r} is {value}: only finite values can be reported")
        if name in volumes:
            if not math.isclose(value, volumes[name], rel_tol=1e-6, abs_tol=1e-3):
                raise ValueError(f"measurement {name!r} = {value} differs from the segment volume {volumes[name]} ml")
            continue
        unit = Measurement(name).unit
        if unit not in UCUM_UNITS:
            raise ValueError(f"measurement {name!r} unit {unit!r} has no UCUM code; known: {sorted(UCUM_UNITS)}")


def _algorithm(findings: Findings, model: ModelInfo | None = None) -> hd.sr.AlgorithmIdentification:
    """StrokeGate's threshold method with its parameters, or the learned model by name and version."""
    if model is not None:
        return model_algorithm(model)
    parameters = [f"{name}={value:g}" for name, value in findings.parameters.items()]
    return hd.sr.AlgorithmIdentification(
        name=findings.algorithm.name,
        version=findings.algorithm.version,
        parameters=parameters or None,
        family=identity.algorithm_family(None),
        manufacturer=identity.MANUFACTURER,
    )


def model_algorithm(model: ModelInfo) -> hd.sr.AlgorithmIdentification:
    """A learned model's identification: name, version, its file's sha256 and what ran it."""
    return hd.sr.AlgorithmIdentification(
        name=model.name, version=model.version, parameters=[f"sha256={model.sha256[:32]}...", f"backend={model.backend}"[:64]],
        family=identity.algorithm_family(model), manufacturer=identity.MANUFACTURER,
    )


def _segment_groups(findings: Findings, seg: Dataset) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    # ReferencedSegment.from_segmentation (highdicom 0.28) misses the Segment Identification
    # Sequence when it sits in the shared functional groups, as it does for one segment.
    source_series = hd.sr.SourceSeriesForSegmentation(findings.source_images[0].SeriesInstanceUID)
    groups = []
    for number, segment in enumerate(findings.segments, start=1):
        kind = SEGMENT_TYPES[segment.key]
        volume = hd.sr.Measurement(
            name=codes.SCT.Volume,
            value=float(segment.volume_ml),
            unit=MILLILITER,
        )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=tracking_uid(findings, segment.ident), identifier=segment.label
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=seg.SOPClassUID,
                    sop_instance_uid=seg.SOPInstanceUID,
                    segment_number=number,
                    source_series=source_series,
                ),
                finding_type=kind.property_type,
                finding_category=kind.category,
                algorithm_id=_algorithm(findings, segment.model),
                finding_sites=[hd.sr.FindingSite(codes.SCT.Brain)],
                measurements=[volume],
            )
        )
    return groups


def _study_group(findings: Findings) -> hd.sr.MeasurementsAndQualitativeEvaluations | None:
    volumes = _volume_measurement_names(findings)
    measurements = [
        hd.sr.Measurement(name=local_code(name), value=float(value), unit=UCUM_UNITS[Measurement(name).unit])
        for name, value in findings.measurements.items()
        if name not in volumes and name != VERDICT_MEASUREMENT
    ]
    evaluations = []
    if VERDICT_MEASUREMENT in findings.measurements:
        met = findings.measurements[VERDICT_MEASUREMENT] == 1.0
        evaluations.append(hd.sr.QualitativeEvaluation(TARGET_MISMATCH, codes.SCT.Yes if met else codes.SCT.No))
    if not measurements and not evaluations and not findings.qc_flags:
        return None
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(findings, "study"), identifier=f"{findings.analysis} study measurements"
        ),
        algorithm_id=_algorithm(findings),
        measurements=measurements or None,
        qualitative_evaluations=evaluations or None,
    )
    # Flags are sentences (with numbers), not coded concepts: TEXT items of the group's container.
    for flag in findings.qc_flags:
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(name=QC_FLAG, value=flag, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        )
    return group


def build_sr(findings: Findings, seg: Dataset) -> Dataset:
    """Encode ``findings`` as a TID 1500 Measurement Report referencing the segments of ``seg``.

    ``seg`` is the Segmentation ``build_seg(findings)`` made. Segment volumes are reported once,
    in ml, in their segment's group (a ``<key>_volume_ml`` measurement equal to a segment volume
    is not repeated); other measurements use their ``Measurement.unit``. Series number
    902, UIDs from ``result_uid(study, version, "sr" | "sr-series")``; patient and study
    attributes come from the source images.
    """
    if not findings.source_images:
        raise ValueError("findings.source_images is empty: the report needs the images it measures")
    _check(findings, seg)
    groups: list = _segment_groups(findings, seg)
    study_group = _study_group(findings)
    used = [*(SEGMENT_TYPES[s.key].property_type for s in findings.segments), CLINICAL_INPUT]
    if study_group is not None:
        groups.append(study_group)
        used += [QC_FLAG, TARGET_MISMATCH, *(local_code(name) for name in findings.measurements)]
    groups.append(clinical_group(findings.study_uid, findings.version, findings.nihss, findings.outcomes))
    local_schemes = scheme_declarations(used)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=identity.DEVICE_OBSERVER_UID,
        name=identity.MANUFACTURER_MODEL_NAME,
        manufacturer_name=identity.MANUFACTURER,
        model_name=identity.MANUFACTURER_MODEL_NAME,
        serial_number=identity.DEVICE_SERIAL_NUMBER,
    )
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=PROCEDURES[findings.source_images[0].Modality],
        imaging_measurements=groups,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[*findings.source_images, seg],
        content=report[0],
        series_instance_uid=identity.result_uid(findings.study_uid, findings.version, "sr-series"),
        series_number=identity.SR_SERIES_NUMBER,
        sop_instance_uid=identity.result_uid(findings.study_uid, findings.version, "sr"),
        instance_number=1,
        manufacturer=identity.MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=identity.INSTITUTION_NAME,
        series_description=f"StrokeGate report v{findings.version} - research use only",
        manufacturer_model_name=identity.MANUFACTURER_MODEL_NAME,
        software_versions=identity.SOFTWARE_VERSIONS,
        device_serial_number=identity.DEVICE_SERIAL_NUMBER,
        coding_schemes=local_schemes,
    )


Outcome = OutcomeRecord | FusionOutcomeRecord
"""A 90-day outcome of one model."""


def clinical_group(study_uid: str, version: int, nihss: NihssUsed | None,
                   outcomes: Sequence[Outcome] = ()) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The measurement group naming the clinical input: the NIHSS as a NUM (LOINC 72089-6) with its
    source and assessment time, or the TEXT "NIHSS not available: imaging only"; each case also
    as one readable TEXT line ("Clinical input used"). Per model in ``outcomes``, the NUM "Probability
    of poor outcome (mRS 3-6) at 90 days" (0-1, that model's identification on it) and a TEXT naming
    the inputs it used; they depend on the NIHSS, so they are revised with it."""
    if any(outcome.nihss != nihss for outcome in outcomes):
        raise ValueError("an outcome used another NIHSS than the report names")
    if len({outcome.model.name for outcome in outcomes}) != len(outcomes):
        raise ValueError("two outcomes of the same model")
    measurements = [hd.sr.Measurement(name=NIHSS_TOTAL, value=float(nihss.value), unit=SCORE)] if nihss else []
    for outcome in outcomes:
        if not 0.0 <= outcome.probability <= 1.0:
            raise ValueError(f"outcome probability {outcome.probability} is not in 0-1")
        measurements.append(hd.sr.Measurement(name=POOR_OUTCOME_90D, value=round(float(outcome.probability), 4),
                                              unit=PROBABILITY, algorithm_id=model_algorithm(outcome.model)))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=identity.result_uid(study_uid, version, "tracking-clinical-input"), identifier=CLINICAL_GROUP
        ),
        measurements=measurements or None,
    )
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    items = group[0].ContentSequence
    items.append(hd.sr.TextContentItem(
        name=CLINICAL_INPUT, value=nihss.describe() if nihss else NIHSS_NOT_AVAILABLE, relationship_type=contains,
    ))
    if nihss is not None:
        items.append(hd.sr.TextContentItem(
            name=NIHSS_SOURCE, value=f"{nihss.source.title}, id {nihss.source_id}"[:1024], relationship_type=contains,
        ))
        items.append(hd.sr.DateTimeContentItem(
            name=NIHSS_ASSESSED, value=nihss.assessed_at.replace(tzinfo=timezone.utc), relationship_type=contains,
        ))
    for outcome in outcomes:
        items.append(hd.sr.TextContentItem(
            name=OUTCOME_INPUTS, value=f"{outcome.model.name} {outcome.model.version}: {outcome.inputs_used}"[:1024],
            relationship_type=contains,
        ))
    return group


def clinical_input(report: Dataset) -> dict[str, object]:
    """What a report's clinical group says, by concept code value: "72089-6" -> (value, unit code),
    TEXT items -> their text, DATETIME -> its value (the group's tracking items left out); a code
    that repeats (one outcome per model) gives its first item: ``reported_outcomes`` has them all.
    ValueError when the report has none."""
    groups = [item for container in report.ContentSequence for item in container.get("ContentSequence", [])
              if _is_clinical_group(item)]
    if not groups:
        raise ValueError("the report has no clinical input group")
    found: dict[str, object] = {}
    for item in groups[0].ContentSequence:
        code = item.ConceptNameCodeSequence[0].CodeValue
        if code in ("112039", "112040") or code in found:  # tracking identifier and tracking UID; repeats
            continue
        if item.ValueType == "NUM":
            value = item.MeasuredValueSequence[0]
            found[code] = (float(value.NumericValue), value.MeasurementUnitsCodeSequence[0].CodeValue)
        elif item.ValueType == "TEXT":
            found[code] = item.TextValue
        elif item.ValueType == "DATETIME":
            found[code] = item.DateTime
    return found


def reported_outcomes(report: Dataset) -> dict[str, tuple[float, str]]:
    """Each 90-day outcome a report's clinical group carries, by the model's name (its NUM's
    algorithm name): (probability, the model's inputs line). ValueError when there is no clinical group."""
    groups = [item for container in report.ContentSequence for item in container.get("ContentSequence", [])
              if _is_clinical_group(item)]
    if not groups:
        raise ValueError("the report has no clinical input group")
    probabilities: dict[str, float] = {}
    inputs: dict[str, str] = {}
    for item in groups[0].ContentSequence:
        code = item.ConceptNameCodeSequence[0].CodeValue
        if code == POOR_OUTCOME_90D.value and item.ValueType == "NUM":
            names = [child.TextValue for child in item.get("ContentSequence", [])
                     if child.ConceptNameCodeSequence[0].CodeValue == ALGORITHM_NAME_CODE]
            probabilities[names[0] if names else ""] = float(item.MeasuredValueSequence[0].NumericValue)
        elif code == OUTCOME_INPUTS.value and item.ValueType == "TEXT":
            inputs[item.TextValue.split(" ", 1)[0]] = item.TextValue
    return {name: (p, inputs.get(name, "")) for name, p in probabilities.items()}


ALGORITHM_NAME_CODE = "111001"
"""DCM "Algorithm Name", the text under a NUM's algorithm identification."""


def _is_clinical_group(item: Dataset) -> bool:
    return any(
        child.get("ValueType") == "TEXT" and child.get("TextValue") == CLINICAL_GROUP
        for child in item.get("ContentSequence", [])
    )


def revise_sr(previous: Dataset, study_uid: str, version: int, revision: int, nihss: NihssUsed | None,
              outcomes: Sequence[Outcome] = ()) -> Dataset:
    """A new version of the report ``previous`` (built by ``build_sr`` for ``study_uid`` version
    ``version``) naming ``nihss`` (and the ``outcomes`` recomputed with it) instead: same series, a new SOP Instance UID
    (``result_uid(study, version, "sr-r<revision>")``), Instance Number ``revision``, new content
    time, and ``previous`` in its Predecessor Documents Sequence. The imaging measurements are
    copied unchanged. ValueError when ``previous`` has no clinical group."""
    if revision < 2:
        raise ValueError(f"revision {revision}: revision 1 is the report build_sr made")
    report = copy.deepcopy(previous)
    containers = [item for item in report.ContentSequence if item.get("ValueType") == "CONTAINER"]
    for container in containers:
        children = container.get("ContentSequence", [])
        for index, item in enumerate(children):
            if _is_clinical_group(item):
                children[index] = clinical_group(study_uid, version, nihss, outcomes)[0]
                break
        else:
            continue
        break
    else:
        raise ValueError("the report has no clinical input group to revise")
    identity.stamp_revision(report, study_uid, version, "sr", revision)
    predecessor = Dataset()
    predecessor.StudyInstanceUID = previous.StudyInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = previous.SeriesInstanceUID
    instance = Dataset()
    instance.ReferencedSOPClassUID = previous.SOPClassUID
    instance.ReferencedSOPInstanceUID = previous.SOPInstanceUID
    series.ReferencedSOPSequence = [instance]
    predecessor.ReferencedSeriesSequence = [series]
    report.PredecessorDocumentsSequence = [predecessor]
    return report
