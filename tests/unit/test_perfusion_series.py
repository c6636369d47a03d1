"""Perfusion series -> [time, slice, row, column] with times: CTP, DSC, vendor maps, and every refusal."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from service.errors import InputError
from service.imaging.perfusion_series import MapRules, PerfusionVolume, load_ctp, load_dsc, load_vendor_maps
from service.imaging.volumes import group_series, read_datasets
from service.phantom.dicom_writer import uid
from service.phantom.generate import write_patient
from service.phantom.patient import PhantomOptions, ct_geometry, make_patient, mr_geometry
from service.phantom.truth_files import read_nifti

SEED = 2
OPTIONS = PhantomOptions(ct_matrix=64, ct_slices=6, ct_frames=10, mr_matrix=48, mr_slices=6, mr_frames=8)
MAPS = ("cbf", "cbv", "mtt", "ttp", "tmax")


@pytest.fixture(scope="module")
def patient(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Patient 2 on small grids: CTP (10 frames x 6 slices), vendor maps, DSC-PWI (8 x 6)."""
    out = tmp_path_factory.mktemp("perfusion")
    write_patient(SEED, "all", out, OPTIONS)
    return out / f"SGPH{SEED:08d}"


@pytest.fixture(scope="module")
def ctp_source(patient: Path) -> list[Dataset]:
    return read_datasets(sorted((patient / "dicom" / "CT" / "ctp").glob("*.dcm")))


@pytest.fixture()
def ctp(ctp_source: list[Dataset]) -> list[Dataset]:
    """Fresh copies each test may change."""
    return [copy.deepcopy(ds) for ds in ctp_source]


@pytest.fixture(scope="module")
def reference(ctp_source: list[Dataset]) -> PerfusionVolume:
    return load_ctp(ctp_source)


def truth_times(patient: Path) -> np.ndarray:
    return np.asarray(json.loads((patient / "truth" / "ct_perfusion.json").read_text())["times_s"])


def assert_geometry_close(a, b, tol: float = 1e-3) -> None:
    assert a.shape == b.shape
    for name in ("spacing", "origin", "row_direction", "column_direction"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=tol, err_msg=name)
    assert a.thickness == pytest.approx(b.thickness, abs=tol)


def assert_same(a: PerfusionVolume, b: PerfusionVolume) -> None:
    assert_geometry_close(a.geometry, b.geometry, 1e-6)
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_allclose(a.times_s, b.times_s, atol=1e-6)


def frame_index(ds: Dataset) -> int:
    """0-based time point of a phantom CTP instance (slices are written 6 per time point)."""
    return (int(ds.InstanceNumber) - 1) // OPTIONS.ct_slices


# --- loading ----------------------------------------------------------------------------------


def test_ctp_frames_times_and_geometry(patient: Path, ctp_source: list[Dataset], reference: PerfusionVolume) -> None:
    volume = reference
    expected = ct_geometry(make_patient(SEED, OPTIONS))
    assert_geometry_close(volume.geometry, expected)
    assert volume.frames.shape == (OPTIONS.ct_frames, *expected.shape)
    assert volume.frames.dtype == np.float32
    assert volume.grouped_by == "AcquisitionNumber"
    assert volume.modality == "CT"
    assert volume.series_uids == (ctp_source[0].SeriesInstanceUID,)
    np.testing.assert_allclose(volume.times_s, truth_times(patient), atol=1e-3)
    assert volume.times_s[0] == 0.0
    np.testing.assert_allclose(volume.slice_times_s, np.repeat(volume.times_s[:, None], 6, axis=1), atol=1e-6)
    assert volume.start_seconds == pytest.approx(9 * 3600 + 14 * 60)  # phantom study time 09:14:00
    by_uid = {ds.SOPInstanceUID: ds for ds in ctp_source}
    for t in range(volume.n_frames):
        for k, header in enumerate(volume.headers[t]):
            assert "PixelData" not in header
            assert int(header.AcquisitionNumber) == t + 1
            np.testing.assert_allclose(header.ImagePositionPatient, expected.slice_position(k), atol=1e-3)
            source = by_uid[header.SOPInstanceUID]
            hu = source.pixel_array * float(source.RescaleSlope) + float(source.RescaleIntercept)
            np.testing.assert_allclose(volume.frames[t, k], hu, atol=0.5)
    as_volume = volume.as_volume()
    assert as_volume.pixels is volume.frames and len(as_volume.headers) == 60
    assert as_volume.frame_values == tuple(volume.times_s)


def test_shuffled_files_give_the_same_result(ctp: list[Dataset], reference: PerfusionVolume) -> None:
    random.Random(3).shuffle(ctp)
    assert_same(load_ctp(ctp), reference)


