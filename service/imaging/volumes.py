"""DICOM instances -> arrays with geometry: the edge between DICOM and the numerical code.

Array contract (see ``service.imaging.geometry``): a volume is float32 ``[slice, row, column]``,
a 4D series ``[frame, slice, row, column]`` (frame = time point or b-value), with the modality
rescale (RescaleSlope, RescaleIntercept) applied. Slices are ordered by position along the slice
normal (``row_direction x column_direction`` of ImageOrientationPatient), increasing.

Every way a series can fail to be a volume (not DICOM, truncated, no pixel data, mixed
geometry, a missing slice, a tilted gantry...) is an ``InputError`` whose message names the
series or file and says what is wrong.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from service.errors import InputError
from service.imaging.geometry import Geometry

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
_UNDEFINED_LENGTH = 0xFFFFFFFF

POSITION_TOLERANCE_MM = 0.01
"""Two slices closer than this along the normal are at the same position."""
SPACING_TOLERANCE = 0.02
"""Allowed deviation of a slice gap from the median gap: this fraction of it (at least 0.02 mm)."""
IN_PLANE_TOLERANCE_MM = 0.05
"""Allowed in-plane drift of slice positions over the stack before it counts as gantry tilt."""
GEOMETRY_TOLERANCE = 1e-4
"""ImageOrientationPatient and PixelSpacing values closer than this are the same."""

# Vendor private b-value elements: (group, private creator, element offset in the block).
# GE stores b + 1e9 in some software versions ("modulo 1e9 quirk").
_PRIVATE_B_VALUES = (
    (0x0019, "SIEMENS MR HEADER", 0x0C),  # (0019,100C) B_value, IS
    (0x0043, "GEMS_PARM_01", 0x39),  # (0043,1039) Slop_int_6..9, IS, first value
    (0x2001, "Philips Imaging DD 001", 0x03),  # (2001,1003) Diffusion B-Factor, FL
)

Source = Dataset | str | Path


@dataclass(eq=False)
class Volume:
    """One series loaded as an array.

    ``pixels`` is float32, ``[slice, row, column]`` or ``[frame, slice, row, column]``, in the
    series' real-world units (rescale applied). ``headers`` are the instances' Datasets without
    their pixel data, ordered like the array: for 4D frame-major (``headers[t * slices + k]``
    is frame ``t``, slice ``k``). ``frame_values`` are the values that split the frames (time
    position, b-value), ``None`` for a 3D volume.
    """

    geometry: Geometry
    pixels: np.ndarray
    headers: list[Dataset]
    series_uid: str
    modality: str
    description: str
    frame_values: tuple[float, ...] | None = None

    @property
    def n_frames(self) -> int:
        """Number of frames (1 for a 3D volume)."""
        return 1 if self.pixels.ndim == 3 else int(self.pixels.shape[0])

    def frame_headers(self, t: int = 0) -> list[Dataset]:
        """The headers of frame ``t``, ordered like its slices."""
        n = self.geometry.shape[0]
        if not 0 <= t < self.n_frames:
            raise IndexError(f"frame {t} out of range 0..{self.n_frames - 1}")
        return self.headers[t * n : (t + 1) * n]


# --- reading files --------------------------------------------------------------------------


def read_dataset(path: str | Path, *, headers_only: bool = False) -> Dataset:
    """Read one DICOM file (also one without the 128-byte preamble and 'DICM').

    Raises InputError naming the file when it is not DICOM, cannot be read or is truncated.
    """
    path = Path(path)
    try:
        try:
            ds = dcmread(path, stop_before_pixels=headers_only)
        except InvalidDicomError:
            # No preamble: still a DICOM data set if it parses into one with the identifying UIDs.
            ds = dcmread(path, stop_before_pixels=headers_only, force=True)
            if "SOPInstanceUID" not in ds and "SeriesInstanceUID" not in ds:
                raise InputError(f"{path}: not a DICOM file") from None
    except InputError:
        raise
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError, struct.error) as error:
        raise InputError(f"{path}: cannot be read as DICOM ({type(error).__name__}: {error})") from error
    if len(ds) == 0:
        raise InputError(f"{path}: not a DICOM file, or truncated (no data elements)")
    last = ds.get_item(next(reversed(ds.keys())))
    if isinstance(last, RawDataElement) and last.length != _UNDEFINED_LENGTH and last.value is not None:
        if len(last.value) < last.length:
            raise InputError(
                f"{path}: truncated file: element {last.tag} has {len(last.value)} of {last.length} bytes"
            )
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID"):
        if keyword not in ds:
            raise InputError(f"{path}: truncated or incomplete DICOM file: no {keyword}")
    ds.filename = str(path)
    return ds


def read_datasets(sources: Iterable[Source], *, headers_only: bool = False) -> list[Dataset]:
    """Datasets from file paths (read with ``read_dataset``) or Datasets (passed through)."""
    return [s if isinstance(s, Dataset) else read_dataset(s, headers_only=headers_only) for s in sources]


def group_series(sources: Iterable[Source], *, headers_only: bool = False) -> dict[str, list[Dataset]]:
    """Group instances by SeriesInstanceUID, series in order of first appearance.

    ``sources`` are file paths or Datasets. Raises InputError for an unreadable file or an
    instance without SeriesInstanceUID.
    """
    series: dict[str, list[Dataset]] = {}
    for ds in read_datasets(sources, headers_only=headers_only):
        uid = ds.get("SeriesInstanceUID")
        if not uid:
            raise InputError(f"{_name(ds)}: no SeriesInstanceUID")
        series.setdefault(str(uid), []).append(ds)
    return series


# --- b-values -------------------------------------------------------------------------------


def b_value(ds: Dataset) -> float | None:
    """The diffusion b-value (s/mm2) of one instance, or None when it has none.

    Looks at DiffusionBValue (0018,9087) (also inside MRDiffusionSequence), then Siemens
    (0019,100C), GE (0043,1039) first value modulo 1e9, Philips (2001,1003). Private elements
    are found through their private creator; when the creator is missing (some anonymisers drop
    it) the usual element number is used.
    """
    if "DiffusionBValue" in ds and ds.DiffusionBValue is not None and ds.DiffusionBValue != "":
        return header_numbers(ds, "DiffusionBValue", 1, "a diffusion series")[0]
    for item in ds.get("MRDiffusionSequence") or []:
        if item.get("DiffusionBValue") not in (None, ""):
            return header_numbers(item, "DiffusionBValue", 1, "a diffusion series")[0]
    for group, creator, offset in _PRIVATE_B_VALUES:
        element = None
        try:
            element = ds.private_block(group, creator)[offset]
        except KeyError:
            tag = (group << 16) | 0x1000 | offset
            if tag in ds and (group << 16 | 0x0010) not in ds:
                element = ds[tag]
        if element is None:
            continue
        value = _first_number(element.value, element.VR)
        if value is None:
            continue
        if group == 0x0043:
            value = value % 1e9
        return value
    return None


def _first_number(value: object, vr: str) -> float | None:
    """First numeric value of a (possibly raw, undecoded) element value."""
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    if isinstance(value, bytes):
        text = value.split(b"\\")[0].strip(b"\x00 ")
        try:
            return float(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
        if vr in ("FL", "UN", "OB") and len(value) >= 4 and len(value) % 4 == 0:
            return float(struct.unpack("<f", value[:4])[0])
        if vr == "FD" and len(value) >= 8:
            return float(struct.unpack("<d", value[:8])[0])
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


# --- loading --------------------------------------------------------------------------------


def load_volume(datasets: Sequence[Dataset], *, frame_key: Callable[[Dataset], float] | None = None) -> Volume:
    """Stack one series' single-frame instances into a Volume.

    Without ``frame_key`` the result is 3D and two instances at one position are an error.
    With it, instances are split into frames by ``frame_key(ds)`` (sorted, increasing), each
    frame must cover the same positions, and the result is 4D ``[frame, slice, row, column]``.
    Raises InputError with the reason when the instances do not form a regular stack.
    """
    if not datasets:
        raise InputError("no instances to load")
    uid = str(datasets[0].get("SeriesInstanceUID", "?"))
    uids = {str(ds.get("SeriesInstanceUID", "?")) for ds in datasets}
    if len(uids) > 1:
        raise InputError(f"series {uid}: instances from {len(uids)} different series mixed")
    if frame_key is None:
        geometry, pixels, headers = _stack(datasets, uid)
        frames = None
    else:
        by_frame: dict[float, list[Dataset]] = defaultdict(list)
        for ds in datasets:
            by_frame[float(frame_key(ds))].append(ds)
        frames = tuple(sorted(by_frame))
        stacks = [_stack(by_frame[f], uid, frame=f"frame {f:g}") for f in frames]
        geometry = stacks[0][0]
        for f, (g, _, _) in zip(frames[1:], stacks[1:], strict=True):
            _same_grid(geometry, g, f"series {uid}: frame {f:g} and frame {frames[0]:g}")
        pixels = np.stack([s[1] for s in stacks])
        headers = [h for s in stacks for h in s[2]]
    first = datasets[0]
    return Volume(
        geometry=geometry,
        pixels=pixels,
        headers=headers,
        series_uid=uid,
        modality=str(first.get("Modality", "")),
        description=str(first.get("SeriesDescription", "")),
        frame_values=frames,
    )


def load_diffusion(datasets: Sequence[Dataset]) -> dict[float, Volume]:
    """Split a DWI series by b-value: {b (s/mm2): 3D Volume}, b increasing, all on one grid.

    Instances at the same position are told apart by their b-value (``b_value``). Raises
    InputError when instances lack b-values or a b-value has several images per position
    (separate diffusion directions rather than a trace image).
    """
    if not datasets:
        raise InputError("no DWI instances to load")
    uid = str(datasets[0].get("SeriesInstanceUID", "?"))
    groups: dict[float, list[Dataset]] = defaultdict(list)
    missing = 0
    for ds in datasets:
        b = b_value(ds)
        if b is None:
            missing += 1
        else:
            groups[float(round(b))].append(ds)
    if missing:
        raise InputError(
            f"series {uid}: {missing} of {len(datasets)} DWI instances have no b-value "
            "(DiffusionBValue or a Siemens/GE/Philips private b-value)"
        )
    volumes: dict[float, Volume] = {}
    for b in sorted(groups):
        volume = load_volume(groups[b]) if _distinct_positions(groups[b]) else None
        if volume is None:
            per_position = len(groups[b]) / max(1, _count_positions(groups[b]))
            raise InputError(
                f"series {uid}: b={b:g} has {per_position:.3g} images per slice position "
                "(separate diffusion directions?); a trace-weighted DWI is needed"
            )
        volumes[b] = volume
    reference = next(iter(volumes))
    for b, volume in volumes.items():
        _same_grid(volumes[reference].geometry, volume.geometry, f"series {uid}: b={b:g} and b={reference:g}")
    return volumes


def temporal_position(ds: Dataset) -> float:
    """Frame key for dynamic (perfusion) series: TemporalPositionIdentifier, else
    AcquisitionNumber, else the acquisition (or content) time in seconds."""
    for keyword in ("TemporalPositionIdentifier", "AcquisitionNumber"):
        if ds.get(keyword) not in (None, ""):
            return header_numbers(ds, keyword, 1, "a dynamic series")[0]
    seconds = acquisition_seconds(ds)
    if seconds is None:
        raise InputError(f"{_name(ds)}: no TemporalPositionIdentifier, AcquisitionNumber or AcquisitionTime")
    return seconds


def acquisition_seconds(ds: Dataset) -> float | None:
    """AcquisitionTime (else ContentTime) as seconds after midnight, or None."""
    for keyword in ("AcquisitionTime", "ContentTime"):
        value = str(ds.get(keyword) or "").strip()
        if len(value) >= 2:
            try:
                hours = int(value[0:2])
                minutes = int(value[2:4] or 0)
                seconds = float(value[4:] or 0)
            except ValueError:
                continue
            return hours * 3600 + minutes * 60 + seconds
    return None


def load_dynamic(datasets: Sequence[Dataset]) -> Volume:
    """A dynamic series (CTP, DSC-PWI) as ``[time, slice, row, column]`` split by ``temporal_position``."""
    return load_volume(datasets, frame_key=temporal_position)


# --- internals ------------------------------------------------------------------------------


def _name(ds: Dataset) -> str:
    filename = getattr(ds, "filename", None)
    if isinstance(filename, str) and filename:
        return filename
    return f"instance {ds.get('SOPInstanceUID', '?')}"


def header_numbers(ds: Dataset, keyword: str, count: int, where: str) -> list[float]:
    """The ``count`` finite numbers of a header attribute, or InputError naming the instance (a
    sender's value of the wrong VR or multiplicity must fail the study, not the analysis code)."""
    value = ds.get(keyword)
    values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    try:
        numbers = [float(v) for v in values]  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError) as error:
        raise InputError(f"{where}: {keyword} of {_name(ds)} is not numeric: {str(value)[:40]!r}") from error
    if len(numbers) != count or not all(np.isfinite(numbers)):
        raise InputError(f"{where}: {keyword} of {_name(ds)} must be {count} finite number(s): {str(value)[:60]!r}")
    return numbers


