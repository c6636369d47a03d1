"""Core and penumbra of a CT perfusion study by the learned model: numpy in, numpy out.

For the CT perfusion analysis to call after its maps, beside the threshold method::

    engine = load_engine(models_dir / "ctp-core-penumbra.onnx", settings.inference_backend,
                         contract=CTP_CONTRACT, cache_dir=settings.engine_cache_dir)   # once
    mip = temporal_mip(frames)                                   # motion-corrected frames, HU
    found = predict_core_penumbra(engine, maps, mip, brain, nihss, spacing)   # maps hold the analysis's TTP
    found.core, found.penumbra, found.probabilities, found.nihss_used, engine.identity

``maps``, ``mip`` and ``brain`` are on one grid ``[slice, row, column]``: the working grid of the
analysis or the acquired one (512 x 512 acquisitions are averaged to the model's pixel size here
and the masks expanded back, as the analysis does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from service.errors import InputError
from service.inference.ctp_inputs import CLASSES, clinical_input, normalise
from service.inference.engine import Engine
from service.perfusion.ctp import block_average, block_expand

CORE, PENUMBRA = CLASSES.index("core"), CLASSES.index("penumbra")


@dataclass(frozen=True)
class CorePenumbra:
    """The model's answer on the grid it was given: masks bool ``[Z, Y, X]``, probabilities float32
    ``[Z, classes, Y, X]`` (class order ``CLASSES``), and whether NIHSS was given to the model."""

    core: np.ndarray
    penumbra: np.ndarray
    probabilities: np.ndarray
    nihss_used: bool


def predict_core_penumbra(
    engine: Engine,
    maps: Mapping[str, np.ndarray],
    mip: np.ndarray,
    brain_mask: np.ndarray,
    nihss: int | None,
    spacing_mm: Sequence[float],
    *,
    batch: int = 4,
) -> CorePenumbra:
    """Each voxel of the brain takes the class of highest probability (healthy, penumbra, core).

    ``maps``: ``cbf`` (mL/100 g/min), ``cbv`` (mL/100 g), ``ttp``, ``tmax`` (s); ``mip`` HU; all
    ``[Z, Y, X]`` like ``brain_mask``. ``nihss`` None when unknown (the model was trained so).
    Raises InputError when the voxels are of a size the model was not trained on.
    """
    card = engine.card
    brain = np.asarray(brain_mask, dtype=bool)
    spacing = tuple(float(s) for s in spacing_mm)
    factor = 1
    while spacing[1] * factor < card.inputs.in_plane_spacing_mm.low and factor < 4:
        factor += 1
    working = (spacing[0], spacing[1] * factor, spacing[2] * factor)
    if not card.inputs.slice_spacing_mm.holds(working[0]) or not all(card.inputs.in_plane_spacing_mm.holds(s) for s in working[1:]):
        raise InputError(
            f"model {card.name} was trained on {card.inputs.in_plane_spacing_mm.low:g}-{card.inputs.in_plane_spacing_mm.high:g} mm "
            f"pixels and {card.inputs.slice_spacing_mm.low:g}-{card.inputs.slice_spacing_mm.high:g} mm slices; "
            f"this study has {spacing[1]:g} x {spacing[2]:g} mm pixels and {spacing[0]:g} mm slices"
        )
    if factor > 1:
        maps = {name: block_average(volume, factor) for name, volume in maps.items()}
        mip = block_average(mip, factor)
        brain = block_average(brain.astype(np.float32), factor) >= 0.5
    if not brain.any():
        raise InputError("no brain in the mask: nothing for the model to classify")
    images = normalise(maps, mip, brain)
    z, _, h, w = images.shape
    multiple = card.inputs.size_multiple
    ph, pw = -h % multiple, -w % multiple
    images = np.pad(images, ((0, 0), (0, 0), (0, ph), (0, pw)))
    brains = np.pad(brain, ((0, 0), (0, ph), (0, pw)))[:, None].astype(np.float32)
    clinical = clinical_input(nihss, z)
    probabilities = np.empty((z, len(CLASSES), h + ph, w + pw), dtype=np.float32)
    for start in range(0, z, batch):
        part = slice(start, start + batch)
        probabilities[part] = engine.predict({"maps": images[part], "brain": brains[part], "clinical": clinical[part]})
    probabilities = probabilities[:, :, :h, :w]
    label = probabilities.argmax(axis=1)
    core, penumbra = (label == CORE) & brain, (label == PENUMBRA) & brain
    if factor > 1:
        shape = np.asarray(brain_mask).shape[1:]
        core, penumbra = block_expand(core, factor, shape), block_expand(penumbra, factor, shape)
        probabilities = np.stack([block_expand(probabilities[:, k], factor, shape) for k in range(len(CLASSES))], axis=1)
    return CorePenumbra(core, penumbra, probabilities, nihss is not None)
