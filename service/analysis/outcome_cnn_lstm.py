"""Seed 000's outcome model in the service: one CNN-LSTM module per MRI map (ONNX Runtime), each
giving P(mRS 3-6 at 90 days) from the map's slice triplets, fused by Algorithm 1 with the NIHSS
(``outcome_fusion``); without an NIHSS the plain mean, and the result says "imaging only".

The card (``models/weights/outcome-cnn-lstm.card.json``) names the modules' files, their maps,
Algorithm 1's thresholds, the NIHSS range and the recalibration fitted on validation patients.
A late NIHSS re-fuses the stored module probabilities (``recompute``): no map is read again.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from functools import cache
from pathlib import Path

import numpy as np

from service.analysis.outcome_fusion import FusionParameters, fuse
from service.analysis.outcome_model import OutcomeInputs
from service.errors import InputError, ModelError
from service.findings import FusionOutcomeRecord, ModelInfo, NihssUsed
from service.inference.outcome_card import FusionCard, read_fusion_card
from service.inference.outcome_inputs import MRI_MAPS, network_maps, triplets

try:
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

    ONNX_RUNTIME_ERRORS: tuple[type[Exception], ...] = (Fail, InvalidArgument, RuntimeException)
except ImportError:  # pragma: no cover - onnxruntime is a dependency; its private module may move
    ONNX_RUNTIME_ERRORS = (RuntimeError,)

DEFAULT_FUSION_CARD = Path(__file__).resolve().parents[2] / "models" / "weights" / "outcome-cnn-lstm.card.json"


def fusion_parameters(card: FusionCard) -> FusionParameters:
    """Algorithm 1's learned parameters as the card holds them."""
    return FusionParameters(tuple(card.thresholds), card.nihss_low, card.nihss_high, tuple(card.recalibration))


def fused_probability(card: FusionCard, modules: tuple[tuple[str, float], ...], nihss: NihssUsed | None) -> float:
    """P(mRS 3-6 at 90 days) from the modules' probabilities and the NIHSS (None: imaging only): the
    same arithmetic for a fresh prediction and for a late NIHSS."""
    expected = tuple(m.maps[0] for m in card.modules)
    if tuple(name for name, _ in modules) != expected:
        raise ModelError(f"the module probabilities are of {[n for n, _ in modules]}, the card's modules of {list(expected)}")
    p = np.array([[value for _, value in modules]], dtype=np.float64)
    values = None if nihss is None else np.array([float(nihss.value)])
    return float(fuse(p, values, fusion_parameters(card))[0])


class CnnLstmOutcomeModel:
    """Loaded once (one ONNX session per module, each checked against its card's sha256); ``predict``
    keeps no state, so one instance serves a process's worker threads."""

    def __init__(self, card_path: Path = DEFAULT_FUSION_CARD) -> None:
        import onnxruntime

        self.card = read_fusion_card(card_path)
        digest = hashlib.sha256()
        self.sessions = []
        for module in self.card.modules:
            if len(module.maps) != 1 or module.maps[0] not in MRI_MAPS:
                raise ModelError(f"the CNN-LSTM module {module.file} takes {module.maps}, not one of the MRI maps {MRI_MAPS}")
            path = card_path.parent / module.file
            try:
                data = path.read_bytes()
            except FileNotFoundError as error:
                raise ModelError(f"the CNN-LSTM module {path} is missing") from error
            module_digest = hashlib.sha256(data).hexdigest()
            if module_digest != module.sha256:
                raise ModelError(f"{path.name} does not match its card (sha256 {module_digest[:12]}, card {module.sha256[:12]})")
            digest.update(bytes.fromhex(module_digest))
            self.sessions.append(onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"]))
        # the model's identification: one digest over its modules' digests, in module order
        self.info = ModelInfo(self.card.name, self.card.version, digest.hexdigest(), "onnxruntime (CPUExecutionProvider)")

    def predict(self, study: OutcomeInputs) -> FusionOutcomeRecord:
        """The fused P(mRS 3-6 at 90 days) of a study (InputError when its maps cannot be used)."""
        names = tuple(m.maps[0] for m in self.card.modules)
        missing = [n for n in names if n not in study.maps]
        if missing:
            raise InputError(f"the CNN-LSTM outcome model needs the maps {missing}, which this study lacks")
        shape = study.brain.shape
        if any(np.shape(study.maps[n]) != shape for n in names):
            raise InputError("the CNN-LSTM outcome model's maps and brain mask differ in shape")
        if shape[0] < 3:
            raise InputError(f"the CNN-LSTM modules read three consecutive slices; the study has {shape[0]}")
        if not study.brain.any():
            raise InputError("the CNN-LSTM outcome model needs a brain mask with at least one voxel")
        maps = {n: np.asarray(study.maps[n], dtype=np.float32) for n in names}
        inputs = network_maps(maps, study.brain, names, centred=True)
        modules = []
        for index, (module, session) in enumerate(zip(self.card.modules, self.sessions, strict=True)):
            try:
                logit = float(session.run([module.output], {module.input: triplets(inputs[index])[None]})[0][0])
            except ONNX_RUNTIME_ERRORS as error:  # a network that does not take this input: no outcome, the imaging goes on
                raise ModelError(f"the CNN-LSTM module {module.file} refused the study's {names[index]} map: "
                                 f"{str(error).splitlines()[0][:200]}") from None
            modules.append((names[index], float(1.0 / (1.0 + np.exp(-logit)))))
        record = tuple(modules)
        return FusionOutcomeRecord(fused_probability(self.card, record, study.nihss), self.info, study.nihss, record)


def recompute(card: FusionCard, record: FusionOutcomeRecord, nihss: NihssUsed | None) -> FusionOutcomeRecord:
    """``record`` with ``nihss`` weighting the fusion: its stored module probabilities fused again.
    ModelError when the card is not the model that made it."""
    if card.name != record.model.name or card.version != record.model.version:
        raise ModelError(f"the outcome was made by {record.model.name} {record.model.version}, "
                         f"the loaded card is {card.name} {card.version}")
    return replace(record, probability=fused_probability(card, record.modules, nihss), nihss=nihss)


@cache
def cnn_lstm_model(card_path: Path = DEFAULT_FUSION_CARD) -> CnnLstmOutcomeModel:
    """The model of ``card_path``, loaded once per process."""
    return CnnLstmOutcomeModel(card_path)


@cache
def fusion_card(card_path: Path = DEFAULT_FUSION_CARD) -> FusionCard:
    """The card alone (what ``recompute`` needs), read once per process."""
    return read_fusion_card(card_path)
