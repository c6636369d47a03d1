"""What the outcome networks take, made from an MRI study's maps the same way in training and in
the service: the maps over their brain median (Tmax in tenths of 10 s), clipped, on a 64 x 64 grid;
seed 004's 2.5D slab (slices n-2, n, n+2 around the slice with the largest hypoperfused area, every
map) and seed 000's slice triplets (three consecutive slices of one map as a 3-channel image, the ratio maps
centred on their brain median)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

MRI_MAPS = ("adc", "dwi", "tmax", "cbf", "cbv")
"""Channel order of the MRI outcome inputs."""
CT_MAPS = ("cbf", "cbv", "tmax", "ttp")
"""Channel order of the CT outcome inputs (seed 000's CT modules)."""
GRID = 64
CLIP = (0.0, 4.0)
CENTRED_CLIP = (-1.0, 3.0)
TMAX_SCALE_S = 10.0
SLAB_OFFSETS = (-2, 0, 2)


def network_maps(maps: dict[str, np.ndarray], brain: np.ndarray, names: tuple[str, ...] = MRI_MAPS,
                 centred: bool = False) -> np.ndarray:
    """[len(names), Z, 64, 64] float32: each map over its brain median (Tmax and TTP / 10 s),
    clipped to 0-4, 0 outside the brain, resampled in-plane to 64 x 64.

    ``centred`` (seed 000's modules): the ratio maps as their departure from the brain median
    (ratio - 1, clipped to -1..3), so that normal tissue reads 0 like Tmax and TTP do and like
    the outside of the brain: the brain's size and shape then no longer fill the input, only
    what departs from normal does (uncentred, the modules fitted the head's size, which follows
    the outcome by chance in a small cohort, and not the lesion)."""
    out = []
    for name in names:
        values = np.asarray(maps[name], dtype=np.float64)
        if name in ("tmax", "ttp"):
            scaled = np.clip(values / TMAX_SCALE_S, *CLIP)
        else:
            inside = values[brain & (values > 0)]
            scaled = values / max(float(np.median(inside)) if inside.size else 1.0, 1e-6)
            scaled = np.clip(scaled - 1.0, *CENTRED_CLIP) if centred else np.clip(scaled, *CLIP)
        out.append(np.where(brain, scaled, 0.0))
    stacked = np.stack(out).astype(np.float32)
    z, y, x = stacked.shape[1:]
    if (y, x) != (GRID, GRID):
        stacked = ndimage.zoom(stacked, (1, 1, GRID / y, GRID / x), order=1)
    return np.ascontiguousarray(stacked, dtype=np.float32)


def lesion_slice(hypoperfused: np.ndarray, core: np.ndarray) -> int:
    """The slice with the largest lesion (hypoperfused or core) area; the middle one without a lesion."""
    area = (hypoperfused | core).sum(axis=(1, 2))
    return int(np.argmax(area)) if area.max(initial=0) > 0 else hypoperfused.shape[0] // 2


def slab_25d(network_input: np.ndarray, centre: int) -> np.ndarray:
    """[3 * maps, 64, 64]: slices centre-2, centre, centre+2 (clamped to the stack) of the first
    map, then of the second, and so on."""
    z = network_input.shape[1]
    picks = [int(np.clip(centre + offset, 0, z - 1)) for offset in SLAB_OFFSETS]
    return np.ascontiguousarray(network_input[:, picks].reshape(-1, *network_input.shape[2:]), dtype=np.float32)


def triplets(single_map: np.ndarray) -> np.ndarray:
    """[Z - 2, 3, 64, 64]: every three consecutive slices of one map (Z >= 3)."""
    z = single_map.shape[0]
    if z < 3:
        raise ValueError(f"slice triplets need at least 3 slices, the map has {z}")
    return np.ascontiguousarray(np.stack([single_map[i:i + 3] for i in range(z - 2)]), dtype=np.float32)