def test_paths_and_group_series_mapping_are_accepted(patient: Path, reference: PerfusionVolume) -> None:
    paths = sorted((patient / "dicom" / "CT" / "ctp").glob("*.dcm"))
    assert_same(load_ctp(paths), reference)
    assert_same(load_ctp(group_series(paths)), reference)


@pytest.mark.parametrize("renumber", [False, True], ids=["acquisition-numbers-kept", "numbers-restart-per-series"])
def test_one_series_per_time_point_loads_identically(
    ctp: list[Dataset], reference: PerfusionVolume, renumber: bool
) -> None:
    for ds in ctp:
        t = frame_index(ds)
        ds.SeriesInstanceUID = uid("test", "ctp-time-point", t)
        ds.SeriesNumber = 100 + t
        if renumber:  # as scanners that restart the counts in every series
            ds.AcquisitionNumber = 1
            ds.InstanceNumber = int(ds.InstanceNumber) - t * OPTIONS.ct_slices
    random.Random(5).shuffle(ctp)
    volume = load_ctp(ctp)
    assert_same(volume, reference)
    assert len(volume.series_uids) == OPTIONS.ct_frames
    assert volume.grouped_by == ("AcquisitionTime" if renumber else "AcquisitionNumber")


def test_grouping_by_time_without_acquisition_number(ctp: list[Dataset], reference: PerfusionVolume) -> None:
    for ds in ctp:
        del ds.AcquisitionNumber
    volume = load_ctp(ctp)
    assert volume.grouped_by == "AcquisitionTime"
    assert_same(volume, reference)


def test_grouping_by_content_time_alone(ctp: list[Dataset], reference: PerfusionVolume) -> None:
    for ds in ctp:
        del ds.AcquisitionNumber, ds.AcquisitionTime
    volume = load_ctp(ctp)
    assert volume.grouped_by == "AcquisitionTime"
    assert_same(volume, reference)


def test_per_slice_times_fall_back_to_instance_number_order(ctp: list[Dataset], reference: PerfusionVolume) -> None:
    """Sequential (shuttle) mode: every slice has its own time, so times do not separate frames."""
    for ds in ctp:
        del ds.AcquisitionNumber, ds.ContentTime
        k = (int(ds.InstanceNumber) - 1) % OPTIONS.ct_slices
        time = str(ds.AcquisitionTime)
        ds.AcquisitionTime = f"{time[:4]}{float(time[4:]) + 0.1 * k:09.6f}"
    random.Random(7).shuffle(ctp)
    volume = load_ctp(ctp)
    assert volume.grouped_by == "InstanceNumber"
    np.testing.assert_array_equal(volume.frames, reference.frames)
    np.testing.assert_allclose(volume.times_s, reference.times_s, atol=1e-3)  # every frame shifted alike
    np.testing.assert_allclose(volume.slice_times_s[0], np.arange(6) * 0.1 - 0.25, atol=1e-3)


def test_no_numbers_no_times_uses_instance_order_and_needs_an_interval(
    ctp: list[Dataset], reference: PerfusionVolume
) -> None:
    for ds in ctp:
        del ds.AcquisitionNumber, ds.AcquisitionTime, ds.ContentTime
    random.Random(11).shuffle(ctp)
    with pytest.raises(InputError, match="no acquisition times"):
        load_ctp(ctp)
    volume = load_ctp(ctp, frame_interval_s=2.0)
    assert volume.grouped_by == "InstanceNumber"
    np.testing.assert_array_equal(volume.frames, reference.frames)
    np.testing.assert_allclose(volume.times_s, np.arange(10) * 2.0)
    assert volume.slice_times_s is None


def test_non_uniform_sampling_is_kept(ctp: list[Dataset]) -> None:
    late = {t: 2.0 * t + (3.0 * (t - 5) if t > 5 else 0.0) for t in range(10)}  # 2 s, then 5 s steps
    for ds in ctp:
        ds.AcquisitionTime = ds.ContentTime = f"0914{late[frame_index(ds)]:09.6f}"
    np.testing.assert_allclose(load_ctp(ctp).times_s, [late[t] for t in range(10)], atol=1e-6)


def test_midnight_crossing(ctp: list[Dataset]) -> None:
    for ds in ctp:
        t = frame_index(ds)
        seconds = 86400 - 12 + 3 * t
        day = "20260102" if seconds < 86400 else "20260103"
        seconds %= 86400
        text = f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}.000000"
        ds.AcquisitionTime = ds.ContentTime = text
        ds.AcquisitionDate = ds.ContentDate = day
    np.testing.assert_allclose(load_ctp(ctp).times_s, np.arange(10) * 3.0)


# --- refusals ---------------------------------------------------------------------------------


