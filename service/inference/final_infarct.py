"""The predicted final infarct of one scenario by its learned network: numpy in, numpy out.

``volumes`` (the channels of ``final_infarct_inputs``) and ``brain`` are on one grid
``[slice, row, column]``; slices are padded to the network's size multiple and cropped back.
Pixels of a size the network was not trained on are resampled in-plane to the card's pixel size
(the middle of its training range) and the prediction resampled back onto the study's grid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from skimage.transform import resize

from service.errors import InputError
from service.inference.card import ModelCard
from service.inference.engine import Engine
from service.inference.final_infarct_inputs import LESION, LESION_THRESHOLD, normalise


@dataclass(frozen=True)
class FinalInfarct:
    """The network's answer: ``mask`` bool ``[Z, Y, X]`` (lesion probability >= 0.5 inside the
    brain) and the lesion probability float32 ``[Z, Y, X]``."""

    mask: np.ndarray
    probability: np.ndarray
    resampled_from_mm: tuple[float, float] | None = None  # the study's pixel size when it was resampled to the card's


def including_core(mask: np.ndarray, core: np.ndarray | None) -> np.ndarray:
    """``mask`` with the analysis's measured core added (bool, same grid). Tissue already infarcted
    at imaging stays infarcted whatever happens next, so a final infarct includes the core as
    measured; where the analysis over-calls the core, so does the prediction."""
    mask = np.asarray(mask, dtype=bool)
    if core is None:
        return mask.copy()
    core = np.asarray(core, dtype=bool)
    if core.shape != mask.shape:
        raise InputError(f"the measured core's grid {core.shape} differs from the prediction's {mask.shape}")
    return mask | core


def trained_pixel_mm(card: ModelCard) -> float:
    """The pixel size (mm) studies of other pixel sizes are resampled to: the middle of the card's range."""
    pixels = card.inputs.in_plane_spacing_mm
    return (pixels.low + pixels.high) / 2.0


def predict_final_infarct(engine: Engine, volumes: Mapping[str, np.ndarray], brain_mask: np.ndarray,
                          spacing_mm: Sequence[float], *, batch: int = 8) -> FinalInfarct:
    """Raises InputError when the slices are of a thickness the network was not trained on or the brain is empty."""
    card = engine.card
    spacing = tuple(float(s) for s in spacing_mm)
    if not card.inputs.slice_spacing_mm.holds(spacing[0]):
        raise InputError(
            f"model {card.name} was trained on {card.inputs.slice_spacing_mm.low:g}-{card.inputs.slice_spacing_mm.high:g} mm "
            f"slices; this study has {spacing[0]:g} mm slices"
        )
    brain = np.asarray(brain_mask, dtype=bool)
    if not brain.any():
        raise InputError("no brain in the mask: nothing for the model to predict")
    images = normalise(volumes, brain, card.inputs.channels)
    if all(card.inputs.in_plane_spacing_mm.holds(s) for s in spacing[1:]):
        lesion = _lesion(engine, images, brain, card.inputs.size_multiple, batch)
        return FinalInfarct((lesion >= LESION_THRESHOLD) & brain, lesion)
    z, channels, h, w = images.shape
    target = trained_pixel_mm(card)
    shape = (max(1, round(h * spacing[1] / target)), max(1, round(w * spacing[2] / target)))
    resampled = resize(images, (z, channels, *shape), order=1, preserve_range=True).astype(np.float32)
    on_grid = resize(brain.astype(np.float32), (z, *shape), order=1, preserve_range=True) >= 0.5
    if not on_grid.any():
        raise InputError(f"no brain left after resampling {spacing[1]:g} x {spacing[2]:g} mm pixels to {target:g} mm")
    coarse = _lesion(engine, resampled, on_grid, card.inputs.size_multiple, batch)
    lesion = resize(coarse, (z, h, w), order=1, preserve_range=True).astype(np.float32) * brain
    return FinalInfarct((lesion >= LESION_THRESHOLD) & brain, lesion, (spacing[1], spacing[2]))


def _lesion(engine: Engine, images: np.ndarray, brain: np.ndarray, multiple: int, batch: int) -> np.ndarray:
    """Lesion probability ``[Z, Y, X]`` of normalised ``images`` ``[Z, C, Y, X]`` inside ``brain``."""
    z, _, h, w = images.shape
    ph, pw = -h % multiple, -w % multiple
    images = np.pad(images, ((0, 0), (0, 0), (0, ph), (0, pw)))
    brains = np.pad(brain, ((0, 0), (0, ph), (0, pw)))[:, None].astype(np.float32)
    lesion = np.empty((z, h + ph, w + pw), dtype=np.float32)
    for start in range(0, z, batch):
        part = slice(start, start + batch)
        lesion[part] = engine.predict({"maps": images[part], "brain": brains[part]})[:, LESION]
    return lesion[:, :h, :w]
