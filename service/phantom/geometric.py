"""A second anatomy: a geometric head (ellipsoidal brain, a cortex ribbon, two ventricles).

Structurally unlike the ICBM templates: a smooth convex brain whose grey matter is one ribbon of
a chosen thickness (2-12 mm) over white matter, with CSF-filled lateral ventricles and the same
CSF, skull and scalp shells, arteries and sinus as the ICBM head. Built on a 1 mm grid in the
MNI frame (RAS mm, brain centred where the ICBM brain is) so that the lesion territory and the
scan slab are placed the same way.
"""

from __future__ import annotations

import functools

import numpy as np

from service.phantom.anatomy import HeadModel, assemble_head, shells

BRAIN_CENTRE_MNI = (0.0, -17.0, 14.0)
BRAIN_SEMI_AXES_MM = (68.0, 86.0, 60.0)
_VENTRICLES = [((side * 9.0, -12.0, 16.0), (5.0, 22.0, 7.0)) for side in (-1.0, 1.0)]
_PAD_MM = 18


@functools.lru_cache(maxsize=2)
def geometric_head_model(cortex_mm: float, artery_radius_mm: float = 2.0) -> HeadModel:
    """The geometric head with a ``cortex_mm`` grey-matter ribbon (partial volume at every border)."""
    axes = np.asarray(BRAIN_SEMI_AXES_MM)
    centre = np.asarray(BRAIN_CENTRE_MNI)
    half = axes + _PAD_MM
    shape = tuple(int(n) for n in np.ceil(2 * half) + 1)
    affine = np.eye(4)
    affine[:3, 3] = centre - half
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float32) + np.float32(o) for n, o in zip(shape, affine[:3, 3])),
                          indexing="ij", sparse=True)
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    outside_mm = _ellipsoid_distance(dx, dy, dz, axes)
    brain = _fraction(outside_mm)
    wm = _fraction(outside_mm + np.float32(cortex_mm))
    ventricles = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), dtype=np.float32)
    for (vx, vy, vz), v_axes in _VENTRICLES:
        ventricles = np.maximum(ventricles, _fraction(_ellipsoid_distance(x - vx, y - vy, z - vz, np.asarray(v_axes))))
    wm = np.clip(wm - ventricles, 0.0, None)
    gm = np.clip(brain - _fraction(outside_mm + np.float32(cortex_mm)), 0.0, None).astype(np.float32)
    tissue = gm + wm
    hull = outside_mm <= 0
    csf, skull, scalp = shells(np.maximum(outside_mm, 0.0), hull, tissue)
    return assemble_head([gm.astype(np.float32), wm.astype(np.float32), csf, skull, scalp],
                         np.maximum(outside_mm, 0.0), affine, artery_radius_mm)


def _ellipsoid_distance(dx: np.ndarray, dy: np.ndarray, dz: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """Signed distance (mm, positive outside) to an ellipsoid surface, to first order."""
    a, b, c = (np.float32(v) for v in axes)
    r = np.sqrt((dx / a) ** 2 + (dy / b) ** 2 + (dz / c) ** 2)
    gradient = np.sqrt((dx / a**2) ** 2 + (dy / b**2) ** 2 + (dz / c**2) ** 2) / np.maximum(r, 1e-6)
    return ((r - 1.0) / np.maximum(gradient, 1e-6)).astype(np.float32)


def _fraction(outside_mm: np.ndarray) -> np.ndarray:
    """Share of a 1 mm voxel inside the surface whose signed distance is ``outside_mm``."""
    return np.clip(0.5 - outside_mm, 0.0, 1.0).astype(np.float32)
