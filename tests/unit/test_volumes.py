"""DICOM -> arrays: sorting, geometry, b-values, what a series is, and every refusal's reason."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian, JPEGLSLossless, RLELossless

from service.analysis.diffusion_core import analyse_diffusion_core
from service.errors import InputError
from service.imaging.classify import ClassifyRules, classify
from service.imaging.volumes import (
    b_value,
    group_series,
    load_diffusion,
    load_dynamic,
    load_volume,
    read_dataset,
    read_datasets,
)
from service.phantom.generate import write_patient
from service.phantom.patient import PhantomOptions, make_patient, mr_geometry

SEED = 2
OPTIONS = PhantomOptions(mr_matrix=64, mr_slices=10, mr_frames=3)


@pytest.fixture(scope="module")
def mr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MRI phantom study: DWI (b 0 and 1000), ADC, FLAIR, a 3-frame PWI."""
    out = tmp_path_factory.mktemp("mr")
    write_patient(SEED, "mri", out, OPTIONS)
    return out / f"SGPH{SEED:08d}" / "dicom" / "MR"


def files(mr: Path, series: str) -> list[Path]:
    return sorted((mr / series).glob("*.dcm"))


@pytest.fixture()
def dwi(mr: Path) -> list[Dataset]:
    return read_datasets(files(mr, "dwi"))


@pytest.fixture()
def adc(mr: Path) -> list[Dataset]:
    return read_datasets(files(mr, "adc"))


def assert_geometry_close(a, b, tol: float = 1e-3) -> None:
    assert a.shape == b.shape
    for name in ("spacing", "origin", "row_direction", "column_direction"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=tol, err_msg=name)
    assert a.thickness == pytest.approx(b.thickness, abs=tol)


# --- geometry and sorting ---------------------------------------------------------------------


def test_geometry_from_headers_equals_the_phantom_geometry(dwi: list[Dataset], adc: list[Dataset]) -> None:
    expected = mr_geometry(make_patient(SEED, OPTIONS))
    for volume in [*load_diffusion(dwi).values(), load_volume(adc)]:
        assert_geometry_close(volume.geometry, expected)
        assert volume.pixels.shape == expected.shape
        assert volume.pixels.dtype == np.float32


def test_slices_sorted_along_the_normal_whatever_the_file_order(adc: list[Dataset]) -> None:
    in_order = load_volume(adc)
    shuffled = adc[:]
    random.Random(0).shuffle(shuffled)
    volume = load_volume(shuffled)
    np.testing.assert_array_equal(volume.pixels, in_order.pixels)
    along = [float(np.asarray(h.ImagePositionPatient) @ volume.geometry.normal) for h in volume.headers]
    assert along == sorted(along)
    for k, header in enumerate(volume.headers):
        np.testing.assert_allclose(header.ImagePositionPatient, volume.geometry.slice_position(k), atol=1e-3)
        source = next(ds for ds in adc if ds.SOPInstanceUID == header.SOPInstanceUID)
        np.testing.assert_array_equal(volume.pixels[k], source.pixel_array.astype(np.float32))
        assert "PixelData" not in header  # headers keep no pixel copies
    assert volume.series_uid == adc[0].SeriesInstanceUID
    assert volume.modality == "MR"
    assert volume.description == adc[0].SeriesDescription


def test_slices_sorted_when_the_normal_points_down(adc: list[Dataset]) -> None:
    """Flipping the column direction flips the normal: the stack order reverses."""
    flipped = [copy.deepcopy(ds) for ds in adc]
    for ds in flipped:
        iop = [float(v) for v in ds.ImageOrientationPatient]
        ds.ImageOrientationPatient = iop[:3] + [-v for v in iop[3:]]
    volume = load_volume(flipped)
    z = [float(h.ImagePositionPatient[2]) for h in volume.headers]
    assert z == sorted(z, reverse=True)
    assert volume.geometry.spacing[0] == pytest.approx(6.0)
    np.testing.assert_allclose(volume.geometry.normal, [0, 0, -1], atol=1e-9)


def test_rescale_is_applied(adc: list[Dataset]) -> None:
    scaled = [copy.deepcopy(ds) for ds in adc]
    for ds in scaled:
        ds.RescaleSlope, ds.RescaleIntercept = 0.5, -10
    np.testing.assert_allclose(load_volume(scaled).pixels, load_volume(adc).pixels * 0.5 - 10)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless], ids=["rle", "jpeg-ls"])
def test_compressed_series_decode_to_the_same_volume(adc: list[Dataset], syntax) -> None:
    compressed = [copy.deepcopy(ds) for ds in adc]
    for ds in compressed:
        ds.compress(syntax)
    np.testing.assert_array_equal(load_volume(compressed).pixels, load_volume(adc).pixels)


