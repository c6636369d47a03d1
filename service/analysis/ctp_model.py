"""The learned CT perfusion core/penumbra model as a stage of the CT analysis: on the maps and the
brain mask the threshold method reads, the model's own core and penumbra, beside the threshold ones.

The model is fed exactly what it was trained on (``models/training/dataset.py`` calls the same
function): the analysis's CBF, CBV, Tmax and TTP maps, the temporal maximum intensity projection
of the series as received, and the NIHSS when one is known.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.findings import ModelInfo, Segment, SegmentKind
from service.imaging.geometry import Geometry
from service.inference.ctp_core_penumbra import predict_core_penumbra
from service.inference.ctp_inputs import CTP_CONTRACT, temporal_mip
from service.inference.model_set import ModelSet
from service.perfusion import thresholds

MODEL_NAME = "ctp-core-penumbra"
"""The shipped model file's name (``models/weights/ctp-core-penumbra.onnx``)."""

LABELS = {SegmentKind.CORE: "Ischemic core (model)", SegmentKind.PENUMBRA: "Penumbra (model)"}
"""SEG segment labels of the model's regions (beside "Ischemic core" and "Penumbra")."""


@dataclass(frozen=True)
class CtpModelRequest:
    """Run the CT perfusion model from ``models``, given the patient's NIHSS if known."""

    models: ModelSet
    nihss: int | None = None


@dataclass(frozen=True)
class ModelInputs:
    """What the model takes for one series, on the analysis's output grid ``[Z, Y, X]``."""

    maps: dict[str, np.ndarray]  # cbf, cbv, tmax (the analysis's) and ttp
    mip: np.ndarray  # HU
    brain: np.ndarray  # bool


@dataclass(frozen=True)
class ModelCorePenumbra:
    """The model's core and penumbra as segments, their summary, and what ran them."""

    segments: list[Segment]
    summary: thresholds.PerfusionSummary
    identity: ModelInfo
    nihss: int | None  # the NIHSS given to the model; None: it ran without one

    @property
    def note(self) -> str:
        """One line for the results saying which model ran and on what."""
        given = f"NIHSS {self.nihss} given" if self.nihss is not None else "no NIHSS known: imaging only"
        return f"CT perfusion model {self.identity.name} {self.identity.version} on {self.identity.backend}: {given}"


def load_ctp_model(models: ModelSet) -> bool:
    """Load the CT perfusion model of ``models`` ahead of the first study; False when it cannot be used."""
    return models.load(MODEL_NAME, CTP_CONTRACT)


def model_inputs(frames: np.ndarray, maps: dict[str, np.ndarray], brain: np.ndarray) -> ModelInputs:
    """The model's inputs from the frames ``[T, Z, Y, X]`` (HU, as received) and the analysis's
    maps and brain mask on the same grid."""
    return ModelInputs({name: maps[name] for name in ("cbf", "cbv", "tmax", "ttp")}, temporal_mip(frames), brain)


def run_ctp_model(request: CtpModelRequest, inputs: ModelInputs, geometry: Geometry, *, min_lesion_ml: float,
                  tmax_threshold_s: float, criteria: thresholds.Defuse3Criteria) -> ModelCorePenumbra:
    """The model's core and penumbra, specks below ``min_lesion_ml`` removed as for the threshold
    method. Raises ModelError when the model cannot be used, InputError when it cannot read this
    study (voxel sizes it was not trained on)."""
    with request.models.use(MODEL_NAME, CTP_CONTRACT) as engine:
        found = predict_core_penumbra(engine, inputs.maps, inputs.mip, inputs.brain, request.nihss, geometry.spacing)
        identity = engine.identity
    voxel_ml = geometry.voxel_volume_ml
    hypoperfused = thresholds.remove_specks(found.core | found.penumbra, min_lesion_ml, voxel_ml)
    core = thresholds.remove_specks(found.core, min_lesion_ml, voxel_ml) & hypoperfused
    penumbra = hypoperfused & ~core
    summary = thresholds.summarise(core, hypoperfused, inputs.maps["tmax"], inputs.brain, voxel_ml, criteria,
                                   hypoperfusion_tmax=tmax_threshold_s)
    segments = [
        Segment(SegmentKind.CORE, LABELS[SegmentKind.CORE], core, summary.core_ml, model=identity),
        Segment(SegmentKind.PENUMBRA, LABELS[SegmentKind.PENUMBRA], penumbra, summary.penumbra_ml, model=identity),
    ]
    return ModelCorePenumbra(segments, summary, identity, request.nihss if found.nihss_used else None)
