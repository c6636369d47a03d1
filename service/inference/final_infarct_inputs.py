"""What the final-infarct networks (seed 001) are fed, one network per reperfusion scenario.

MRI: the diffusion (high-b DWI, ADC) and DSC perfusion maps (Tmax, CBF, CBV) the service's MRI
analysis computes, on the diffusion grid, normalised per study inside the brain mask. CT: the CT
perfusion analysis's CBF, CBV, TTP and Tmax and the series' temporal MIP, channels exactly as
the CT core/penumbra model's (``ctp_inputs.CTP_CHANNELS``), without the NIHSS. Pure
functions over numpy arrays ``[slice, row, column]``; training (``models.training.final_infarct``)
calls the same ones, so the networks see in training exactly what the service gives them.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

import numpy as np

from service.inference.card import Contract, InputChannel, Normalisation, TensorSpec
from service.inference.channels import scaled_channels
from service.inference.ctp_inputs import CTP_CHANNELS

CLASSES = ("background", "healthy", "lesion")
LESION = CLASSES.index("lesion")
LESION_THRESHOLD = 0.5
"""Seed 001: a voxel is predicted infarcted when its lesion probability is at least this."""


class Scenario(StrEnum):
    """Whether the patient is assumed reperfused (TICI 2b-3) or not."""

    REPERFUSED = "reperfused"
    NOT_REPERFUSED = "not-reperfused"

    @property
    def label(self) -> str:
        """The SEG segment label of this scenario's prediction."""
        return "Predicted final infarct if reperfused" if self is Scenario.REPERFUSED else "Predicted final infarct if not reperfused"


MRI_CHANNELS: tuple[InputChannel, ...] = (
    # DWI signal is uncalibrated: relative to the study's own brain median.
    InputChannel(name="dwi", unit="signal", normalisation=Normalisation.RATIO_TO_BRAIN_MEDIAN, clip=(0.0, 5.0), outside_brain="zero"),
    InputChannel(name="adc", unit="1e-6 mm2/s", normalisation=Normalisation.SCALE, scale=1000.0, clip=(0.0, 3.0), outside_brain="zero"),
    InputChannel(name="tmax", unit="s", normalisation=Normalisation.SCALE, scale=10.0, clip=(0.0, 3.0), outside_brain="zero"),
    # DSC flow and volume are relative: to the study's brain median.
    InputChannel(name="cbf", unit="mL/100 g/min", normalisation=Normalisation.RATIO_TO_BRAIN_MEDIAN, clip=(0.0, 5.0), outside_brain="zero"),
    InputChannel(name="cbv", unit="mL/100 g", normalisation=Normalisation.RATIO_TO_BRAIN_MEDIAN, clip=(0.0, 5.0), outside_brain="zero"),
)


CHANNELS: dict[str, tuple[InputChannel, ...]] = {"mri": MRI_CHANNELS, "ct": CTP_CHANNELS}
"""Each modality's inputs, in the networks' channel order."""


def model_name(modality: str, scenario: Scenario) -> str:
    """The shipped file's name, e.g. ``mri-final-infarct-reperfused``."""
    return f"{modality}-final-infarct-{scenario.value}"


def contract(modality: str, scenario: Scenario) -> Contract:
    """What the service feeds the ``modality`` network of ``scenario`` and reads back."""
    if modality not in CHANNELS:
        raise ValueError(f"no final-infarct inputs defined for {modality!r}: use {' or '.join(CHANNELS)}")
    channels = CHANNELS[modality]
    return Contract(
        task=f"{modality}-final-infarct-{scenario.value}",
        tensors=(
            TensorSpec(name="maps", dtype="float32", shape=("batch", len(channels), "height", "width")),
            TensorSpec(name="brain", dtype="float32", shape=("batch", 1, "height", "width")),
        ),
        channels=channels,
        clinical=(),
        output=TensorSpec(name="probabilities", dtype="float32", shape=("batch", len(CLASSES), "height", "width")),
        classes=CLASSES,
    )


def normalise(volumes: Mapping[str, np.ndarray], brain: np.ndarray, channels: tuple[InputChannel, ...] = MRI_CHANNELS) -> np.ndarray:
    """The image input: float32 ``[Z, channels, Y, X]`` in ``channels`` order, each channel
    scaled as its ``InputChannel`` says, the brain median being the study's own reference."""
    present = {c.name: np.nan_to_num(np.asarray(volumes[c.name], dtype=np.float32)) for c in channels if c.name in volumes}
    return scaled_channels(present, brain, channels)
