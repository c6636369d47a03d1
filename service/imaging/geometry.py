"""Voxel grids in patient space.

Array contract, used everywhere in StrokeGate: a volume is a numpy array indexed
``[slice, row, column]`` (4D series ``[time, slice, row, column]``), the DICOM order. Positions
are in DICOM patient coordinates (LPS, millimetres). NIfTI files are written ``[column, row,
slice]`` with a RAS affine, as dcm2niix and ISLES do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Geometry:
    """A stack of parallel, equally spaced slices.

    ``row_direction`` is the unit vector along a row (increasing column index),
    ``column_direction`` along a column (increasing row index), as in
    ImageOrientationPatient; ``spacing`` is (between slices, between rows, between columns) in mm.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    row_direction: tuple[float, float, float] = (1.0, 0.0, 0.0)
    column_direction: tuple[float, float, float] = (0.0, 1.0, 0.0)
    slice_thickness: float | None = None

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be three positive sizes, got {self.shape}")
        if min(self.spacing) <= 0:
            raise ValueError(f"spacing must be positive, got {self.spacing}")
        r, c = np.asarray(self.row_direction), np.asarray(self.column_direction)
        if abs(np.linalg.norm(r) - 1) > 1e-4 or abs(np.linalg.norm(c) - 1) > 1e-4 or abs(r @ c) > 1e-4:
            raise ValueError("row and column directions must be orthonormal")

    @property
    def normal(self) -> np.ndarray:
        """Unit vector along increasing slice index."""
        return np.cross(self.row_direction, self.column_direction)

    @property
    def thickness(self) -> float:
        """Nominal slice thickness in mm (the slice spacing when not given)."""
        return self.slice_thickness if self.slice_thickness is not None else self.spacing[0]

    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix mapping (slice, row, column, 1) to LPS millimetres."""
        a = np.eye(4)
        a[:3, 0] = self.normal * self.spacing[0]
        a[:3, 1] = np.asarray(self.column_direction) * self.spacing[1]
        a[:3, 2] = np.asarray(self.row_direction) * self.spacing[2]
        a[:3, 3] = self.origin
        return a

    @property
    def nifti_affine(self) -> np.ndarray:
        """4x4 RAS affine for the array transposed to (column, row, slice)."""
        return LPS_TO_RAS @ self.affine[:, [2, 1, 0, 3]]

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (slice spacing times pixel area)."""
        return float(np.prod(self.spacing)) / 1000.0

    def slice_position(self, k: int) -> np.ndarray:
        """ImagePositionPatient of slice ``k``: the centre of its first pixel, LPS mm."""
        return np.asarray(self.origin) + k * self.spacing[0] * self.normal

    def voxel_centres(self, slice_offsets: np.ndarray | None = None) -> np.ndarray:
        """LPS coordinates of voxel centres, shape (n_offsets, slices, rows, columns, 3).

        ``slice_offsets`` (mm along the normal) sample points through each slice's thickness,
        for partial-volume averaging; default is the centre only.
        """
        offsets = np.zeros(1) if slice_offsets is None else np.asarray(slice_offsets, dtype=float)
        k, i, j = (np.arange(n, dtype=np.float64) for n in self.shape)
        a = self.affine
        base = (
            a[:3, 3]
            + k[:, None, None, None] * a[:3, 0]
            + i[None, :, None, None] * a[:3, 1]
            + j[None, None, :, None] * a[:3, 2]
        )
        return base[None] + offsets[:, None, None, None, None] * self.normal
