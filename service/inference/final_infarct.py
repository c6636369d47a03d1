"""The predicted final infarct of one scenario by its learned network: numpy in, numpy out.

``volumes`` (the channels of ``final_infarct_inputs``) and ``brain`` are on one grid
``[slice, row, column]``; slices are padded to the network's size multiple and cropped back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from service.errors import InputError
from service.inference.engine import Engine
from service.inference.final_infarct_inputs import LESION, LESION_THRESHOLD, normalise


@dataclass(frozen=True)
class FinalInfarct:
    """The network's answer: ``mask`` bool ``[Z, Y, X]`` (lesion probability >= 0.5 inside the
    brain) and the lesion probability float32 ``[Z, Y, X]``."""

    mask: np.ndarray
    probability: np.ndarray


def predict_final_infarct(engine: Engine, volumes: Mapping[str, np.ndarray], brain_mask: np.ndarray,
                          spacing_mm: Sequence[float], *, batch: int = 8) -> FinalInfarct:
    """Raises InputError when the voxels are of a size the network was not trained on or the brain is empty."""
    card = engine.card
    spacing = tuple(float(s) for s in spacing_mm)
    if not card.inputs.slice_spacing_mm.holds(spacing[0]) or not all(card.inputs.in_plane_spacing_mm.holds(s) for s in spacing[1:]):
        raise InputError(
            f"model {card.name} was trained on {card.inputs.in_plane_spacing_mm.low:g}-{card.inputs.in_plane_spacing_mm.high:g} mm "
            f"pixels and {card.inputs.slice_spacing_mm.low:g}-{card.inputs.slice_spacing_mm.high:g} mm slices; "
            f"this study has {spacing[1]:g} x {spacing[2]:g} mm pixels and {spacing[0]:g} mm slices"
        )
    brain = np.asarray(brain_mask, dtype=bool)
    if not brain.any():
        raise InputError("no brain in the mask: nothing for the model to predict")
    images = normalise(volumes, brain, card.inputs.channels)
    z, _, h, w = images.shape
    multiple = card.inputs.size_multiple
    ph, pw = -h % multiple, -w % multiple
    images = np.pad(images, ((0, 0), (0, 0), (0, ph), (0, pw)))
    brains = np.pad(brain, ((0, 0), (0, ph), (0, pw)))[:, None].astype(np.float32)
    lesion = np.empty((z, h + ph, w + pw), dtype=np.float32)
    for start in range(0, z, batch):
        part = slice(start, start + batch)
        lesion[part] = engine.predict({"maps": images[part], "brain": brains[part]})[:, LESION]
    lesion = lesion[:, :h, :w]
    return FinalInfarct((lesion >= LESION_THRESHOLD) & brain, lesion)