def test_missing_image_in_a_middle_time_point(ctp: list[Dataset]) -> None:
    dropped = [ds for ds in ctp if not (frame_index(ds) == 4 and int(ds.InstanceNumber) % 6 == 3)]
    assert len(dropped) == 59
    with pytest.raises(InputError, match=r"missing images: time point 5 of 10 \(AcquisitionNumber 5\).* lacks 1 of 6"):
        load_ctp(dropped)


def test_missing_image_without_numbers_or_times(ctp: list[Dataset]) -> None:
    for ds in ctp:
        del ds.AcquisitionNumber, ds.AcquisitionTime, ds.ContentTime
    with pytest.raises(InputError, match="missing images"):
        load_ctp(ctp[:27] + ctp[28:], frame_interval_s=1.0)


def test_single_time_point(ctp: list[Dataset]) -> None:
    with pytest.raises(InputError, match="a single time point"):
        load_ctp([ds for ds in ctp if frame_index(ds) == 0])


def test_too_few_time_points(ctp: list[Dataset]) -> None:
    five = [ds for ds in ctp if frame_index(ds) < 5]
    with pytest.raises(InputError, match="too few time points.*5 .*at least 10"):
        load_ctp(five)
    assert load_ctp(five, min_time_points=5).n_frames == 5


def test_pixel_spacing_changing_between_time_points(ctp: list[Dataset]) -> None:
    for ds in ctp:
        if frame_index(ds) == 6:
            ds.PixelSpacing = [3.8, 3.8]
    with pytest.raises(InputError, match=r"inconsistent geometry across time points: time point 7 .*pixel spacing"):
        load_ctp(ctp)


def test_pixel_spacing_mixed_within_a_time_point(ctp: list[Dataset]) -> None:
    ctp[14].PixelSpacing = [3.8, 3.8]
    with pytest.raises(InputError, match="time point 3 of 10.*inconsistent geometry: 2 different PixelSpacing"):
        load_ctp(ctp)


def test_gantry_tilt_is_refused(ctp: list[Dataset]) -> None:
    for ds in ctp:
        k = (int(ds.InstanceNumber) - 1) % OPTIONS.ct_slices
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 5.0 * np.tan(np.radians(15)) * k, z]
        ds.GantryDetectorTilt = 15
    with pytest.raises(InputError, match="gantry tilt"):
        load_ctp(ctp)


def test_times_running_backwards(ctp: list[Dataset]) -> None:
    times = {frame_index(ds): str(ds.AcquisitionTime) for ds in ctp}
    for ds in ctp:
        if frame_index(ds) in (3, 4):  # swap the times of time points 4 and 5
            ds.AcquisitionTime = times[7 - frame_index(ds)]
    with pytest.raises(InputError, match=r"non-monotonic times: time point 5 of 10 \(AcquisitionNumber 5\)"):
        load_ctp(ctp)


def test_duplicate_times(ctp: list[Dataset]) -> None:
    time = str(next(ds for ds in ctp if frame_index(ds) == 2).AcquisitionTime)
    for ds in ctp:
        if frame_index(ds) == 3:
            ds.AcquisitionTime = time
    with pytest.raises(InputError, match="duplicate times: time point 3 of 10.*and time point 4 of 10"):
        load_ctp(ctp)


def test_slab_split_into_two_series_is_explained(ctp: list[Dataset]) -> None:
    for ds in ctp:
        lower = (int(ds.InstanceNumber) - 1) % OPTIONS.ct_slices < 3
        ds.SeriesInstanceUID = uid("test", "half", lower)
    with pytest.raises(InputError, match=r"slab is split into 2 series .*slices (1-3|4-6).*slices (4-6|1-3) of 6"):
        load_ctp(ctp)


def test_two_reconstructions_of_one_scan_are_refused(ctp: list[Dataset]) -> None:
    twin = [copy.deepcopy(ds) for ds in ctp]
    for ds in twin:
        ds.SeriesInstanceUID = uid("test", "twin")
        ds.SOPInstanceUID = uid("test", "twin", ds.SOPInstanceUID)
    with pytest.raises(InputError, match="both hold slice 1 at 091400.000000: two reconstructions of one scan"):
        load_ctp(ctp + twin)
    for ds in ctp + twin:
        del ds.AcquisitionTime, ds.ContentTime
    with pytest.raises(InputError, match="2 series each hold several time points"):
        load_ctp(ctp + twin, frame_interval_s=1.0)


def test_mr_images_are_not_ctp(patient: Path) -> None:
    with pytest.raises(InputError, match="needs CT images"):
        load_ctp(sorted((patient / "dicom" / "MR" / "pwi").glob("*.dcm")))


# --- DSC --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pwi(patient: Path) -> list[Dataset]:
    return read_datasets(sorted((patient / "dicom" / "MR" / "pwi").glob("*.dcm")))


