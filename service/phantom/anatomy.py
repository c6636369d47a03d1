"""The synthetic head: MNI152 tissue maps, skull, CSF and vessels, posed in a scanner.

The templates are the ICBM 2009a symmetric grey- and white-matter probability maps that ship as
package data inside the nilearn wheel (1 mm, RAS), so nothing is downloaded. Tissue fractions are
built once per process on the template grid and resampled to each scan geometry with
partial-volume averaging through the slice thickness.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from service.imaging.geometry import Geometry

TISSUES = ("gm", "wm", "csf", "skull", "scalp", "artery", "vein")
"""Fraction channels of the head model; air is what they leave."""

LABELS = {"air": 0, "csf": 1, "gm": 2, "wm": 3, "skull": 4, "scalp": 5, "artery": 6, "vein": 7}
"""Values of the tissue label map written with the ground truth (the majority tissue per voxel)."""

_TEMPLATE_FILES = {
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
_PAD_MM = 16  # room around the template box for the shells outside the brain
_CSF_LAYER_MM = 2.5  # subarachnoid space outside the brain hull
_SKULL_OUTER_MM = 8.5
_SCALP_OUTER_MM = 13.0


@dataclass(frozen=True)
class HeadModel:
    """Tissue fractions on a 1 mm RAS grid, shape (len(TISSUES), x, y, z), summing to <= 1."""

    fractions: np.ndarray
    affine: np.ndarray  # voxel (x, y, z) -> MNI RAS mm


@dataclass(frozen=True)
class Pose:
    """Rigid placement of the head in the scanner: LPS = rotation @ (MNI in LPS axes) + translation."""

    rotation: np.ndarray  # 3x3
    translation: np.ndarray  # mm

    @classmethod
    def random(cls, rng: np.random.Generator, max_degrees: float = 5.0, max_mm: float = 5.0) -> Pose:
        angles = rng.uniform(-max_degrees, max_degrees, size=3)
        return cls(
            rotation=Rotation.from_euler("xyz", angles, degrees=True).as_matrix(),
            translation=rng.uniform(-max_mm, max_mm, size=3),
        )

    def lps_to_mni(self, points_lps: np.ndarray) -> np.ndarray:
        """Map LPS scanner points (..., 3) to MNI RAS millimetres."""
        local = (points_lps - self.translation) @ self.rotation  # inverse rotation
        return local * np.array([-1.0, -1.0, 1.0])


def template_path(name: str) -> Path:
    """Path of one MNI152 template inside the installed nilearn package (no import, no download)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nilearn is not installed; the phantom needs its bundled MNI152 templates")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / _TEMPLATE_FILES[name]
    if not path.exists():
        raise RuntimeError(f"MNI152 template missing from the nilearn package: {path}")
    return path


@functools.lru_cache(maxsize=2)
def head_model(artery_radius_mm: float = 2.0) -> HeadModel:
    """Build the head once per process: GM/WM from the templates, CSF, skull, scalp, vessels."""
    images = {name: nib.load(template_path(name)) for name in _TEMPLATE_FILES}
    affine = images["gm"].affine.copy()
    pad = _PAD_MM
    gm, wm = (
        np.pad(np.asarray(images[n].dataobj, dtype=np.float32) / 255.0, pad) for n in ("gm", "wm")
    )
    affine[:3, 3] -= affine[:3, :3] @ np.full(3, pad)

    # Brain hull: the tissue with sulci and ventricles closed (5 mm) and cavities filled; the
    # shells outside it (CSF, skull, scalp) by distance. Done on a 2 mm grid: 8x cheaper.
    tissue = gm + wm
    inside = tissue > 0.3
    coarse = _block_max(inside, 2)
    dilated = ndimage.distance_transform_edt(~coarse, sampling=2.0) <= 5
    closed = ndimage.binary_fill_holes(ndimage.distance_transform_edt(dilated, sampling=2.0) > 5)
    outside_coarse = ndimage.distance_transform_edt(~closed, sampling=2.0).astype(np.float32)
    outside_mm = _upsample(outside_coarse - 1.0, 2, tissue.shape)  # -1: centre-to-edge of 2 mm voxels
    hull = (outside_mm <= 0) | inside
    outside_mm[hull] = 0.0
    csf, skull, scalp = shells(outside_mm, hull, tissue)
    return assemble_head([gm, wm, csf, skull, scalp], outside_mm, affine, artery_radius_mm)


def shells(outside_mm: np.ndarray, hull: np.ndarray, tissue: np.ndarray) -> list[np.ndarray]:
    """CSF, skull and scalp fractions from the distance outside the brain hull (mm)."""
    csf = np.where(hull, np.clip(1.0 - tissue, 0.0, 1.0), 0.0).astype(np.float32)
    csf[(outside_mm > 0) & (outside_mm <= _CSF_LAYER_MM)] = 1.0
    skull = ((outside_mm > _CSF_LAYER_MM) & (outside_mm <= _SKULL_OUTER_MM)).astype(np.float32)
    scalp = ((outside_mm > _SKULL_OUTER_MM) & (outside_mm <= _SCALP_OUTER_MM)).astype(np.float32)
    return [csf, skull, scalp]