def test_dynamic_series_is_split_by_time(mr: Path) -> None:
    volume = load_dynamic(read_datasets(files(mr, "pwi")))
    assert volume.pixels.shape == (3, 10, 64, 64)
    assert volume.frame_values == (1.0, 2.0, 3.0)
    assert len(volume.headers) == 30
    assert [int(h.TemporalPositionIdentifier) for h in volume.frame_headers(2)] == [3] * 10


def test_group_series_by_uid(mr: Path) -> None:
    paths = files(mr, "adc") + files(mr, "dwi") + files(mr, "flair")
    random.Random(1).shuffle(paths)
    series = group_series(paths, headers_only=True)
    assert sorted(len(s) for s in series.values()) == [10, 10, 20]
    for uid, instances in series.items():
        assert {ds.SeriesInstanceUID for ds in instances} == {uid}


# --- b-values ---------------------------------------------------------------------------------


def test_b_values_split_the_dwi_series(dwi: list[Dataset]) -> None:
    volumes = load_diffusion(dwi)
    assert list(volumes) == [0.0, 1000.0]
    for b, volume in volumes.items():
        assert {float(h.DiffusionBValue) for h in volume.headers} == {b}
        assert volume.pixels.shape == (10, 64, 64)
    assert volumes[0.0].pixels.mean() > volumes[1000.0].pixels.mean()  # diffusion weighting darkens


def _move_b_value(ds: Dataset, vendor: str) -> Dataset:
    """A copy of ``ds`` whose b-value is only in the vendor's private element."""
    out = copy.deepcopy(ds)
    b = float(out.DiffusionBValue)
    del out.DiffusionBValue
    if vendor == "siemens":
        out.private_block(0x0019, "SIEMENS MR HEADER", create=True).add_new(0x0C, "IS", int(b))
    elif vendor == "siemens-no-creator":
        out.add_new(0x0019100C, "IS", int(b))
    elif vendor == "ge":  # b + 1e9 quirk in the first of four values
        out.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(0x39, "IS", [int(b) + 1_000_000_000, 8, 0, 0])
    elif vendor == "philips":
        out.private_block(0x2001, "Philips Imaging DD 001", create=True).add_new(0x03, "FL", b)
    return out


@pytest.mark.parametrize("vendor", ["siemens", "siemens-no-creator", "ge", "philips"])
def test_b_value_from_vendor_private_tags_only(dwi: list[Dataset], vendor: str) -> None:
    private = [_move_b_value(ds, vendor) for ds in dwi]
    assert all("DiffusionBValue" not in ds for ds in private)
    volumes = load_diffusion(private)
    assert list(volumes) == [0.0, 1000.0]
    np.testing.assert_array_equal(volumes[1000.0].pixels, load_diffusion(dwi)[1000.0].pixels)


def test_siemens_b_value_survives_an_implicit_vr_file(dwi: list[Dataset], tmp_path: Path) -> None:
    """Written implicit VR the private element comes back untyped; the value is still read."""
    ds = _move_b_value(dwi[-1], "siemens")
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    path = tmp_path / "implicit.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert b_value(read_dataset(path)) == 1000.0
    assert b_value(pydicom.dcmread(path)) == 1000.0


def test_no_b_value_is_refused(dwi: list[Dataset]) -> None:
    stripped = [copy.deepcopy(ds) for ds in dwi]
    del stripped[3].DiffusionBValue
    with pytest.raises(InputError, match="1 of 20 DWI instances have no b-value"):
        load_diffusion(stripped)


# --- what a series is -------------------------------------------------------------------------


def test_classify_phantom_series(mr: Path) -> None:
    kinds = {name: classify(read_datasets(files(mr, name), headers_only=True)) for name in ("dwi", "adc", "flair", "pwi")}
    assert kinds == {"dwi": "dwi", "adc": "adc", "flair": "flair", "pwi": "pwi"}


def _ct(description: str, image_type: list[str], positions: int, frames: int) -> list[Dataset]:
    out = []
    for t in range(frames):
        for k in range(positions):
            ds = Dataset()
            ds.Modality, ds.SeriesDescription, ds.ImageType = "CT", description, image_type
            ds.ImagePositionPatient = [0.0, 0.0, 5.0 * k]
            ds.AcquisitionNumber = t + 1
            out.append(ds)
    return out


def test_classify_ct_and_rules() -> None:
    assert classify(_ct("CT PERFUSION 5mm", ["ORIGINAL", "PRIMARY", "AXIAL"], 4, 20)) == "ctp"
    assert classify(_ct("CBF mL/100g/min", ["DERIVED", "SECONDARY", "PERFUSION", "CBF"], 4, 1)) == "ct-map"
    assert classify(_ct("Head 5mm", ["ORIGINAL", "PRIMARY", "AXIAL"], 4, 1)) == "other"
    custom = ClassifyRules(flair=r"DARKWATER")
    t2 = [Dataset()]
    t2[0].Modality, t2[0].SeriesDescription = "MR", "ax darkwater"
    assert classify(t2) == "other"
    assert classify(t2, custom) == "flair"
    assert classify([]) == "other"