def header_integer(ds: Dataset, keyword: str, where: str, default: int | None = None, low: int = 1, high: int = 65535) -> int:
    """One integer attribute within ``low``..``high`` (``default`` when absent), or InputError."""
    if ds.get(keyword) in (None, "") and default is not None:
        return default
    number = header_numbers(ds, keyword, 1, where)[0]
    if number != int(number) or not low <= number <= high:
        raise InputError(f"{where}: {keyword} of {_name(ds)} must be an integer from {low} to {high}: {number:g}")
    return int(number)


def _optional_number(ds: Dataset, keyword: str, where: str) -> float | None:
    return None if ds.get(keyword) in (None, "") else header_numbers(ds, keyword, 1, where)[0]


def _positions_along_normal(datasets: Sequence[Dataset]) -> np.ndarray | None:
    try:
        iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        return np.array([np.asarray(ds.ImagePositionPatient, dtype=float) @ normal for ds in datasets])
    except (AttributeError, ValueError, TypeError):
        return None


def _count_positions(datasets: Sequence[Dataset]) -> int:
    d = _positions_along_normal(datasets)
    if d is None:
        return len(datasets)
    return len(np.unique(np.round(d / POSITION_TOLERANCE_MM)))


def _distinct_positions(datasets: Sequence[Dataset]) -> bool:
    return _count_positions(datasets) == len(datasets)


