"""What the CT perfusion core/penumbra model is fed: the maps the analysis computes, the time to
peak and the temporal maximum-intensity projection of the series, normalised per study.

Pure functions over numpy arrays in the house contract (volumes ``[slice, row, column]``, series
``[time, slice, row, column]`` HU, spacing ``(slice, row, column)`` mm). Training
(``models.training``) calls the same functions, so the model sees in training exactly what the
service gives it. ``CTP_CONTRACT`` is what the service feeds; a model whose card says otherwise is
refused (``card.check_contract``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from service.inference.card import Contract, InputChannel, Normalisation, TensorSpec
from service.inference.channels import scaled_channels

CTP_TASK = "ct-perfusion-core-penumbra"
CLASSES = ("healthy", "penumbra", "core")
NIHSS_MAX = 42

CTP_CHANNELS: tuple[InputChannel, ...] = (
    # Flow and volume relative to the study's own brain median: absolute values differ between
    # scanners, AIF choices and patients; what marks the core is flow relative to normal tissue.
    InputChannel(name="cbf", unit="mL/100 g/min", normalisation=Normalisation.RATIO_TO_BRAIN_MEDIAN, clip=(0.0, 5.0), outside_brain="zero"),
    InputChannel(name="cbv", unit="mL/100 g", normalisation=Normalisation.RATIO_TO_BRAIN_MEDIAN, clip=(0.0, 5.0), outside_brain="zero"),
    # TTP depends on when the bolus was injected; relative to the brain's median it is a delay.
    InputChannel(name="ttp", unit="s", normalisation=Normalisation.OFFSET_FROM_BRAIN_MEDIAN, scale=10.0, clip=(-3.0, 3.0), outside_brain="zero"),
    InputChannel(name="tmax", unit="s", normalisation=Normalisation.SCALE, scale=10.0, clip=(0.0, 3.0), outside_brain="zero"),
    # The MIP keeps the head around the brain (bone, vessels, CSF): the model sees where the brain ends.
    InputChannel(name="mip", unit="HU", normalisation=Normalisation.OFFSET_FROM_BRAIN_MEDIAN, scale=50.0, clip=(-3.0, 5.0), outside_brain="kept"),
)
CLINICAL = ("nihss / 42 (0 when unknown)", "nihss known (1) or not (0)")

CTP_CONTRACT = Contract(
    task=CTP_TASK,
    tensors=(
        TensorSpec(name="maps", dtype="float32", shape=("batch", len(CTP_CHANNELS), "height", "width")),
        TensorSpec(name="brain", dtype="float32", shape=("batch", 1, "height", "width")),
        TensorSpec(name="clinical", dtype="float32", shape=("batch", len(CLINICAL))),
    ),
    channels=CTP_CHANNELS,
    clinical=CLINICAL,
    output=TensorSpec(name="probabilities", dtype="float32", shape=("batch", len(CLASSES), "height", "width")),
    classes=CLASSES,
)



def temporal_mip(frames: np.ndarray) -> np.ndarray:
    """Maximum over time of a ``[T, Z, Y, X]`` series (HU): float32 ``[Z, Y, X]``."""
    frames = np.asarray(frames)
    if frames.ndim != 4:
        raise ValueError(f"frames must be [T, Z, Y, X], got shape {frames.shape}")
    return frames.max(axis=0).astype(np.float32)


def normalise(maps: Mapping[str, np.ndarray], mip: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """The image input: float32 ``[Z, channels, Y, X]`` in ``CTP_CHANNELS`` order.

    ``maps`` holds ``cbf`` (mL/100 g/min), ``cbv`` (mL/100 g), ``ttp`` and ``tmax`` (s) as
    ``[Z, Y, X]``; ``mip`` is HU; ``brain`` the analysis's brain mask (bool), whose median of
    each map is the study's own reference.
    """
    return scaled_channels({**maps, "mip": mip}, brain, CTP_CHANNELS, what="maps")


def clinical_input(nihss: int | None, slices: int) -> np.ndarray:
    """The clinical input for ``slices`` slices: ``[nihss / 42, known]`` per slice, float32."""
    if nihss is None:
        row = [0.0, 0.0]
    else:
        if not 0 <= nihss <= NIHSS_MAX:
            raise ValueError(f"NIHSS must lie in 0-{NIHSS_MAX}, got {nihss}")
        row = [nihss / NIHSS_MAX, 1.0]
    return np.tile(np.asarray(row, dtype=np.float32), (slices, 1))
