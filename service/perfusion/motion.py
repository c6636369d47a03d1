"""Rigid motion correction of the time frames of a 4D series.

Each frame of a ``[time, slice, row, column]`` series is registered to one reference volume with
a rigid (6 degrees of freedom) transform and resampled onto the reference grid.

Coordinates and conventions
---------------------------
Motion is expressed in *array millimetres*: the axes of the array (slice, row, column), scaled by
the spacing, with the origin at the centre of the volume. The head motion of frame ``k`` maps a
point ``q`` of the reference to ``R_k q + t_k`` in frame ``k`` (so the corrected frame is the frame
sampled at ``R_k q + t_k``). ``translation_mm[k]`` is ``t_k`` along (slice, row, column);
``rotation_deg[k]`` are the extrinsic Euler angles of ``R_k`` about the slice, row and column
axes, applied in that order (``scipy.spatial.transform.Rotation.from_euler("xyz", ...)`` in
array-millimetre coordinates). For axial LPS acquisitions the array axes are (S/I, A/P, R/L).
``matrices[k]`` is the same transform in voxel indices, ready for ``scipy.ndimage``:
``corrected = affine_transform(frame, matrices[k][:3, :3], matrices[k][:3, 3])``.

Method
------
Inverse-compositional Gauss-Newton (Baker & Matthews 2004) on a sparse set of reference voxels
with the strongest image gradient (skull, head outline, ventricles), over a two-level pyramid:

1. each frame is block-averaged in-plane to about 2 mm pixels (noise falls by the block size) and
   its intensities clipped to ``[clip_low, clip_high]`` (defaults suit CT in HU: air and bone
   kept, the extremes cut);
2. a coarse level (Gaussian, sigma 4 mm) for the capture range of a few millimetres and degrees,
   then a fine level (sigma 1 mm) for the accuracy;
3. residuals are weighted by Tukey's biweight (scale from the median absolute residual), so the
   enhancing vessels, which change by hundreds of HU during the bolus, do not pull the estimate;
4. every frame starts from the identity and from the previous frame's estimate, the better one is
   kept (slow drifts larger than the capture range are followed);
5. the frame is resampled once, at full resolution, trilinearly (``mode="nearest"`` at the edges).

``max_displacement_mm`` is the largest displacement, over all frames, of any foreground voxel
(reference above ``foreground_above``) under the estimated motion: a motion of the whole head
that the caller can hold against a limit ("excessive motion", see ``service.perfusion.ctp``).
``similarity`` is the correlation of each corrected frame with the reference on the registration
samples: a frame that does not register reads clearly lower than its neighbours.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

WORKING_PIXEL_MM = 2.0
"""In-plane pixel size (mm) the frames are block-averaged to for the registration."""
LEVEL_SIGMA_MM = (4.0, 1.0)
"""Gaussian smoothing (mm) of the coarse and the fine pyramid level."""
N_SAMPLES = 20000
"""Reference voxels (strongest gradient) the cost is evaluated on, per level."""
MAX_ITERATIONS = (30, 15)
"""Gauss-Newton iterations per level, at most."""
_STOP_MM = 0.005  # an update that moves no sample further than this ends the level
_IDENTITY_MM = 0.02  # frames whose motion moves no voxel further than this are copied, not resampled


@dataclass(frozen=True)
class MotionResult:
    """Motion-corrected frames and the motion that was removed.

    Attributes
    ----------
    frames:
        ``[T, Z, Y, X]`` float32, every frame resampled onto the reference (same units as input).
    translation_mm:
        ``(T, 3)`` float64, head translation of each frame along (slice, row, column), mm.
    rotation_deg:
        ``(T, 3)`` float64, head rotation about (slice, row, column) axes through the volume
        centre, degrees (extrinsic, in that order).
    matrices:
        ``(T, 4, 4)`` float64, voxel-index transform from the reference grid to each frame.
    displacement_mm:
        ``(T,)`` float64, largest displacement of any foreground voxel in each frame, mm.
    similarity:
        ``(T,)`` float64, correlation of each corrected frame with the reference (registration
        samples, working resolution), in [-1, 1].
    reference_index:
        The frame used as reference, or -1 when an image was given.
    """

    frames: np.ndarray
    translation_mm: np.ndarray
    rotation_deg: np.ndarray
    matrices: np.ndarray
    displacement_mm: np.ndarray
    similarity: np.ndarray
    reference_index: int

    @property
    def max_displacement_mm(self) -> float:
        """Largest displacement of any foreground voxel over all frames, mm."""
        return float(self.displacement_mm.max()) if self.displacement_mm.size else 0.0


@dataclass(frozen=True)
class _Level:
    """One pyramid level of the reference: sample positions (mm), values and Jacobian."""

    shape: tuple[int, int, int]
    step: np.ndarray  # (3,) mm between level voxels
    first: np.ndarray  # (3,) mm position of level voxel (0, 0, 0)
    sigma_vox: tuple[float, float, float]
    points: np.ndarray  # (n, 3) mm
    values: np.ndarray  # (n,)
    jacobian: np.ndarray  # (n, 6): d(reference)/d(rotation vector rad, translation mm)


def correct_motion(
    frames: np.ndarray,
    spacing_mm: Sequence[float],
    reference: int | np.ndarray | None = None,
    *,
    clip_low: float = -1000.0,
    clip_high: float = 1500.0,
    foreground_above: float = -500.0,
    workers: int = 2,
) -> MotionResult:
    """Register every frame of a 4D series rigidly to a reference and resample it.

    Parameters
    ----------
    frames:
        ``[T, Z, Y, X]`` series (HU for CT), any real dtype; computed in float32.
    spacing_mm:
        (slice, row, column) spacing in mm, positive.
    reference:
        ``None`` (frame 0, the frame before any motion), a frame index, or a ``[Z, Y, X]`` image
        on the same grid (e.g. the mean of aligned baseline frames).
    clip_low, clip_high:
        Intensity window applied before registering (the output frames are not clipped).
    foreground_above:
        Reference intensity above which a voxel counts for ``displacement_mm`` (CT default:
        anything denser than -500 HU, i.e. the head).
    workers:
        Threads used over frames.

    Returns
    -------
    MotionResult
        Corrected frames and per-frame motion; see the module docstring for conventions.

    Raises
    ------
    ValueError
        Wrong dimensions, spacing, reference, window, or non-finite values.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or min(frames.shape) < 1:
        raise ValueError(f"frames must be a non-empty [T, Z, Y, X] array, got shape {frames.shape}")
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    if spacing.shape != (3,) or not np.all(spacing > 0):
        raise ValueError(f"spacing_mm must be three positive numbers, got {spacing_mm!r}")
    if not clip_low < clip_high:
        raise ValueError(f"clip_low must be below clip_high, got {clip_low} and {clip_high}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    frames = frames.astype(np.float32, copy=False)
    n_frames, shape = frames.shape[0], frames.shape[1:]
    if reference is None or isinstance(reference, (int, np.integer)):
        index = 0 if reference is None else int(reference)
        if not 0 <= index < n_frames:
            raise ValueError(f"reference frame {index} is outside 0..{n_frames - 1}")
        ref_image = frames[index]
    else:
        index = -1
        ref_image = np.asarray(reference, dtype=np.float32)
        if ref_image.shape != shape:
            raise ValueError(f"reference image shape {ref_image.shape} differs from the frames' {shape}")
    if not np.isfinite(ref_image).all():
        raise ValueError("reference contains non-finite values")

    factor = max(1, int(round(WORKING_PIXEL_MM / float(min(spacing[1:])))))
    centre = spacing * (np.asarray(shape, dtype=np.float64) - 1) / 2
    ref_small = _downsample(ref_image, factor, clip_low, clip_high)
    levels = [_reference_level(ref_small, spacing, factor, centre, sigma) for sigma in LEVEL_SIGMA_MM]
    foreground = _foreground_points(ref_small, spacing, factor, centre, foreground_above, clip_low, clip_high)

    def estimate(k: int, start: np.ndarray) -> tuple[np.ndarray, float]:
        if k == index:
            return np.eye(4), 1.0
        if not np.isfinite(frames[k]).all():
            raise ValueError(f"frame {k} contains non-finite values")
        small = _downsample(frames[k], factor, clip_low, clip_high)
        images = [ndimage.gaussian_filter(small, level.sigma_vox, mode="nearest") for level in levels]
        return _register(images, levels, start)

    # Pass 1 from the identity (independent frames, in parallel); pass 2 retries from the
    # neighbour's estimate where that gives a better match (drifts beyond the capture range).
    with ThreadPoolExecutor(max_workers=workers) as pool:
        first = list(pool.map(lambda k: estimate(k, np.eye(4)), range(n_frames)))
    transforms = [t for t, _ in first]
    similarity = np.array([s for _, s in first])
    for k in range(1, n_frames):
        if k == index or similarity[k] >= similarity[k - 1] - 0.02:
            continue
        retry, score = estimate(k, transforms[k - 1])
        if score > similarity[k]:
            transforms[k], similarity[k] = retry, score

    to_mm = np.eye(4)
    to_mm[:3, :3] = np.diag(spacing)
    to_mm[:3, 3] = -centre
    matrices = np.stack([np.linalg.inv(to_mm) @ t @ to_mm for t in transforms])
    displacement = np.array([_max_displacement(t, foreground) for t in transforms])

    corrected = np.empty(frames.shape, dtype=np.float32)

    def resample(k: int) -> None:
        if k == index or displacement[k] < _IDENTITY_MM:
            corrected[k] = frames[k]
        else:
            m = matrices[k]
            ndimage.affine_transform(frames[k], m[:3, :3], m[:3, 3], output=corrected[k], order=1, mode="nearest")

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(resample, range(n_frames)))
    return MotionResult(
        frames=corrected,
        translation_mm=np.array([t[:3, 3] for t in transforms]),
        rotation_deg=np.array([Rotation.from_matrix(t[:3, :3]).as_euler("xyz", degrees=True) for t in transforms]),
        matrices=matrices,
        displacement_mm=displacement,
        similarity=similarity,
        reference_index=index,
    )


