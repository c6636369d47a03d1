"""Which synthetic patients train, validate and test a model: phantom families, seeds, noise levels.

A family is a named way of drawing phantom patients (``FAMILIES``); adding one is one line here.
Splits are by patient (a patient's slices never cross splits), and a held-out family gives test
patients only: it never trains, never chooses a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from service.phantom import families
from service.phantom.patient import PhantomOptions


def _family_options(variation: families.Variation | None) -> Callable[[float], PhantomOptions]:
    return lambda noise_hu: PhantomOptions(noise_hu=noise_hu, variation=variation)


FAMILIES: dict[str, Callable[[float], PhantomOptions]] = {
    # name -> the phantom options of that family at a given CT noise (HU)
    name: _family_options(family.variation) for name, family in families.FAMILIES.items()
}
"""The phantom families the dataset builder knows (service.phantom.families): 256 x 256 in-plane;
"icbm" is 16 slices x 40 frames, the others draw their slices, sampling and duration per patient.
Hold out the family that service.phantom.families marks held out (``held_out_family()``)."""

FIRST_SEED = 10_000
"""Training cohorts start here, far from the seeds of tests (0-99) and benchmarks (101-199)."""
FAMILY_STRIDE = 10_000
"""Each family's patients get their own block of seeds."""


@dataclass(frozen=True)
class SampleSpec:
    """One analysed study: a patient of a family at one noise level, in one split."""

    family: str
    seed: int
    noise_hu: float
    split: str  # "train" | "validation" | "test" | "held-out"

    @property
    def key(self) -> str:
        return f"{self.family}-{self.seed}-{self.noise_hu:g}hu"


@dataclass(frozen=True)
class CohortPlan:
    families: tuple[str, ...]
    held_out_family: str | None
    noise_hu: tuple[float, ...]
    train: int  # patients per training family
    validation: int
    test: int  # per family, the held-out one included

    def samples(self) -> list[SampleSpec]:
        """Every study to build. Training patients appear once, at the noise levels in turn
        (more patients rather than the same patient thrice); validation at the middle noise level;
        test and held-out patients at every noise level, for the per-noise report."""
        for family in self.families:
            if family not in FAMILIES:
                raise ValueError(f"no phantom family {family!r}; known: {', '.join(FAMILIES)}")
        if self.held_out_family is not None and self.held_out_family not in self.families:
            raise ValueError(f"the held-out family {self.held_out_family!r} is not among {list(self.families)}")
        if self.held_out_family is not None and len(self.families) < 2:
            raise ValueError("holding a family out needs at least one other family to train on")
        middle = sorted(self.noise_hu)[len(self.noise_hu) // 2]
        out: list[SampleSpec] = []
        for index, family in enumerate(self.families):
            seed = FIRST_SEED + index * FAMILY_STRIDE
            tests = list(range(seed, seed + self.test))
            split = "held-out" if family == self.held_out_family else "test"
            out += [SampleSpec(family, s, noise, split) for s in tests for noise in self.noise_hu]
            if family == self.held_out_family:
                continue
            seed += self.test
            out += [SampleSpec(family, s, middle, "validation") for s in range(seed, seed + self.validation)]
            seed += self.validation
            out += [SampleSpec(family, s, self.noise_hu[k % len(self.noise_hu)], "train") for k, s in enumerate(range(seed, seed + self.train))]
        return out

    def seeds(self) -> dict[str, list[int]]:
        split_seeds: dict[str, set[int]] = {}
        for spec in self.samples():
            split_seeds.setdefault(spec.split, set()).add(spec.seed)
        return {split: sorted(seeds) for split, seeds in split_seeds.items()}


def parse_families(names: Sequence[str]) -> tuple[str, ...]:
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown phantom families {unknown}; known: {', '.join(FAMILIES)}")
    return tuple(dict.fromkeys(names))
