"""The stroke: a severity field over a middle-cerebral-artery-like territory and its nested zones.

One smooth field ``s`` (millimetres, higher is more ischaemic) is drawn per patient on the
template grid. Every zone is a super-level set of that same field, with thresholds chosen so
the zone has its target volume of brain parenchyma in the whole brain; so the zones nest by
construction: core within final infarct within hypoperfused (Tmax > 6 s) within oligaemia.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from service.phantom.anatomy import TISSUES, HeadModel

ZONES = ("oligaemia", "hypoperfused", "final_not_reperfused", "final_reperfused", "core")
"""Zones from mildest to most severe; each threshold is >= the one before."""

OUTSIDE = -1000.0  # field value outside the territory: no zone reaches it


@dataclass(frozen=True)
class LesionPlan:
    """Random draws that define one patient's stroke (volumes are whole-brain parenchyma, mL)."""

    side: str  # "left" | "right"
    centre_mni: tuple[float, float, float]
    axes: tuple[float, float, float]  # anisotropy of the distance (unitless)
    noise_mm: float
    volumes_ml: dict[str, float]

    @classmethod
    def random(cls, rng: np.random.Generator, p_no_stroke: float = 0.12) -> LesionPlan:
        side = "left" if rng.random() < 0.5 else "right"
        sign = -1.0 if side == "left" else 1.0
        centre = (sign * rng.uniform(34, 44), rng.uniform(-28, 12), rng.uniform(8, 34))
        if rng.random() < p_no_stroke:
            volumes = dict.fromkeys(ZONES, 0.0)
        else:
            hypo = rng.uniform(10, 250)
            core = min(150.0, hypo * rng.uniform(0.0, 0.65))
            penumbra = hypo - core
            volumes = {
                "oligaemia": hypo + rng.uniform(0.2, 0.6) * hypo,
                "hypoperfused": hypo,
                "final_not_reperfused": core + rng.uniform(0.7, 0.95) * penumbra,
                "final_reperfused": core + rng.uniform(0.0, 0.15) * penumbra,
                "core": core,
            }
        return cls(
            side=side,
            centre_mni=centre,
            axes=tuple(rng.uniform(0.75, 1.3, size=3)),
            noise_mm=float(rng.uniform(4, 9)),
            volumes_ml=volumes,
        )


@dataclass(frozen=True)
class Lesion:
    """The severity field on the head-model grid and the threshold of each zone."""

    field: np.ndarray  # float32, same grid as HeadModel.fractions[0]
    thresholds: dict[str, float]  # zone -> field threshold (voxel in zone iff s > threshold)
    volumes_ml: dict[str, float]  # achieved whole-brain parenchyma volume per zone
    side: str


def territory(mni: np.ndarray, side: str) -> np.ndarray:
    """Boolean MCA-like territory: one hemisphere, sparing the parasagittal (ACA) strip and the
    occipital pole (PCA) and the posterior fossa."""
    sign = -1.0 if side == "left" else 1.0
    x, y, z = sign * mni[..., 0], mni[..., 1], mni[..., 2]
    aca = (x < 22) & (z > 30)
    return (x > 6) & ~aca & (y > -72) & (z > -22)


def build_lesion(model: HeadModel, plan: LesionPlan, rng: np.random.Generator) -> Lesion:
    """Draw the field for ``plan`` and pick the zone thresholds that give its volumes."""
    shape = model.fractions.shape[1:]
    mni = (
        np.stack(np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij"), -1)
        @ model.affine[:3, :3].T.astype(np.float32)
        + model.affine[:3, 3].astype(np.float32)
    )
    distance = np.sqrt(
        sum(((mni[..., a] - plan.centre_mni[a]) / plan.axes[a]) ** 2 for a in range(3))
    )
    field = (-distance + plan.noise_mm * _smooth_noise(shape, rng)).astype(np.float32)
    field[~territory(mni, plan.side)] = OUTSIDE

    parenchyma = (model.fractions[TISSUES.index("gm")] + model.fractions[TISSUES.index("wm")]) >= 0.5
    candidates = np.sort(field[parenchyma & (field > OUTSIDE)])[::-1]
    voxel_ml = abs(np.linalg.det(model.affine[:3, :3])) / 1000.0
    thresholds: dict[str, float] = {}
    achieved: dict[str, float] = {}
    for zone in ZONES:
        n = min(int(round(plan.volumes_ml[zone] / voxel_ml)), len(candidates))
        # Threshold halfway between the n-th and (n+1)-th most severe voxel.
        if n == 0:
            thresholds[zone] = float(candidates[0]) + 1.0 if len(candidates) else 0.0
        elif n == len(candidates):
            thresholds[zone] = float(candidates[-1]) - 1e-3
        else:
            thresholds[zone] = float(candidates[n - 1] + candidates[n]) / 2.0
        achieved[zone] = n * voxel_ml
    # Keep the nesting strict even when two zones drew the same volume.
    for previous, zone in zip(ZONES, ZONES[1:]):
        thresholds[zone] = max(thresholds[zone], thresholds[previous])
    return Lesion(field=field, thresholds=thresholds, volumes_ml=achieved, side=plan.side)


def _smooth_noise(shape: tuple[int, ...], rng: np.random.Generator, scale: int = 4) -> np.ndarray:
    """Unit-variance noise smooth over about 10 mm, for irregular lesion borders."""
    coarse_shape = tuple(n // scale + 2 for n in shape)
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape), sigma=2.5 / scale * 4)
    coarse /= coarse.std()
    fine = ndimage.zoom(coarse, scale, order=1)
    return fine[tuple(slice(0, n) for n in shape)]
