"""Synthetic acquisitions encoded as a scanner would send them: one DICOM file per slice (and per
time point), CT Image and MR Image Storage, Explicit VR Little Endian.

The phantom stands in for the scanner, so this is one of the DICOM edges of the service.
UIDs are name-based UUIDs of the patient seed and the object, so a
seed always gives the same UIDs and a resend of the same study is a duplicate, not a new study.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    PYDICOM_IMPLEMENTATION_UID,
)

import service
from service.imaging.geometry import Geometry

MANUFACTURER = "StrokeGate synthetic phantom"
STUDY_START = datetime(2026, 1, 1, 8, 0, 0)


_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:strokegate:phantom")


def uid(*parts: object) -> str:
    """A deterministic UID for the given parts: 2.25 + a name-based (version 5) UUID of them."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '/'.join(map(str, parts))).int}"


@dataclass(frozen=True)
class StudyIdentity:
    """Patient and study attributes shared by every series of one study."""

    seed: int
    modality: str  # "CT" | "MR"
    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    age: int
    accession: str
    study_uid: str
    frame_of_reference_uid: str
    study_time: datetime
    description: str

    @classmethod
    def for_patient(cls, seed: int, modality: str, age: int, sex: str) -> StudyIdentity:
        """Obviously fake identity: PHANTOM^... names, SGPH IDs, a fixed 2026 study date."""
        when = STUDY_START + timedelta(days=seed % 365, minutes=(seed * 37) % 600)
        return cls(
            seed=seed,
            modality=modality,
            patient_id=f"SGPH{seed:08d}",
            patient_name=f"PHANTOM^STROKE{seed:06d}^^^SYNTHETIC",
            birth_date=f"{when.year - age:04d}0101",
            sex=sex,
            age=age,
            accession=f"SG{modality}{seed:08d}"[:16],
            study_uid=uid(seed, modality, "study"),
            frame_of_reference_uid=uid(seed, modality, "frame-of-reference"),
            study_time=when + (timedelta(minutes=30) if modality == "MR" else timedelta()),
            description="CT PERFUSION HEAD (SYNTHETIC)" if modality == "CT" else "MRI STROKE (SYNTHETIC)",
        )


@dataclass(frozen=True)
class SeriesSpec:
    """What differs between series: number, description, image type and storage class."""

    key: str  # folder name and UID entropy
    number: int
    description: str
    image_type: tuple[str, ...]
    extra: dict[str, object]  # modality-specific attributes of every instance