# --- refusals, each with its reason -----------------------------------------------------------


def test_not_dicom_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.dcm"
    path.write_text("this is a note, not an image\n" * 20)
    with pytest.raises(InputError, match=r"notes\.dcm.*not a DICOM file"):
        read_dataset(path)
    with pytest.raises(InputError, match="notes.dcm"):
        group_series([path])
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty.dcm"):
        read_dataset(empty)


@pytest.mark.parametrize("keep", [400, 1000, -1000, -1])
def test_truncated_file_names_the_file(mr: Path, tmp_path: Path, keep: int) -> None:
    source = files(mr, "dwi")[0].read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(source[:keep])
    with pytest.raises(InputError, match=r"cut\.dcm: truncated"):
        read_dataset(path)


def test_file_without_preamble_is_read(mr: Path, tmp_path: Path) -> None:
    """Some senders write the data set without the 128-byte preamble and 'DICM': still DICOM."""
    source = files(mr, "adc")[0]
    path = tmp_path / "raw.dcm"
    path.write_bytes(source.read_bytes()[132:])
    ds = read_dataset(path)
    np.testing.assert_array_equal(ds.pixel_array, pydicom.dcmread(source).pixel_array)


def test_no_pixel_data(adc: list[Dataset]) -> None:
    broken = [copy.deepcopy(ds) for ds in adc]
    del broken[4].PixelData
    with pytest.raises(InputError, match=f"series {adc[0].SeriesInstanceUID}: no pixel data in .*IM00005.dcm"):
        load_volume(broken)


def test_undecodable_pixel_data(adc: list[Dataset]) -> None:
    broken = [copy.deepcopy(ds) for ds in adc]
    broken[2].PixelData = broken[2].PixelData[:100]
    with pytest.raises(InputError, match="cannot decode the pixel data"):
        load_volume(broken)


@pytest.mark.parametrize(
    ("keyword", "value", "reason"),
    [
        ("ImageOrientationPatient", [1.0, 0.0, 0.0, 0.0, 0.0, -1.0], "2 different ImageOrientationPatient values"),
        ("PixelSpacing", [2.0, 2.0], "2 different PixelSpacing values"),
        ("Rows", 32, "2 different Rows values"),
    ],
)
def test_inconsistent_geometry(adc: list[Dataset], keyword: str, value: object, reason: str) -> None:
    broken = [copy.deepcopy(ds) for ds in adc]
    setattr(broken[6], keyword, value)
    with pytest.raises(InputError, match=f"series {adc[0].SeriesInstanceUID}: inconsistent geometry: {reason}"):
        load_volume(broken)


def test_missing_slice_in_the_middle(adc: list[Dataset]) -> None:
    with pytest.raises(InputError, match=r"unequal slice spacing: gaps from 6\.00 to 12\.00 mm.*missing slice"):
        load_volume(adc[:4] + adc[5:])
    load_volume(adc[1:])  # the end slices missing is a shorter, still regular, stack


def test_duplicate_positions(adc: list[Dataset]) -> None:
    twice = adc + [copy.deepcopy(ds) for ds in adc[:2]]
    with pytest.raises(InputError, match="2 duplicate slice positions"):
        load_volume(twice)


def test_gantry_tilt(adc: list[Dataset]) -> None:
    tilted = [copy.deepcopy(ds) for ds in adc]
    for ds in tilted:  # y moves 0.5 mm per 6 mm slice: a 4.8 degree tilt
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.5 * (z + 32.0) / 6.0, z]
        ds.GantryDetectorTilt = 4.8
    with pytest.raises(InputError, match="gantry tilt.*GantryDetectorTilt 4.8"):
        load_volume(tilted)


def test_mixed_series_refused(adc: list[Dataset], dwi: list[Dataset]) -> None:
    with pytest.raises(InputError, match="2 different series mixed"):
        load_volume(adc + dwi[:10])


def test_separate_directions_refused(dwi: list[Dataset]) -> None:
    directions = dwi + [copy.deepcopy(ds) for ds in dwi if float(ds.DiffusionBValue) == 1000]
    with pytest.raises(InputError, match="b=1000 has 2 images per slice position"):
        load_diffusion(directions)


def test_one_b_value_without_adc_is_refused(dwi: list[Dataset]) -> None:
    b1000 = [ds for ds in dwi if float(ds.DiffusionBValue) == 1000]
    with pytest.raises(InputError, match=r"DWI has only one b-value \(1000\); need b=0 and b>=500, or an ADC series"):
        analyse_diffusion_core({"dwi": b1000}, adc_threshold=620.0, min_lesion_ml=0.3)