def test_dsc_loads_with_echo_time(pwi: list[Dataset]) -> None:
    volume = load_dsc(pwi)
    assert volume.n_frames == 8
    assert volume.grouped_by == "TemporalPositionIdentifier"
    assert volume.echo_time_s == pytest.approx(0.030)
    assert volume.repetition_time_s == pytest.approx(1.5)
    np.testing.assert_allclose(volume.times_s, np.arange(8) * 1.5, atol=1e-3)
    assert_geometry_close(volume.geometry, mr_geometry(make_patient(SEED, OPTIONS)))
    source = next(ds for ds in pwi if ds.SOPInstanceUID == volume.headers[5][2].SOPInstanceUID)
    np.testing.assert_array_equal(volume.frames[5, 2], source.pixel_array.astype(np.float32))


def test_dsc_without_times_uses_the_repetition_time(pwi: list[Dataset]) -> None:
    stripped = [copy.deepcopy(ds) for ds in pwi]
    for ds in stripped:
        del ds.AcquisitionTime, ds.ContentTime
    volume = load_dsc(stripped)
    np.testing.assert_allclose(volume.times_s, np.arange(8) * 1.5)
    assert volume.slice_times_s is None


def test_dsc_needs_one_echo_time(pwi: list[Dataset]) -> None:
    stripped = [copy.deepcopy(ds) for ds in pwi]
    for ds in stripped:
        del ds.EchoTime
    with pytest.raises(InputError, match="without EchoTime.*dR2"):
        load_dsc(stripped)
    mixed = [copy.deepcopy(ds) for ds in pwi]
    mixed[0].EchoTime = 45.0
    with pytest.raises(InputError, match="2 different EchoTime values.*multi-echo"):
        load_dsc(mixed)


# --- vendor maps ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def map_files(patient: Path) -> dict[str, list[Path]]:
    return {name: sorted((patient / "dicom" / "CT" / name).glob("*.dcm")) for name in MAPS}


def test_vendor_maps_equal_the_truth(patient: Path, map_files: dict[str, list[Path]]) -> None:
    steps = {"cbf": 0.1, "cbv": 0.01, "mtt": 0.01, "ttp": 0.01, "tmax": 0.01}
    paths = [p for name in MAPS for p in map_files[name]]
    random.Random(2).shuffle(paths)
    maps = load_vendor_maps(paths)
    assert list(maps) == list(MAPS)
    expected = ct_geometry(make_patient(SEED, OPTIONS))
    for name, volume in maps.items():
        truth, _ = read_nifti(patient / "truth" / "ct" / f"{name}.nii.gz")
        assert_geometry_close(volume.geometry, expected)
        assert volume.pixels.shape == truth.shape
        np.testing.assert_allclose(volume.pixels, truth, atol=steps[name] / 2 + 1e-4, err_msg=name)
    assert maps["cbf"].pixels.max() > 20  # real units (mL/100 g/min), not stored counts


def test_vendor_maps_by_description_and_from_a_mapping(map_files: dict[str, list[Path]]) -> None:
    series = {name: read_datasets(map_files[name]) for name in MAPS}
    for instances in series.values():
        for ds in instances:
            ds.ImageType = ["DERIVED", "SECONDARY"]
    series["other"] = read_datasets(map_files["cbf"][:1])
    series["other"][0].SeriesInstanceUID = uid("test", "localiser")
    series["other"][0].SeriesDescription = "Topogram 0.6 T20s"
    series["other"][0].ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    maps = load_vendor_maps(series)
    assert sorted(maps) == sorted(MAPS)


def test_vendor_map_rules_are_configurable(map_files: dict[str, list[Path]]) -> None:
    instances = read_datasets(map_files["cbf"])
    for ds in instances:
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.SeriesDescription = "Flow_Functional"
    with pytest.raises(InputError, match="no perfusion map.*Flow_Functional"):
        load_vendor_maps(instances)
    assert list(load_vendor_maps(instances, MapRules(cbf=r"\bflow")).keys()) == ["cbf"]


def test_vendor_maps_must_share_a_grid(map_files: dict[str, list[Path]]) -> None:
    series = {name: read_datasets(map_files[name]) for name in MAPS}
    for ds in series["mtt"]:
        ds.PixelSpacing = [1.0, 1.0]
    with pytest.raises(InputError, match="different grids: MTT and CBF differ in pixel spacing"):
        load_vendor_maps(series)


def test_the_same_map_twice_is_refused(map_files: dict[str, list[Path]]) -> None:
    first = read_datasets(map_files["cbf"])
    second = read_datasets(map_files["cbf"])
    for ds in second:
        ds.SeriesInstanceUID = uid("test", "cbf-again")
    with pytest.raises(InputError, match="two series are recognised as CBF"):
        load_vendor_maps(first + second)
