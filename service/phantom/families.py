"""Phantom families: named ways of drawing synthetic patients that differ in structure, not just seed.

A family is a ``Variation`` (the ranges a patient's design is drawn from) and a role: it chooses
parameters, or it is held out (only reported, never used to choose anything). ``draw_design``
turns a variation into one patient's concrete ``Design`` from that patient's own random stream;
``Design()`` (no variation) is the original ICBM phantom, unchanged.

What varies (issue 12): the anatomy (ICBM templates or a geometric head with a cortex ribbon of
2-12 mm and ventricles), zones with graded or uniform values, the core's relative CBF
(0.05-0.28, half of the cores near the 0.30 threshold), grey/white baseline contrast (3-12 HU),
the AIF's width and recirculation, sampling (1-2 s over 40-70 s), coverage (8-24 slices of 5 or
10 mm) and the arteries' radius.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ANATOMIES = ("icbm", "geometric")
ZONE_STYLES = ("graded", "uniform")
NEAR_THRESHOLD_RCBF = (0.20, 0.28)
"""Cores whose relative CBF lies here sit close to the 0.30 core threshold."""
DEEP_RCBF = (0.05, 0.20)
MAX_COVERAGE_MM = 160.0
"""A slab no thicker than the head: 10 mm slices stop at 16."""


@dataclass(frozen=True)
class Design:
    """One patient's structural choices. The defaults are the original ICBM phantom."""

    anatomy: str = "icbm"
    zones: str = "graded"
    core_rcbf: float | None = None  # deepest core CBF / contralateral reference; None: 15 % of own healthy CBF
    penumbra_rcbf: float = 0.6  # uniform zones: penumbra CBF / contralateral reference
    penumbra_tmax_s: float = 7.0  # uniform zones
    core_tmax_s: float = 8.0  # uniform zones
    gm_wm_contrast_hu: float = 9.0  # baseline grey minus white matter attenuation
    aif_time_to_peak_s: float | None = None  # None: drawn 5-8 s with the bolus
    recirculation: float = 0.0  # area of the second pass / first pass
    frame_interval_s: float | None = None  # None: the options' frame count over the scan
    duration_s: float | None = None  # None: the options' (or drawn 45-60 s)
    ct_slices: int | None = None  # None: the options'
    slice_mm: float = 5.0
    artery_radius_mm: float = 2.0
    cortex_mm: float = 3.0  # geometric anatomy: grey-matter ribbon thickness


@dataclass(frozen=True)
class Variation:
    """Ranges a family draws each patient's ``Design`` from (low, high) or choices."""

    anatomy: str = "icbm"
    zones: tuple[str, ...] = ZONE_STYLES
    near_threshold_share: float = 0.5  # share of cores drawn in NEAR_THRESHOLD_RCBF, the rest in DEEP_RCBF
    penumbra_rcbf: tuple[float, float] = (0.45, 0.8)
    penumbra_tmax_s: tuple[float, float] = (6.5, 8.5)
    core_tmax_extra_s: tuple[float, float] = (0.5, 2.5)
    gm_wm_contrast_hu: tuple[float, float] = (3.0, 12.0)
    aif_time_to_peak_s: tuple[float, float] = (3.5, 9.0)
    recirculation: tuple[float, float] = (0.0, 0.3)
    frame_interval_s: tuple[float, float] = (1.0, 2.0)
    duration_s: tuple[float, float] = (40.0, 70.0)
    ct_slices: tuple[int, int] = (8, 24)
    slice_mm: tuple[float, ...] = (5.0, 10.0)
    artery_radius_mm: tuple[float, ...] = (1.5, 2.0, 3.0)
    cortex_mm: tuple[float, float] = (2.0, 12.0)


@dataclass(frozen=True)
class Family:
    name: str
    variation: Variation | None  # None: the original ICBM phantom
    held_out: bool = False
    description: str = ""


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("icbm", None, description="the original phantom: ICBM anatomy, graded zones, deep cores"),
        Family("icbm-varied", Variation(anatomy="icbm"),
               description="ICBM anatomy; graded or uniform zones, core rCBF 0.05-0.28, varied AIF, sampling, coverage"),
        Family("geometric-graded", Variation(anatomy="geometric", zones=("graded",)),
               description="geometric head (ellipsoid, 2-12 mm cortex, ventricles); graded zones; the same draws"),
        Family("geometric-uniform", Variation(anatomy="geometric", zones=("uniform",)), held_out=True,
               description="geometric head with uniform zones: held out, never chooses a parameter"),
    )
}
"""The named families; exactly one is held out."""


def held_out_family() -> str:
    return next(name for name, family in FAMILIES.items() if family.held_out)


def tuning_families() -> list[str]:
    """The families that may be used to choose a parameter (all but the held-out one)."""
    return [name for name, family in FAMILIES.items() if not family.held_out]


def draw_design(variation: Variation | None, rng: np.random.Generator) -> Design:
    """One patient's design from ``variation`` (the original phantom's when None)."""
    if variation is None:
        return Design()
    v = variation
    zones = str(v.zones[rng.integers(len(v.zones))])
    near = rng.random() < v.near_threshold_share
    core_rcbf = float(rng.uniform(*(NEAR_THRESHOLD_RCBF if near else DEEP_RCBF)))
    penumbra_tmax = float(rng.uniform(*v.penumbra_tmax_s))
    slice_mm = float(v.slice_mm[rng.integers(len(v.slice_mm))])
    return Design(
        anatomy=v.anatomy,
        zones=zones,
        core_rcbf=core_rcbf,
        penumbra_rcbf=float(rng.uniform(*v.penumbra_rcbf)),
        penumbra_tmax_s=penumbra_tmax,
        core_tmax_s=penumbra_tmax + float(rng.uniform(*v.core_tmax_extra_s)),
        gm_wm_contrast_hu=float(rng.uniform(*v.gm_wm_contrast_hu)),
        aif_time_to_peak_s=float(rng.uniform(*v.aif_time_to_peak_s)),
        recirculation=float(rng.uniform(*v.recirculation)),
        frame_interval_s=float(rng.uniform(*v.frame_interval_s)),
        duration_s=float(rng.uniform(*v.duration_s)),
        ct_slices=min(int(rng.integers(v.ct_slices[0], v.ct_slices[1] + 1)), int(MAX_COVERAGE_MM // slice_mm)),
        slice_mm=slice_mm,
        artery_radius_mm=float(v.artery_radius_mm[rng.integers(len(v.artery_radius_mm))]),
        cortex_mm=float(np.round(rng.uniform(*v.cortex_mm))),  # whole mm: geometric heads are cached per value
    )