def _distinct_values(datasets: Sequence[Dataset], keyword: str) -> list[object]:
    """The different values of ``keyword``; numbers equal within ``GEOMETRY_TOLERANCE`` are one."""
    values: list[object] = []
    for ds in datasets:
        value = ds.get(keyword)
        if isinstance(value, MultiValue | list | tuple):
            value = np.asarray(value, dtype=float)
            same = (
                isinstance(v, np.ndarray) and v.shape == value.shape and np.allclose(v, value, atol=GEOMETRY_TOLERANCE)
                for v in values
            )
            if not any(same):
                values.append(value)
        elif not any(not isinstance(v, np.ndarray) and v == value for v in values):
            values.append(value)
    return values


def _stack(
    datasets: Sequence[Dataset], uid: str, frame: str | None = None
) -> tuple[Geometry, np.ndarray, list[Dataset]]:
    """Sort, check and decode one frame's instances: (geometry, [slice, row, column], headers)."""
    where = f"series {uid}" + (f" {frame}" if frame else "")
    for ds in datasets:
        if header_integer(ds, "NumberOfFrames", where, default=1, high=2**31 - 1) > 1:
            raise InputError(f"{where}: multi-frame (enhanced) images are not supported: {_name(ds)}")
        if not any(k in ds for k in PIXEL_KEYWORDS):
            raise InputError(f"{where}: no pixel data in {_name(ds)}")
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
        lacking = sum(1 for ds in datasets if ds.get(keyword) in (None, ""))
        if lacking:
            raise InputError(f"{where}: no {keyword} in {lacking} of {len(datasets)} instances")
    for ds in datasets:  # types and multiplicities, before anything is computed from them
        header_integer(ds, "Rows", where)
        header_integer(ds, "Columns", where)
        header_numbers(ds, "PixelSpacing", 2, where)
        header_numbers(ds, "ImageOrientationPatient", 6, where)
        header_numbers(ds, "ImagePositionPatient", 3, where)
    for keyword in ("Rows", "Columns", "PixelSpacing", "ImageOrientationPatient"):
        values = _distinct_values(datasets, keyword)
        if len(values) > 1:
            raise InputError(f"{where}: inconsistent geometry: {len(values)} different {keyword} values")

    first = datasets[0]
    iop = np.asarray(first.ImageOrientationPatient, dtype=float)
    row, col = iop[:3], iop[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise InputError(f"{where}: ImageOrientationPatient {iop.tolist()} is not two orthonormal directions")
    row = row / np.linalg.norm(row)
    col = col - (col @ row) * row
    col = col / np.linalg.norm(col)
    normal = np.cross(row, col)

    positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=float) for ds in datasets])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    positions, along = positions[order], along[order]
    ordered = [datasets[i] for i in order]

    gaps = np.diff(along)
    duplicates = int(np.sum(gaps < POSITION_TOLERANCE_MM))
    if duplicates:
        raise InputError(
            f"{where}: {duplicates} duplicate slice positions ({len(datasets)} instances at "
            f"{len(datasets) - duplicates} positions)"
        )
    drift = positions - positions[0] - np.outer(along - along[0], normal)
    moved = float(np.max(np.linalg.norm(drift, axis=1))) if len(datasets) > 1 else 0.0
    if moved > IN_PLANE_TOLERANCE_MM:
        tilt = _optional_number(first, "GantryDetectorTilt", where)
        said = f", GantryDetectorTilt {tilt:g} deg" if tilt is not None else ""
        raise InputError(
            f"{where}: gantry tilt or sheared stack: slice positions move {moved:.2f} mm in-plane "
            f"over the stack{said}; resample to an orthogonal grid first"
        )
    if len(datasets) > 1:
        spacing = float(np.median(gaps))
        tolerance = max(SPACING_TOLERANCE * spacing, 0.02)
        if np.max(np.abs(gaps - spacing)) > tolerance:
            worst = int(np.argmax(np.abs(gaps - spacing)))
            raise InputError(
                f"{where}: unequal slice spacing: gaps from {gaps.min():.2f} to {gaps.max():.2f} mm "
                f"(usual {spacing:.2f} mm; a missing slice between {along[worst]:.2f} and "
                f"{along[worst + 1]:.2f} mm along the normal?)"
            )
    else:
        spacing = _optional_number(first, "SpacingBetweenSlices", where) or _optional_number(first, "SliceThickness", where) or 0.0
        if spacing <= 0:
            raise InputError(f"{where}: a single slice without SliceThickness or SpacingBetweenSlices")

    rows, columns = header_integer(first, "Rows", where), header_integer(first, "Columns", where)
    pixel_spacing = header_numbers(first, "PixelSpacing", 2, where)
    thickness = _optional_number(first, "SliceThickness", where)
    try:
        geometry = Geometry(
            shape=(len(ordered), rows, columns),
            spacing=(spacing, pixel_spacing[0], pixel_spacing[1]),
            origin=tuple(float(v) for v in positions[0]),
            row_direction=tuple(float(v) for v in row),
            column_direction=tuple(float(v) for v in col),
            slice_thickness=thickness if thickness is not None and thickness > 0 else None,
        )
    except ValueError as error:
        raise InputError(f"{where}: invalid geometry: {error}") from error

    pixels = np.empty((len(ordered), rows, columns), dtype=np.float32)
    for k, ds in enumerate(ordered):
        pixels[k] = _decode(ds, where, rows, columns)
    return geometry, pixels, [_header(ds) for ds in ordered]


