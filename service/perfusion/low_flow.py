"""Correction of the CT perfusion CBF of delayed tissue at low flow, where noise reads it high.

At clinical noise SVD deconvolution reads low flows too high (noise lifts the residue's maximum),
and the per-study bias correction (``service.perfusion.deconvolution``) applies one slow-side flow
factor that fits the penumbra, not the core. What the whole analysis reads, relative to the
contralateral reference, as a function of the true relative CBF (rCBF) and of the frames' noise is
measured on synthetic patients of the tuning phantom families (never the held-out one, never the
benchmark's seeds) by ``benchmarks/calibrate_low_flow.py`` and stored as a table
(``low_flow_calibration.json``); the analysis inverts it per voxel.

The table holds, per noise level, the median measured rCBF of delayed tissue (true Tmax > 6 s)
at each true rCBF: the measurement model, not a regression of the truth on the measurement, so
the inversion does not depend on how often each flow occurs in the calibration patients.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CALIBRATION_FILE = Path(__file__).with_name("low_flow_calibration.json")


@dataclass(frozen=True)
class LowFlowCalibration:
    """Median measured rCBF ``measured[k, i]`` of delayed tissue with true rCBF ``true_rcbf[i]`` in
    studies whose frame noise (``frame_noise_hu``, HU) is ``noise_hu[k]``; increasing along ``i``."""

    true_rcbf: np.ndarray
    noise_hu: np.ndarray
    measured: np.ndarray
    source: str = ""

    def __post_init__(self) -> None:
        t, n, m = (np.asarray(a, dtype=np.float64) for a in (self.true_rcbf, self.noise_hu, self.measured))
        if t.ndim != 1 or t.size < 2 or np.any(np.diff(t) <= 0):
            raise ValueError("true_rcbf must be an increasing sequence of at least 2 values")
        if n.ndim != 1 or n.size < 1 or np.any(np.diff(n) <= 0) or np.any(n <= 0):
            raise ValueError("noise_hu must be an increasing sequence of positive values")
        if m.shape != (n.size, t.size) or not np.all(np.isfinite(m)):
            raise ValueError(f"measured must be finite with shape {(n.size, t.size)}, got {m.shape}")
        object.__setattr__(self, "true_rcbf", t)
        object.__setattr__(self, "noise_hu", n)
        # Strictly increasing rows, so that each inverts to one value.
        object.__setattr__(self, "measured", np.maximum.accumulate(m, axis=1) + 1e-6 * np.arange(t.size))

    def to_json(self) -> str:
        return json.dumps({"true_rcbf": self.true_rcbf.round(4).tolist(), "noise_hu": self.noise_hu.round(3).tolist(),
                           "measured": self.measured.round(4).tolist(), "source": self.source}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> LowFlowCalibration:
        data = json.loads(text)
        return cls(np.asarray(data["true_rcbf"]), np.asarray(data["noise_hu"]), np.asarray(data["measured"]),
                   str(data.get("source", "")))


def load_calibration(path: Path = CALIBRATION_FILE) -> LowFlowCalibration:
    """The shipped calibration (or another one written by ``benchmarks/calibrate_low_flow.py``)."""
    return LowFlowCalibration.from_json(Path(path).read_text())


def frame_noise_hu(frames: np.ndarray, brain: np.ndarray) -> float:
    """Voxel noise SD (HU) of aligned frames ``[T, Z, Y, X]`` inside ``brain``: the median absolute
    frame-to-frame difference (the bolus changes tissue by a few HU per frame, noise by more)."""
    frames = np.asarray(frames)
    brain = np.asarray(brain, dtype=bool)
    if frames.ndim != 4 or brain.shape != frames.shape[1:]:
        raise ValueError(f"frames {frames.shape} and brain {brain.shape} do not fit together")
    if frames.shape[0] < 2 or not brain.any():
        raise ValueError("need at least 2 frames and a non-empty brain")
    voxels = np.flatnonzero(brain.ravel())
    voxels = voxels[:: max(1, voxels.size // 50000)]  # a spread sample is enough for a median
    curves = frames.reshape(frames.shape[0], -1)[:, voxels].astype(np.float32)
    diffs = np.diff(curves, axis=0)
    return 1.4826 * float(np.median(np.abs(diffs))) / np.sqrt(2.0)


def unbiased_rcbf(measured_rcbf: np.ndarray, noise_hu: float, calibration: LowFlowCalibration) -> np.ndarray:
    """The true rCBF whose median measurement at ``noise_hu`` is ``measured_rcbf`` (any shape).

    Each noise row is inverted (monotone interpolation); between rows the answer is interpolated
    in log noise, beyond the outer rows the nearest row is used. Above the table's last measured
    value the measurement is taken as it is shifted by the table's last difference, so normal
    flows pass through continuously.
    """
    measured = np.asarray(measured_rcbf, dtype=np.float64)
    if not np.isfinite(noise_hu) or noise_hu <= 0:
        raise ValueError(f"noise_hu must be positive, got {noise_hu}")
    log_noise = np.log(calibration.noise_hu)
    position = float(np.clip(np.log(noise_hu), log_noise[0], log_noise[-1]))
    k = int(np.clip(np.searchsorted(log_noise, position), 1, max(1, log_noise.size - 1)))

    def invert(row: np.ndarray) -> np.ndarray:
        top = row[-1]
        inside = np.interp(measured, row, calibration.true_rcbf)
        return np.where(measured > top, measured + (calibration.true_rcbf[-1] - top), inside)

    if log_noise.size == 1:
        return invert(calibration.measured[0])
    low, high = log_noise[k - 1], log_noise[k]
    weight = (position - low) / (high - low)
    return (1.0 - weight) * invert(calibration.measured[k - 1]) + weight * invert(calibration.measured[k])
