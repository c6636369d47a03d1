"""The summary secondary capture: what a radiologist sees in a viewer that shows no SEG or SR."""

from __future__ import annotations

import dataclasses
from io import BytesIO

import numpy as np
import pydicom
import pytest

from service.findings import Findings, Segment
from service.imaging.geometry import Geometry
from service.phantom.generate import write_patient
from service.phantom.patient import PhantomOptions
from service.phantom.truth_files import read_nifti
from service.results import identity
from service.results.summary import SKY_BLUE, VERMILLION, build_summary, montage_slices, render_summary, text_lines


@pytest.fixture(scope="module")
def findings(tmp_path_factory: pytest.TempPathFactory) -> Findings:
    """CT perfusion Findings made of a small phantom's truth (no analysis run)."""
    out = tmp_path_factory.mktemp("summary")
    write_patient(2, "ctp", out, PhantomOptions(ct_matrix=96, ct_slices=8, ct_frames=4))
    root = out / "SGPH00000002"
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((root / "dicom/CT/ctp").glob("*.dcm"))]
    first = [h for h in headers if h.AcquisitionNumber == headers[0].AcquisitionNumber]
    first.sort(key=lambda h: float(h.ImagePositionPatient[2]))
    geometry = Geometry((8, 96, 96), (5.0, 2.5, 2.5), tuple(map(float, first[0].ImagePositionPatient)))

    def truth(name: str) -> np.ndarray:
        return read_nifti(root / "truth" / "ct" / f"{name}.nii.gz")[0]

    core, penumbra = truth("core").astype(bool), truth("penumbra").astype(bool)
    return Findings(
        study_uid=str(first[0].StudyInstanceUID), version=3, analysis="ct-perfusion", geometry=geometry,
        source_images=first,
        segments=[Segment("core", "Ischemic core", core, 20.0), Segment("penumbra", "Penumbra", penumbra, 80.0)],
        measurements={"core_volume_ml": 20.0, "penumbra_volume_ml": 80.0, "hypoperfused_volume_ml": 100.0,
                      "mismatch_volume_ml": 80.0, "mismatch_ratio": 5.0, "target_mismatch": 1.0},
        qc_flags=["late AIF peak"], parameters={"core_rcbf": 0.3},
        maps={"cbf": truth("cbf").astype(np.float32)},
    )


def colour_pixels(image: np.ndarray, rgb: tuple[float, float, float]) -> int:
    """Pixels of that hue, also when blended over the grey map: the grey part adds the same to each channel."""
    pixel = image.astype(float)
    chroma = pixel - pixel.min(axis=-1, keepdims=True)
    target = np.asarray(rgb) * 255 - min(rgb) * 255
    scale = (chroma * target).sum(axis=-1) / (target @ target)
    return int(((scale > 0.3) & (np.abs(chroma - scale[..., None] * target).max(axis=-1) < 25)).sum())


def test_core_and_penumbra_are_drawn_in_their_colours_with_a_legend(findings: Findings) -> None:
    image = render_summary(findings)
    assert image.shape == (1000, 1600, 3) and image.dtype == np.uint8
    assert colour_pixels(image[:, :1000], VERMILLION) > 200  # core overlays in the montage
    assert colour_pixels(image[:, :1000], SKY_BLUE) > 200
    assert colour_pixels(image[:, 1000:], VERMILLION) > 100  # and their legend swatches
    no_lesion = dataclasses.replace(findings, segments=[])
    assert colour_pixels(render_summary(no_lesion)[:, :1000], VERMILLION) < 200


def test_parameters_read_as_a_reader_reads_them_with_units(findings: Findings) -> None:
    shown = dataclasses.replace(findings, parameters={
        "core_rcbf": 0.3, "tmax_threshold_s": 6.0, "vessel_cbv": 8.0, "aif_partial_volume_scale": 1.01469,
        "reference_cbf": 31.24, "min_lesion_ml": 0.3, "some_new_setting": 2.5})
    lines = text_lines(shown)
    for expected in ("Core: CBF < 30% of contralateral", "Hypoperfusion: Tmax > 6 s", "Vessels left out: CBV > 8 mL/100 g",
                     "AIF partial-volume correction: x 1.01", "Contralateral CBF: 31.2 mL/100 g/min",
                     "Smallest lesion kept: 0.3 mL", "Some new setting: 2.5"):
        assert expected in lines, (expected, lines)
    assert not any(name in " ".join(lines) for name in shown.parameters)  # no code names
    assert lines.index("Core: CBF < 30% of contralateral") < lines.index("Hypoperfusion: Tmax > 6 s")


def test_the_slice_with_the_largest_lesion_is_always_in_the_montage() -> None:
    volume = np.ones((40, 4, 4))
    lesion = np.zeros((40, 4, 4), dtype=bool)
    lesion[17] = True
    chosen = montage_slices(volume, [lesion], count=6)
    assert 17 in chosen and len(chosen) == 6


def test_summary_is_a_secondary_capture_in_the_source_study(findings: Findings) -> None:
    sc = build_summary(findings)
    with BytesIO() as fp:
        sc.save_as(fp, enforce_file_format=True)
        back = pydicom.dcmread(BytesIO(fp.getvalue()))
    source = findings.source_images[0]
    assert back.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert (back.StudyInstanceUID, back.PatientID) == (source.StudyInstanceUID, source.PatientID)
    assert back.SOPInstanceUID == identity.result_uid(findings.study_uid, 3, "summary")
    assert "RESEARCH USE ONLY" in back.SeriesDescription and back.BurnedInAnnotation == "YES"
    assert back.pixel_array.shape == (1000, 1600, 3)
    assert build_summary(findings).SOPInstanceUID == back.SOPInstanceUID  # a resend is the same object


def test_a_summary_needs_a_map(findings: Findings) -> None:
    with pytest.raises(ValueError, match="no map"):
        render_summary(dataclasses.replace(findings, maps={}))


def test_colour_maps_scroll_slice_by_slice_with_a_bar_and_markers(findings: Findings) -> None:
    from service.results.maps import BAR_WIDTH_PX, build_colour_series

    series = build_colour_series(findings, "cbf")
    assert [int(s.InstanceNumber) for s in series] == list(range(1, 9))
    assert len({s.SeriesInstanceUID for s in series}) == 1 and len({s.SOPInstanceUID for s in series}) == 8
    assert all(s.StudyInstanceUID == findings.study_uid for s in series)
    pixels = series[4].pixel_array
    assert pixels.shape == (96, 96 + BAR_WIDTH_PX, 3)
    brain = findings.maps["cbf"][4] > 0
    assert pixels[:, :96][~brain].max(axis=-1).mean() < 10  # black outside the brain (bar: markers aside)
    assert pixels[:, :96][brain].max(axis=-1).mean() > 40  # coloured inside


def test_parametric_map_carries_the_values_in_their_unit(findings: Findings) -> None:
    from service.results.maps import build_parametric_map

    pm = build_parametric_map(findings, "cbf")
    with BytesIO() as fp:
        pm.save_as(fp, enforce_file_format=True)
        back = pydicom.dcmread(BytesIO(fp.getvalue()))
    assert back.SOPClassUID == pydicom.uid.ParametricMapStorage
    z = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in back.PerFrameFunctionalGroupsSequence]
    source_z = [float(h.ImagePositionPatient[2]) for h in findings.source_images]
    frames = {round(position, 3): frame for position, frame in zip(z, back.pixel_array)}
    np.testing.assert_allclose([frames[round(p, 3)] for p in source_z], findings.maps["cbf"], rtol=1e-6)
    mapping = back.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "ml/100g/min"