def assemble_head(channels: list[np.ndarray], outside_mm: np.ndarray, affine: np.ndarray, artery_radius_mm: float) -> HeadModel:
    """Add the arteries (both ACAs) and the superior sagittal sinus to the gm, wm, csf, skull and
    scalp ``channels`` on the grid of ``affine``, and crop to the head."""
    mni = _grid_mni(channels[0].shape, affine)
    artery = _arteries(mni, artery_radius_mm)
    vein = (np.abs(mni[..., 0]) < 4.5) & (outside_mm > 0.5) & (outside_mm <= _CSF_LAYER_MM + 2) & (
        mni[..., 2] > -15
    ) & (mni[..., 1] < 20)
    vessel = artery | vein
    for c in channels:
        c[vessel] = 0.0
    fractions = np.stack(channels + [artery.astype(np.float32), vein.astype(np.float32)])
    # Crop to the head to keep resampling cheap.
    occupied = np.argwhere(fractions.sum(axis=0) > 0)
    lo, hi = occupied.min(axis=0), occupied.max(axis=0) + 1
    fractions = np.ascontiguousarray(fractions[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]])
    affine = affine.copy()
    affine[:3, 3] += affine[:3, :3] @ lo
    return HeadModel(fractions=fractions, affine=affine)


def _block_max(mask: np.ndarray, factor: int) -> np.ndarray:
    """Downsample a boolean volume by ``factor``: a coarse voxel is set if any fine one is."""
    shape = tuple(-(-n // factor) * factor for n in mask.shape)
    padded = np.zeros(shape, dtype=bool)
    padded[tuple(slice(0, n) for n in mask.shape)] = mask
    blocks = padded.reshape(shape[0] // factor, factor, shape[1] // factor, factor, shape[2] // factor, factor)
    return blocks.any(axis=(1, 3, 5))


def _upsample(coarse: np.ndarray, factor: int, shape: tuple[int, ...]) -> np.ndarray:
    """Linear upsampling of a coarse grid whose voxel i covers fine voxels [i*factor, (i+1)*factor)."""
    coords = [(np.arange(n, dtype=np.float32) + 0.5) / factor - 0.5 for n in shape]
    grid = np.meshgrid(*coords, indexing="ij", sparse=True)
    return ndimage.map_coordinates(coarse, np.broadcast_arrays(*grid), order=1, mode="nearest").astype(np.float32)


def _grid_mni(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    idx = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij"), -1)
    return idx @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)


def _arteries(mni: np.ndarray, radius: float = 2.0) -> np.ndarray:
    """Both anterior cerebral arteries: a vertical A2 segment and the pericallosal run behind it."""
    x, y, z = mni[..., 0], mni[..., 1], mni[..., 2]
    mask = np.zeros(x.shape, dtype=bool)
    for side in (-1.0, 1.0):
        dx = x - 3.5 * side
        a2 = (dx**2 + (y - 36.0) ** 2 <= radius**2) & (z >= -8) & (z <= 28)
        pericallosal = (dx**2 + (z - 28.0) ** 2 <= radius**2) & (y >= -20) & (y <= 36)
        mask |= a2 | pericallosal
    return mask


def resample_fractions(
    model: HeadModel, geometry: Geometry, pose: Pose, thickness_samples: int = 3
) -> np.ndarray:
    """Tissue fractions on the scan grid, shape (len(TISSUES), slices, rows, columns), float32.

    Each voxel averages ``thickness_samples`` points through its slice thickness (partial volume).
    """
    t = geometry.thickness
    offsets = (np.arange(thickness_samples) + 0.5) / thickness_samples * t - t / 2
    to_voxel = np.linalg.inv(model.affine)
    out = np.zeros((len(TISSUES), *geometry.shape), dtype=np.float32)
    for points in geometry.voxel_centres(offsets):
        coords = mni_to_voxel(pose.lps_to_mni(points), to_voxel)
        for c in range(len(TISSUES)):
            out[c] += ndimage.map_coordinates(model.fractions[c], coords, order=1, mode="constant", cval=0.0)
    out /= thickness_samples
    return out


def mni_to_voxel(points_mni: np.ndarray, to_voxel: np.ndarray) -> np.ndarray:
    """Template voxel coordinates (3, ...) of MNI points (..., 3), for ``ndimage.map_coordinates``."""
    voxel = points_mni @ to_voxel[:3, :3].T + to_voxel[:3, 3]
    return np.moveaxis(voxel, -1, 0).astype(np.float32)


def label_map(fractions: np.ndarray) -> np.ndarray:
    """The majority tissue of each voxel as LABELS values (air where fractions sum below 0.5)."""
    order = [LABELS[name] for name in TISSUES]
    labels = np.asarray(order, dtype=np.uint8)[np.argmax(fractions, axis=0)]
    labels[fractions.sum(axis=0) < 0.5] = LABELS["air"]
    return labels

