"""Findings -> SEG and SR: built from a phantom MRI patient's DWI headers and truth masks."""

from __future__ import annotations

import dataclasses
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from service.findings import Findings, ModelInfo, Segment
from service.imaging.geometry import Geometry
from service.phantom.generate import write_patient
from service.phantom.patient import PhantomOptions
from service.phantom.truth_files import read_nifti
from service.results import identity
from service.results.coding import INFARCT, LOCAL_CODES, LOCAL_SCHEME, PENUMBRA
from service.results.seg import build_seg
from service.results.sr import CLINICAL_GROUP, MILLILITER, build_sr

OPTIONS = PhantomOptions(mr_matrix=64, mr_slices=8, mr_frames=6)


@pytest.fixture(scope="module")
def patient(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Phantom MRI patient seed 2 (has a stroke) on a 64 x 64 x 8 grid."""
    out = tmp_path_factory.mktemp("results")
    write_patient(2, "mri", out, OPTIONS)
    return out / "SGPH00000002"


def b1000_headers(root: Path) -> list[Dataset]:
    """The b=1000 DWI headers (no pixel data), sorted along the slice normal."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((root / "dicom/MR/dwi").glob("*.dcm"))]
    b1000 = [h for h in headers if float(h.DiffusionBValue) == 1000.0]
    iop = np.asarray(b1000[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    return sorted(b1000, key=lambda h: float(np.asarray(h.ImagePositionPatient, dtype=float) @ normal))


def geometry_of(headers: list[Dataset]) -> Geometry:
    """Geometry of sorted single-frame headers: [slice, row, column], spacing in mm."""
    first = headers[0]
    iop = np.asarray(first.ImageOrientationPatient, dtype=float)
    positions = np.array([h.ImagePositionPatient for h in headers], dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    return Geometry(
        shape=(len(headers), int(first.Rows), int(first.Columns)),
        spacing=(float(np.diff(positions @ normal).mean()), *map(float, first.PixelSpacing)),
        origin=tuple(positions[0]),
        row_direction=tuple(iop[:3]),
        column_direction=tuple(iop[3:]),
        slice_thickness=float(first.SliceThickness),
    )


def make_findings(root: Path, version: int = 1, keys: tuple[str, ...] = ("core",)) -> Findings:
    """Findings of truth masks, no analysis run: volume = voxels x voxel volume (ml)."""
    headers = b1000_headers(root)
    geometry = geometry_of(headers)
    labels = {"core": "Ischemic core", "penumbra": "Penumbra"}
    segments = []
    for key in keys:
        mask = read_nifti(root / "truth" / "mr" / f"{key}.nii.gz")[0].astype(bool)
        segments.append(Segment(key, labels[key], mask, float(mask.sum()) * geometry.voxel_volume_ml))
    return Findings(
        study_uid=headers[0].StudyInstanceUID,
        version=version,
        analysis="mri-diffusion-core",
        geometry=geometry,
        source_images=headers,
        segments=segments,
        measurements={"core_volume_ml": segments[0].volume_ml},
        qc_flags=["phantom_data"],
        parameters={"adc_threshold_1e-6mm2_s": 620.0},
    )


def write_and_read(ds: Dataset) -> Dataset:
    """highdicom's habit: every object built must survive a write to bytes and a read back."""
    with BytesIO() as fp:
        ds.save_as(fp, enforce_file_format=True)
        return pydicom.dcmread(BytesIO(fp.getvalue()))


@pytest.fixture(scope="module")
def findings(patient: Path) -> Findings:
    return make_findings(patient)


@pytest.fixture(scope="module")
def seg(findings: Findings) -> Dataset:
    return build_seg(findings)


@pytest.fixture(scope="module")
def sr(findings: Findings, seg: Dataset) -> Dataset:
    return build_sr(findings, seg)


# -------------------------------------------------------------------------- identity


def test_result_uid_is_deterministic_and_valid() -> None:
    a = identity.result_uid("1.2.3", 1, "seg")
    assert a == identity.result_uid("1.2.3", 1, "seg")
    assert a.startswith("2.25.") and len(a) <= 64
    assert pydicom.uid.UID(a).is_valid
    others = {identity.result_uid("1.2.3", 2, "seg"), identity.result_uid("1.2.3", 1, "sr"),
              identity.result_uid("1.2.4", 1, "seg")}
    assert a not in others and len(others) == 3


@pytest.mark.parametrize("args", [("", 1, "seg"), ("1.2.3", -1, "seg"), ("1.2.3", 1, "")])
def test_result_uid_rejects_bad_input(args: tuple) -> None:
    with pytest.raises(ValueError):
        identity.result_uid(*args)


def test_algorithm_family() -> None:
    assert identity.algorithm_family(None) == codes.DCM.HistogramAnalysis
    model = ModelInfo("ctp-core-penumbra", "1.0.0", "0" * 64, "onnxruntime (CPUExecutionProvider)")
    assert identity.algorithm_family(model) == codes.DCM.ArtificialIntelligence


# -------------------------------------------------------------------------- SEG


def test_seg_round_trip_keeps_mask_and_empty_frames(findings: Findings, seg: Dataset) -> None:
    mask = findings.segments[0].mask
    assert not mask[0].any() and mask.any()  # the phantom core leaves slices empty
    back = hd.seg.Segmentation.from_dataset(write_and_read(seg))
    assert back.SegmentationType == "BINARY"
    assert int(back.NumberOfFrames) == len(findings.source_images) == mask.shape[0]
    pixels = back.get_pixels_by_source_instance(
        source_sop_instance_uids=[h.SOPInstanceUID for h in findings.source_images], segment_numbers=[1]
    )
    assert pixels.shape == (*mask.shape, 1)
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), mask)


def test_seg_segment_description(findings: Findings, seg: Dataset) -> None:
    back = hd.seg.segread(BytesIO(_bytes(seg)))
    description = back.get_segment_description(1)
    assert description.segment_label == "Ischemic core"
    assert description.segmented_property_category == codes.SCT.MorphologicallyAbnormalStructure
    assert description.segmented_property_type == INFARCT
    assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    algorithm = description.algorithm_identification[0]
    assert algorithm.AlgorithmName == findings.algorithm.name
    assert algorithm.AlgorithmVersion == findings.algorithm.version
    assert back.ContentLabel == "CORE"
    assert back.SeriesNumber == identity.SEG_SERIES_NUMBER
    assert back.SeriesDescription == "StrokeGate core SEG v1 - research use only"
    assert back.Manufacturer == identity.MANUFACTURER
    assert back.ContentQualification == "RESEARCH"


def test_seg_copies_patient_and_study(findings: Findings, seg: Dataset) -> None:
    source = findings.source_images[0]
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber", "FrameOfReferenceUID"):
        assert seg[keyword].value == source[keyword].value, keyword
    assert seg.SOPInstanceUID == identity.result_uid(findings.study_uid, 1, "seg")
    assert seg.SeriesInstanceUID == identity.result_uid(findings.study_uid, 1, "seg-series")


def test_seg_two_segments(patient: Path) -> None:
    findings = make_findings(patient, keys=("core", "penumbra"))
    back = hd.seg.Segmentation.from_dataset(write_and_read(build_seg(findings)))
    assert int(back.NumberOfFrames) == 2 * len(findings.source_images)
    pixels = back.get_pixels_by_source_instance(
        source_sop_instance_uids=[h.SOPInstanceUID for h in findings.source_images], segment_numbers=[1, 2]
    )
    for k, segment in enumerate(findings.segments):
        np.testing.assert_array_equal(pixels[..., k].astype(bool), segment.mask)
    sr = hd.sr.Comprehensive3DSR.from_dataset(write_and_read(build_sr(findings, build_seg(findings))))
    assert len(sr.content.get_volumetric_roi_measurement_groups()) == 2


def test_penumbra_has_a_declared_local_code_and_the_core_stays_snomed(patient: Path) -> None:
    findings = make_findings(patient, keys=("core", "penumbra"))
    seg = write_and_read(build_seg(findings))
    back = hd.seg.Segmentation.from_dataset(seg)
    assert back.get_segment_description(1).segmented_property_type == INFARCT
    assert back.get_segment_description(2).segmented_property_type == PENUMBRA
    assert [item.CodingSchemeDesignator for item in seg.CodingSchemeIdentificationSequence] == [LOCAL_SCHEME]
    sr = write_and_read(build_sr(findings, build_seg(findings)))
    assert LOCAL_SCHEME in [item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence]
    types = {g.finding_type for g in hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_volumetric_roi_measurement_groups()}
    assert types == {INFARCT, PENUMBRA}


def test_a_core_only_seg_declares_no_local_scheme(seg: Dataset) -> None:
    assert "CodingSchemeIdentificationSequence" not in write_and_read(seg)


def test_readme_documents_every_local_code() -> None:
    """A reader who meets a 99SGATE code in a SEG or SR finds its meaning in the README."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    missing = [code.value for code in LOCAL_CODES if f"| `{code.value}` |" not in readme]
    assert missing == []


def _bytes(ds: Dataset) -> bytes:
    with BytesIO() as fp:
        ds.save_as(fp, enforce_file_format=True)
        return fp.getvalue()


# -------------------------------------------------------------------------- SR


def test_sr_round_trip_reports_the_volume(findings: Findings, seg: Dataset, sr: Dataset) -> None:
    back = hd.sr.Comprehensive3DSR.from_dataset(write_and_read(sr))
    groups = back.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 1
    group = groups[0]
    assert group.finding_type == INFARCT
    assert group.tracking_identifier == "Ischemic core"
    volumes = group.get_measurements(name=codes.SCT.Volume)
    assert len(volumes) == 1
    assert volumes[0].value == pytest.approx(findings.segments[0].volume_ml, rel=1e-9)
    assert volumes[0].unit == MILLILITER
    reference = group.referenced_segment
    assert reference is not None
    assert reference[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
    assert reference[0].ReferencedSOPSequence[0].ReferencedSegmentNumber == 1


def test_sr_does_not_repeat_the_core_volume(sr: Dataset) -> None:
    back = hd.sr.srread(BytesIO(_bytes(sr)))
    names = [item.ConceptNameCodeSequence[0].CodeMeaning for item in _walk(back.ContentSequence)
             if item.ValueType == "NUM"]
    assert names == ["Volume"]  # core_volume_ml equals the core segment's volume: reported once
    flags = [item.TextValue for item in _walk(back.ContentSequence)
             if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "QCFLAG"]
    assert flags == ["phantom_data"]


def test_sr_reports_other_measurements(patient: Path) -> None:
    findings = make_findings(patient)
    findings.measurements["mismatch_ratio"] = 2.5
    back = hd.sr.Comprehensive3DSR.from_dataset(write_and_read(build_sr(findings, build_seg(findings))))
    study, clinical = back.content.get_image_measurement_groups()  # the clinical group names the NIHSS (none here)
    assert clinical.tracking_identifier == CLINICAL_GROUP and clinical.get_measurements() == []
    (measurement,) = study.get_measurements()
    assert measurement.value == pytest.approx(2.5)
    assert measurement.unit == codes.UCUM.Ratio


def test_sr_identity(findings: Findings, sr: Dataset) -> None:
    source = findings.source_images[0]
    assert sr.PatientID == source.PatientID
    assert sr.StudyInstanceUID == source.StudyInstanceUID == findings.study_uid
    assert sr.SeriesNumber == identity.SR_SERIES_NUMBER
    assert sr.SeriesDescription == "StrokeGate report v1 - research use only"
    assert sr.SOPInstanceUID == identity.result_uid(findings.study_uid, 1, "sr")
    assert sr.VerificationFlag == "UNVERIFIED" and sr.PreliminaryFlag == "PRELIMINARY"
    procedure = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeMeaning == "Procedure reported"]
    assert procedure[0].ConceptCodeSequence[0].CodeValue == codes.LN.BrainMRI.value


def _walk(items: pydicom.Sequence):
    for item in items:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)


# -------------------------------------------------------------------------- determinism


def test_same_findings_give_the_same_uids(patient: Path, seg: Dataset, sr: Dataset) -> None:
    again = make_findings(patient)
    seg2 = build_seg(again)
    sr2 = build_sr(again, seg2)
    assert (seg2.SOPInstanceUID, seg2.SeriesInstanceUID) == (seg.SOPInstanceUID, seg.SeriesInstanceUID)
    assert (sr2.SOPInstanceUID, sr2.SeriesInstanceUID) == (sr.SOPInstanceUID, sr.SeriesInstanceUID)


def test_new_version_gives_new_uids(patient: Path, seg: Dataset, sr: Dataset) -> None:
    v2 = make_findings(patient, version=2)
    seg2 = build_seg(v2)
    sr2 = build_sr(v2, seg2)
    uids = {seg.SOPInstanceUID, seg.SeriesInstanceUID, sr.SOPInstanceUID, sr.SeriesInstanceUID,
            seg2.SOPInstanceUID, seg2.SeriesInstanceUID, sr2.SOPInstanceUID, sr2.SeriesInstanceUID}
    assert len(uids) == 8
    assert seg2.SeriesDescription == "StrokeGate core SEG v2 - research use only"


# -------------------------------------------------------------------------- bad input


def test_mask_not_matching_source_count_is_rejected(findings: Findings) -> None:
    bad = dataclasses.replace(findings, source_images=findings.source_images[:-1])
    with pytest.raises(ValueError, match=r"does not match the source images"):
        build_seg(bad)
    core = findings.segments[0]
    short = Segment(core.key, core.label, core.mask[:-1], core.volume_ml)
    with pytest.raises(ValueError, match=r"mask shape \(7, 64, 64\) does not match the 8 source images"):
        build_seg(dataclasses.replace(findings, segments=[short]))


def test_unsorted_sources_are_rejected(findings: Findings) -> None:
    shuffled = dataclasses.replace(findings, source_images=findings.source_images[::-1])
    with pytest.raises(ValueError, match="ordered like the mask slices"):
        build_seg(shuffled)


def test_other_bad_inputs(findings: Findings, seg: Dataset) -> None:
    with pytest.raises(ValueError, match="segments is empty"):
        build_seg(dataclasses.replace(findings, segments=[]))
    core = findings.segments[0]
    with pytest.raises(ValueError, match="not a valid SegmentKind"):
        build_seg(dataclasses.replace(findings, segments=[dataclasses.replace(core, key="tumour")]))
    with pytest.raises(ValueError, match="study"):
        build_seg(dataclasses.replace(findings, study_uid="1.2.3"))
    with pytest.raises(ValueError, match="differs from the segment volume"):
        build_sr(dataclasses.replace(findings, measurements={"core_volume_ml": core.volume_ml + 1}), seg)
    with pytest.raises(ValueError, match="not a valid Measurement"):
        build_sr(dataclasses.replace(findings, measurements={"unknown_thing": 1.0}), seg)
    with pytest.raises(ValueError, match="Segmentation"):
        build_sr(findings, findings.source_images[0])