def _base(identity: StudyIdentity, spec: SeriesSpec, geometry: Geometry) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage if identity.modality == "CT" else MRImageStorage
    ds.Modality = identity.modality
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = identity.patient_name
    ds.PatientID = identity.patient_id
    ds.PatientBirthDate = identity.birth_date
    ds.PatientSex = identity.sex
    ds.PatientAge = f"{identity.age:03d}Y"
    ds.StudyInstanceUID = identity.study_uid
    ds.StudyDate = identity.study_time.strftime("%Y%m%d")
    ds.StudyTime = identity.study_time.strftime("%H%M%S")
    ds.StudyID = f"{identity.seed % 100000}"
    ds.AccessionNumber = identity.accession
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = identity.description
    ds.SeriesInstanceUID = uid(identity.seed, identity.modality, spec.key)
    ds.SeriesNumber = spec.number
    ds.SeriesDescription = spec.description
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = ds.StudyTime
    ds.BodyPartExamined = "HEAD"
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = identity.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "strokegate phantom"
    ds.SoftwareVersions = service.__version__
    ds.DeviceSerialNumber = "0"
    ds.InstitutionName = "StrokeGate synthetic data (not a patient)"
    ds.ImageType = list(spec.image_type)
    ds.ImageOrientationPatient = [*map(float, geometry.row_direction), *map(float, geometry.column_direction)]
    ds.PixelSpacing = [round(geometry.spacing[1], 6), round(geometry.spacing[2], 6)]
    ds.SliceThickness = round(geometry.thickness, 6)
    ds.Rows, ds.Columns = geometry.shape[1], geometry.shape[2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    for keyword, value in spec.extra.items():
        setattr(ds, keyword, value)
    return ds


def write_series(
    directory: Path,
    identity: StudyIdentity,
    spec: SeriesSpec,
    geometry: Geometry,
    volumes: Iterable[tuple[np.ndarray, dict[str, object]]],
    *,
    slope: float = 1.0,
    intercept: float = 0.0,
    bits_stored: int = 16,
) -> list[Path]:
    """Write each (volume, per-volume attributes) as one instance per slice; return the paths.

    Volumes hold real values (HU, signal, mL/100 g/min...); stored = round((value - intercept) /
    slope), clipped to the unsigned ``bits_stored`` range. Per-volume attributes may carry a
    ``_seconds`` key: the volume's time after the series start (acquisition and content time).
    """
    directory.mkdir(parents=True, exist_ok=True)
    base = _base(identity, spec, geometry)
    base.BitsStored = bits_stored
    base.HighBit = bits_stored - 1
    base.PixelRepresentation = 0
    if identity.modality == "CT" or slope != 1.0 or intercept != 0.0:  # MR Image has no rescale
        base.RescaleIntercept = intercept
        base.RescaleSlope = slope
    top = 2**bits_stored - 1
    paths: list[Path] = []
    n_slices = geometry.shape[0]
    for t, (volume, attributes) in enumerate(volumes):
        seconds = float(attributes.get("_seconds", 0.0))
        when = identity.study_time + timedelta(seconds=seconds)
        stored = np.clip(np.rint((volume - intercept) / slope), 0, top).astype(np.uint16)
        for k in range(n_slices):
            number = t * n_slices + k + 1
            ds = Dataset()
            ds.update(base)
            ds.SOPInstanceUID = uid(identity.seed, identity.modality, spec.key, number)
            ds.InstanceNumber = number
            ds.AcquisitionNumber = t + 1
            ds.AcquisitionDate = ds.ContentDate = when.strftime("%Y%m%d")
            ds.AcquisitionTime = ds.ContentTime = when.strftime("%H%M%S.%f")
            position = geometry.slice_position(k)
            ds.ImagePositionPatient = [round(float(x), 4) for x in position]
            ds.SliceLocation = round(float(position @ geometry.normal), 4)
            for keyword, value in attributes.items():
                if not keyword.startswith("_"):
                    setattr(ds, keyword, value)
            ds.PixelData = stored[k].tobytes()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            path = directory / f"IM{number:05d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths


def ct_extra(kvp: float = 80.0, contrast: bool = True) -> dict[str, object]:
    """CT Image module attributes of a head perfusion scan."""
    extra: dict[str, object] = {
        "KVP": kvp,
        "XRayTubeCurrent": 150,
        "ConvolutionKernel": "H20s",
        "WindowCenter": 40,
        "WindowWidth": 80,
    }
    if contrast:
        extra.update(ContrastBolusAgent="Iodinated contrast (synthetic)", ContrastBolusRoute="IV")
    return extra


def mr_extra(sequence: str, repetition_ms: float, echo_ms: float, contrast: bool = False) -> dict[str, object]:
    """MR Image module attributes of an echo-planar (or FLAIR) head sequence at 1.5 T."""
    inversion = sequence == "FLAIR"
    extra: dict[str, object] = {
        "ScanningSequence": ["SE", "IR"] if inversion else ["EP"],
        "SequenceVariant": ["SK", "SP"],
        "ScanOptions": ["FS"] if not inversion else "",
        "MRAcquisitionType": "2D",
        "RepetitionTime": repetition_ms,
        "EchoTime": echo_ms,
        "EchoTrainLength": 1,
        "SequenceName": sequence,
        "ImagedNucleus": "1H",
        "MagneticFieldStrength": 1.5,
    }
    if inversion:
        extra["InversionTime"] = 2500.0
    if contrast:
        extra.update(ContrastBolusAgent="Gadolinium-based contrast (synthetic)", ContrastBolusRoute="IV")
    return extra


def frames_with_times(frames: Iterator[np.ndarray], times: np.ndarray) -> Iterator[tuple[np.ndarray, dict[str, object]]]:
    """Pair each perfusion frame with its acquisition time."""
    for frame, t in zip(frames, times, strict=True):
        yield frame, {"_seconds": float(t)}
