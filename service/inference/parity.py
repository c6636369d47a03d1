"""Does a loaded model give, on its bundled test input, the probabilities its card was made with?

The test input (``name.test.npz`` beside the model, named and hashed by the card) holds the input
tensors and the probabilities torch computed at export. A float32 backend must agree within the
card's tolerance (1e-4); a TensorRT FP16 engine within ``FP16_TOLERANCE``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.inference.card import verify_file
from service.inference.engine import Backend, Engine

FP16_TOLERANCE = 1e-2
"""Half precision carries ~3 significant digits; a probability off by more than this is a wrong engine."""


@dataclass(frozen=True)
class Parity:
    max_difference: float
    tolerance: float

    @property
    def holds(self) -> bool:
        return self.max_difference <= self.tolerance


def bundled_parity(engine: Engine, folder: Path) -> Parity:
    """Largest absolute probability difference between ``engine`` and the reference on the bundled input."""
    card = engine.card
    path = verify_file(folder, card.files.test_input)
    with np.load(path) as data:
        inputs = {t.name: data[t.name] for t in card.inputs.tensors}
        reference = data[card.outputs.tensor.name]
    difference = float(np.abs(engine.predict(inputs) - reference).max())
    fp16 = engine.identity.backend.startswith(Backend.TENSORRT.value) or "Tensorrt" in engine.identity.backend
    return Parity(difference, FP16_TOLERANCE if fp16 else card.parity.tolerance)
