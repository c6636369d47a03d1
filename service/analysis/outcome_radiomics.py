"""Radiomics features of the core and the hypoperfused region (seed 004's radiomics model).

pyradiomics has no wheel for this Python (its 3.1 release builds from source against SimpleITK),
so the features are computed here with numpy, scipy and scikit-image, in pyradiomics' families:
shape (volume, surface, sphericity, extent, components), first order (mean, spread, percentiles,
skewness, kurtosis, entropy of each map in the region) and texture (grey-level co-occurrence
contrast, homogeneity and correlation of each map on the region's largest slice). Maps are
divided by their brain median first (Tmax is in seconds, kept), so scanners' scales cancel.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, stats
from skimage.feature import graycomatrix, graycoprops
from skimage.measure import marching_cubes, mesh_surface_area

REGIONS = ("core", "hypoperfused", "penumbra")
FIRST_ORDER = ("mean", "std", "p10", "p90", "skewness", "kurtosis", "entropy")
TEXTURE = ("contrast", "homogeneity", "correlation")
SHAPE = ("volume_ml", "surface_cm2", "sphericity", "extent_z_mm", "extent_xy_mm", "components")
GLCM_LEVELS = 16


def normalised_maps(maps: dict[str, np.ndarray], brain: np.ndarray) -> dict[str, np.ndarray]:
    """Each map over its brain median (Tmax kept in seconds); 0 outside the brain."""
    out = {}
    for name, values in maps.items():
        values = np.asarray(values, dtype=np.float64)
        if name == "tmax":
            out[name] = np.where(brain, values, 0.0)
            continue
        inside = values[brain & (values > 0)]
        median = float(np.median(inside)) if inside.size else 1.0
        out[name] = np.where(brain, values / max(median, 1e-6), 0.0)
    return out


def feature_names(map_names: tuple[str, ...]) -> list[str]:
    names = []
    for region in REGIONS:
        names += [f"{region}.shape.{s}" for s in SHAPE]
        for m in map_names:
            names += [f"{region}.{m}.{f}" for f in FIRST_ORDER]
            names += [f"{region}.{m}.glcm_{t}" for t in TEXTURE]
    return names


def region_features(maps: dict[str, np.ndarray], brain: np.ndarray, core: np.ndarray, hypoperfused: np.ndarray,
                    spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """The feature vector (``feature_names(tuple(maps))`` order) of one study; an empty region
    gives zeros, so a patient without a lesion is a valid input."""
    normal = normalised_maps(maps, brain)
    masks = {"core": core & brain, "hypoperfused": hypoperfused & brain, "penumbra": hypoperfused & ~core & brain}
    values: list[float] = []
    for region in REGIONS:
        mask = masks[region]
        values += _shape(mask, spacing_mm)
        for name in maps:
            values += _first_order(normal[name][mask])
            values += _texture(normal[name], mask)
    return np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)


def _shape(mask: np.ndarray, spacing: tuple[float, float, float]) -> list[float]:
    count = int(mask.sum())
    if count == 0:
        return [0.0] * len(SHAPE)
    volume_mm3 = count * float(np.prod(spacing))
    padded = np.pad(mask, 1).astype(np.float32)
    try:
        vertices, faces, _, _ = marching_cubes(padded, 0.5, spacing=spacing)
        surface = float(mesh_surface_area(vertices, faces))
    except (ValueError, RuntimeError):
        surface = 0.0
    sphericity = (np.pi ** (1 / 3)) * (6 * volume_mm3) ** (2 / 3) / surface if surface > 0 else 0.0
    z, y, x = np.nonzero(mask)
    extent_xy = max(np.ptp(y) + 1, np.ptp(x) + 1) * spacing[1]
    components = ndimage.label(mask)[1]
    return [volume_mm3 / 1000.0, surface / 100.0, float(sphericity), float((np.ptp(z) + 1) * spacing[0]), float(extent_xy), float(components)]


def _first_order(values: np.ndarray) -> list[float]:
    if values.size < 3:
        return [0.0] * len(FIRST_ORDER)
    histogram, _ = np.histogram(values, bins=32)
    p = histogram[histogram > 0] / values.size
    flat = values.std() <= 1e-6 * max(abs(float(values.mean())), 1.0)  # a uniform region has no shape
    shape = (0.0, 0.0) if flat else (float(stats.skew(values)), float(stats.kurtosis(values)))
    return [float(values.mean()), float(values.std()), float(np.percentile(values, 10)), float(np.percentile(values, 90)),
            *shape, float(-(p * np.log2(p)).sum())]


def _texture(image: np.ndarray, mask: np.ndarray) -> list[float]:
    areas = mask.sum(axis=(1, 2))
    if areas.max(initial=0) < 4:
        return [0.0] * len(TEXTURE)
    z = int(np.argmax(areas))
    region = image[z][mask[z]]
    low, high = np.percentile(region, 1), np.percentile(region, 99)
    if high <= low:
        return [0.0, 1.0, 0.0]
    quantised = np.clip((image[z] - low) / (high - low) * (GLCM_LEVELS - 1), 0, GLCM_LEVELS - 1).astype(np.uint8) + 1
    quantised[~mask[z]] = 0  # level 0 is outside the region, dropped below
    matrix = graycomatrix(quantised, [1], [0, np.pi / 2], levels=GLCM_LEVELS + 1, symmetric=True)[1:, 1:]
    if matrix.sum() == 0:
        return [0.0, 1.0, 0.0]
    return [float(graycoprops(matrix, prop).mean()) for prop in TEXTURE]