def _decode(ds: Dataset, where: str, rows: int, columns: int) -> np.ndarray:
    """One instance's pixels as float32 (rows, columns) with the modality rescale applied."""
    if header_integer(ds, "SamplesPerPixel", where, default=1) != 1:
        raise InputError(f"{where}: {_name(ds)} is not a greyscale image (SamplesPerPixel {ds.SamplesPerPixel})")
    try:
        array = ds.pixel_array
    except (ValueError, RuntimeError, NotImplementedError, AttributeError, TypeError, KeyError) as error:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        syntax_name = getattr(syntax, "name", syntax) or "unknown transfer syntax"
        raise InputError(f"{where}: cannot decode the pixel data of {_name(ds)} ({syntax_name}): {error}") from error
    if array.shape != (rows, columns):
        raise InputError(f"{where}: {_name(ds)} decodes to shape {array.shape}, expected {(rows, columns)}")
    slope = _optional_number(ds, "RescaleSlope", where) or 1.0
    intercept = _optional_number(ds, "RescaleIntercept", where) or 0.0
    out = array.astype(np.float32)
    if slope != 1.0 or intercept != 0.0:
        out = out * np.float32(slope) + np.float32(intercept)
    return out


def _header(ds: Dataset) -> Dataset:
    """A copy of ``ds`` without its pixel data; the elements are shared, not copied."""
    header = Dataset({tag: elem for tag, elem in ds.items() if tag not in _PIXEL_TAGS})
    if None not in ds.original_encoding:
        header.set_original_encoding(*ds.original_encoding)
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        header.file_meta = meta
    filename = getattr(ds, "filename", None)
    if isinstance(filename, str):
        header.filename = filename
    return header


def _same_grid(a: Geometry, b: Geometry, what: str) -> None:
    if a.shape != b.shape or not np.allclose(a.affine, b.affine, atol=1e-2):
        raise InputError(f"{what} are on different grids ({a.shape} vs {b.shape})")
