"""Indicator-dilution model of contrast passage: arterial input, residue functions, tissue curves.

Conventions (the same ones the perfusion analysis inverts):

    C(t) = (rho / k_H) * CBF / 6000 * (AIF conv R)(t - delay)
    CBV  = CBF * MTT / 60                      [mL/100 g]
    Tmax = delay                               (R peaks at 0 for both residue shapes)

with CBF in mL/100 g/min, MTT and delay in s, rho = 1.04 g/mL brain density and k_H = 0.73 the
large-to-small-vessel haematocrit correction; C and AIF share units (HU for CT, dR2* in 1/s for MR).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

RHO = 1.04
K_H = 0.73
FLOW_SCALE = RHO / K_H / 6000.0  # (C / AIF-integral) per unit CBF
RESIDUES = ("exponential", "boxcar")
FINE_DT = 0.1  # s, integration step of the tissue curves


@dataclass(frozen=True)
class GammaVariate:
    """Bolus curve ``peak * (u)^alpha * exp(alpha * (1 - u))``, ``u = (t - arrival) / time_to_peak``."""

    arrival: float  # s after the first frame
    time_to_peak: float  # s from arrival to the peak
    alpha: float
    peak: float  # curve units

    def __call__(self, t: np.ndarray) -> np.ndarray:
        u = np.clip((np.asarray(t, dtype=np.float64) - self.arrival) / self.time_to_peak, 0.0, None)
        return self.peak * u**self.alpha * np.exp(self.alpha * (1.0 - u))

    def area(self) -> float:
        """Exact integral over all time."""
        from scipy.special import gamma

        return float(self.peak * self.time_to_peak * np.exp(self.alpha) * gamma(self.alpha + 1) / self.alpha ** (self.alpha + 1))

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Recirculating:
    """A first pass followed by the recirculation: a later, wider and smaller second pass."""

    first: GammaVariate
    second: GammaVariate

    @property
    def arrival(self) -> float:
        return self.first.arrival

    def __call__(self, t: np.ndarray) -> np.ndarray:
        return self.first(t) + self.second(t)

    def area(self) -> float:
        return self.first.area() + self.second.area()

    def as_dict(self) -> dict[str, float]:
        return {**self.first.as_dict(), **{f"recirculation_{k}": v for k, v in self.second.as_dict().items()}}


Bolus = GammaVariate | Recirculating
"""A bolus curve: ``bolus(t)``, ``bolus.area()``, ``bolus.arrival``."""


def recirculating(first: GammaVariate, share: float) -> Recirculating:
    """``first`` and its recirculation: ``share`` of its area, arriving as it peaks plus 8 s, twice as wide."""
    shape = GammaVariate(first.arrival + first.time_to_peak + 8.0, 2.0 * first.time_to_peak, first.alpha, 1.0)
    return Recirculating(first, replace(shape, peak=share * first.area() / shape.area()))


def venous_outflow(aif: GammaVariate, lag: float, widening: float) -> GammaVariate:
    """The venous output: later, wider, and with the same area as the true arterial input."""
    wider = GammaVariate(
        arrival=aif.arrival + lag,
        time_to_peak=aif.time_to_peak * widening,
        alpha=aif.alpha / widening,
        peak=1.0,
    )
    return GammaVariate(wider.arrival, wider.time_to_peak, wider.alpha, aif.area() / wider.area())


def tissue_curves(
    times: np.ndarray,
    aif: GammaVariate,
    cbf: np.ndarray,
    mtt: np.ndarray,
    delay: np.ndarray,
    residue: str = "exponential",
    dt: float = FINE_DT,
) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free concentration curves and their time to peak for a set of voxels.

    ``cbf``, ``mtt`` and ``delay`` are 1-D arrays over voxels (mL/100 g/min, s, s); ``times`` the
    acquisition times (s). Returns (curves with shape (len(times), n_voxels), float32; TTP in s).
    The convolution is integrated on a ``dt`` grid: a recursive filter for the exponential residue,
    a window of the AIF's running integral for the boxcar.
    """
    if residue not in RESIDUES:
        raise ValueError(f"residue must be one of {RESIDUES}, got {residue!r}")
    times = np.asarray(times, dtype=np.float64)
    mtt = np.asarray(mtt, dtype=np.float64)
    delay = np.asarray(delay, dtype=np.float64)
    scale = (FLOW_SCALE * np.asarray(cbf, dtype=np.float64)).astype(np.float32)
    n_steps = int(np.ceil(times[-1] / dt)) + 1
    grid = np.arange(n_steps + 1) * dt
    table = aif(grid)  # AIF on the fine grid, lookups shifted by each voxel's delay
    cumulative = np.concatenate([[0.0], np.cumsum((table[1:] + table[:-1]) * dt / 2)])

    decay = np.exp(-dt / np.maximum(mtt, 1e-6)).astype(np.float32)
    arrival = _Shifted(table, delay / dt)
    if residue == "boxcar":
        entered, left = _Shifted(cumulative, delay / dt), _Shifted(cumulative, (delay + mtt) / dt)
    out = np.zeros((len(times), len(cbf)), dtype=np.float32)
    y_prev = np.zeros(len(cbf), dtype=np.float32)
    c_prev = np.zeros(len(cbf), dtype=np.float32)
    peak = np.zeros(len(cbf), dtype=np.float32)
    ttp = np.zeros(len(cbf), dtype=np.float32)
    k = 0
    for n in range(n_steps + 1):
        if residue == "exponential":
            c = arrival.at(n)
            y = decay * y_prev + np.float32(dt / 2) * (decay * c_prev + c)
            c_prev = c
        else:
            y = entered.at(n) - left.at(n)
        higher = y > peak
        peak[higher] = y[higher]
        ttp[higher] = n * dt
        while k < len(times) and times[k] <= n * dt:
            frac = np.float32((times[k] - (n - 1) * dt) / dt) if n else np.float32(1)
            out[k] = y_prev + frac * (y - y_prev)
            k += 1
        y_prev = y
    return out * scale, ttp


class _Shifted:
    """Linear interpolation of ``table`` at ``n - shift`` for every voxel, for integer steps n.

    The fractional part of ``n - shift`` does not depend on n, so it is computed once.
    """

    def __init__(self, table: np.ndarray, shift: np.ndarray) -> None:
        self.table = np.concatenate([[table[0]], table, [table[-1]]]).astype(np.float32)
        start = np.floor(-shift)
        self.start = start.astype(np.int64) + 1  # +1 for the padding in front
        self.weight = (-shift - start).astype(np.float32)

    def at(self, n: int) -> np.ndarray:
        i = np.clip(self.start + n, 0, len(self.table) - 2)
        lo = self.table[i]
        return lo + self.weight * (self.table[i + 1] - lo)


def residue_function(t: np.ndarray, mtt: float, residue: str = "exponential") -> np.ndarray:
    """R(t) for t >= 0: exp(-t/MTT) or a boxcar of length MTT (both have mean transit time MTT)."""
    t = np.asarray(t, dtype=np.float64)
    if residue == "exponential":
        return np.where(t >= 0, np.exp(-np.clip(t, 0, None) / mtt), 0.0)
    if residue == "boxcar":
        return ((t >= 0) & (t < mtt)).astype(np.float64)
    raise ValueError(f"residue must be one of {RESIDUES}, got {residue!r}")
