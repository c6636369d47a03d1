"""The image input of a model, scaled channel by channel as its card's ``InputChannel`` says: the
one place both the CT perfusion and the MRI final-infarct inputs are made."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from service.inference.card import InputChannel, Normalisation


def scaled_channels(
    volumes: Mapping[str, np.ndarray], brain: np.ndarray, channels: Sequence[InputChannel], what: str = "inputs",
) -> np.ndarray:
    """Float32 ``[Z, channels, Y, X]`` in ``channels`` order, each ``[Z, Y, X]`` volume scaled as its
    channel says, the brain median being the study's own reference; ValueError naming what is
    wrong (``what``: the inputs' name in that message)."""
    brain = np.asarray(brain, dtype=bool)
    if not brain.any():
        raise ValueError("the brain mask is empty")
    missing = [c.name for c in channels if c.name not in volumes]
    if missing:
        raise ValueError(f"{what} lack {', '.join(missing)}")
    out = np.zeros((brain.shape[0], len(channels), *brain.shape[1:]), dtype=np.float32)
    for index, channel in enumerate(channels):
        volume = np.asarray(volumes[channel.name], dtype=np.float32)
        if volume.shape != brain.shape:
            raise ValueError(f"{channel.name} has shape {volume.shape}, the brain mask {brain.shape}")
        median = float(np.median(volume[brain]))
        if channel.normalisation is Normalisation.RATIO_TO_BRAIN_MEDIAN:
            value = volume / max(median, 1e-6)
        elif channel.normalisation is Normalisation.OFFSET_FROM_BRAIN_MEDIAN:
            value = (volume - median) / channel.scale
        else:
            value = volume / channel.scale
        value = np.clip(value, *channel.clip)
        if channel.outside_brain == "zero":
            value = np.where(brain, value, 0.0)
        out[:, index] = value
    return out