def rigid_matrix(translation_mm: Sequence[float], rotation_deg: Sequence[float]) -> np.ndarray:
    """4x4 array-millimetre transform ``q -> R q + t`` from the conventions of ``MotionResult``."""
    out = np.eye(4)
    out[:3, :3] = Rotation.from_euler("xyz", np.asarray(rotation_deg, dtype=float), degrees=True).as_matrix()
    out[:3, 3] = np.asarray(translation_mm, dtype=float)
    return out


def _downsample(image: np.ndarray, factor: int, low: float, high: float) -> np.ndarray:
    """Clip, then block-average ``factor x factor`` in-plane (the remainder rows/columns dropped)."""
    image = np.clip(image, low, high)
    if factor == 1:
        return image.astype(np.float32)
    z, y, x = image.shape
    y2, x2 = y // factor, x // factor
    if y2 < 2 or x2 < 2:
        raise ValueError(f"image of {y}x{x} pixels is too small to register")
    blocks = image[:, : y2 * factor, : x2 * factor].reshape(z, y2, factor, x2, factor)
    return blocks.mean(axis=(2, 4), dtype=np.float32)


def _level_grid(spacing: np.ndarray, factor: int, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step (mm) and position (mm, centred) of voxel (0, 0, 0) of the block-averaged grid."""
    step = spacing * np.array([1.0, factor, factor])
    first = spacing * np.array([0.0, (factor - 1) / 2, (factor - 1) / 2]) - centre
    return step, first


def _reference_level(small: np.ndarray, spacing: np.ndarray, factor: int, centre: np.ndarray, sigma_mm: float) -> _Level:
    step, first = _level_grid(spacing, factor, centre)
    sigma_vox = tuple(float(sigma_mm / s) for s in step)
    image = ndimage.gaussian_filter(small, sigma_vox, mode="nearest")
    grads = np.gradient(image, *step) if min(image.shape) > 1 else _gradient_thin(image, step)
    gradient = np.stack(grads, axis=-1).reshape(-1, 3)
    magnitude = np.linalg.norm(gradient, axis=1)
    if image.shape[0] > 2:  # one-sided differences at the first and last slice: not used
        edge = np.zeros(image.shape, dtype=bool)
        edge[[0, -1]] = True
        magnitude[edge.ravel()] = 0.0
    n = min(N_SAMPLES, int(np.count_nonzero(magnitude)))
    if n < 50:
        raise ValueError("the reference has too little structure to register")
    chosen = np.argpartition(magnitude, -n)[-n:]
    index = np.stack(np.unravel_index(chosen, image.shape), axis=1).astype(np.float64)
    points = first + index * step
    g = gradient[chosen].astype(np.float64)
    jacobian = np.concatenate([np.cross(points, g), g], axis=1)
    return _Level(image.shape, step, first, sigma_vox, points, image.ravel()[chosen].astype(np.float64), jacobian)


def _gradient_thin(image: np.ndarray, step: np.ndarray) -> list[np.ndarray]:
    """``np.gradient`` with zero derivative along axes of length 1 (single-slice volumes)."""
    out = []
    for axis in range(3):
        if image.shape[axis] > 1:
            out.append(np.gradient(image, step[axis], axis=axis))
        else:
            out.append(np.zeros_like(image))
    return out


def _sample(image: np.ndarray, level: _Level, transform: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values of ``image`` at the transformed sample points, and which fell inside the volume."""
    moved = level.points @ transform[:3, :3].T + transform[:3, 3]
    index = (moved - level.first) / level.step
    upper = np.asarray(level.shape) - 1
    inside = np.all((index >= -0.5) & (index <= upper + 0.5), axis=1)
    values = ndimage.map_coordinates(image, index.T, order=1, mode="nearest")
    return values.astype(np.float64), inside


def _register(images: list[np.ndarray], levels: list[_Level], start: np.ndarray) -> tuple[np.ndarray, float]:
    """Inverse-compositional Gauss-Newton over the pyramid; returns (transform, correlation)."""
    transform = start.copy()
    for image, level, iterations in zip(images, levels, MAX_ITERATIONS, strict=True):
        radius = float(np.abs(level.points).max(initial=1.0))
        for _ in range(iterations):
            values, inside = _sample(image, level, transform)
            error = values - level.values
            weight = _tukey(error, inside)
            jw = level.jacobian * weight[:, None]
            hessian = jw.T @ level.jacobian
            if np.linalg.cond(hessian) > 1e12:
                break
            delta = np.linalg.solve(hessian, jw.T @ error)
            step = np.eye(4)
            step[:3, :3] = Rotation.from_rotvec(delta[:3]).as_matrix()
            step[:3, 3] = delta[3:]
            transform = transform @ np.linalg.inv(step)
            if np.linalg.norm(delta[:3]) * radius + np.linalg.norm(delta[3:]) < _STOP_MM:
                break
    values, inside = _sample(images[-1], levels[-1], transform)
    a, b = values[inside], levels[-1].values[inside]
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return transform, 0.0
    return transform, float(np.corrcoef(a, b)[0, 1])


def _tukey(error: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Tukey biweight of each residual (0 outside the volume); scale 4.685 x 1.4826 x MAD."""
    if not inside.any():
        return inside.astype(np.float64)
    scale = 1.4826 * float(np.median(np.abs(error[inside])))
    c = 4.685 * max(scale, 1e-6)
    u = np.clip(error / c, -1.0, 1.0)
    return np.where(inside, (1.0 - u**2) ** 2, 0.0)


def _foreground_points(
    small: np.ndarray, spacing: np.ndarray, factor: int, centre: np.ndarray, above: float, low: float, high: float
) -> np.ndarray:
    """Positions (mm) of the foreground voxels of the block-averaged reference, for displacement."""
    step, first = _level_grid(spacing, factor, centre)
    threshold = min(max(above, low), high)
    mask = small > threshold
    if not mask.any():
        mask = np.ones_like(mask)
    # The displacement of a rigid motion is largest on the hull: the mask's border is enough.
    border = mask & ~ndimage.binary_erosion(mask, border_value=0)
    return first + np.argwhere(border) * step


def _max_displacement(transform: np.ndarray, points: np.ndarray) -> float:
    moved = points @ transform[:3, :3].T + transform[:3, 3]
    return float(np.linalg.norm(moved - points, axis=1).max()) if len(points) else 0.0
