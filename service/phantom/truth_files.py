"""Ground truth beside the DICOM: NIfTI maps and masks, JSON for the curves and the clinical record."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from service.imaging.geometry import Geometry

MAP_UNITS = {
    "cbf": "mL/100 g/min",
    "cbv": "mL/100 g",
    "mtt": "s",
    "ttp": "s",
    "tmax": "s",
    "adc": "1e-6 mm2/s",
}


def write_nifti(path: Path, volume: np.ndarray, geometry: Geometry) -> Path:
    """Write a [slice, row, column] (or [time, slice, row, column]) array as NIfTI in RAS.

    Booleans are written as uint8 masks.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    data = volume.astype(np.uint8) if volume.dtype == bool else volume
    data = data.T if data.ndim == 3 else np.transpose(data, (3, 2, 1, 0))  # -> column, row, slice[, time]
    image = nib.Nifti1Image(np.ascontiguousarray(data), geometry.nifti_affine)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, path)
    return path


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI written by ``write_nifti`` back as ([slice, row, column] array, RAS affine)."""
    image = nib.load(path)
    data = np.asanyarray(image.dataobj)
    data = data.T if data.ndim == 3 else np.transpose(data, (3, 2, 1, 0))
    return data, image.affine


def write_json(path: Path, payload: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_plain) + "\n")
    return path


def _plain(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
