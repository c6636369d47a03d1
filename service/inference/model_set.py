"""The learned models of one process: each loaded on first use and then kept, shared by the
analysis threads (loading takes seconds, predicting is the per-study cost), one prediction at a
time per model (``Engine.predict`` is not re-entrant)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from service.errors import ModelError
from service.inference.card import Contract
from service.inference.engine import Backend, Engine, load_engine

log = logging.getLogger(__name__)


@dataclass(eq=True)
class ModelSet:
    """The models in ``folder`` (``<name>.onnx`` beside ``<name>.card.json``), run on ``backend``.

    A model that cannot be loaded (missing, refused by its card, no backend) raises ModelError
    with the reason each time it is asked for, without trying to load it again.
    """

    folder: Path
    backend: Backend = Backend.AUTO
    cache_dir: Path | None = None
    _engines: dict[str, Engine | ModelError] = field(default_factory=dict, compare=False, repr=False)
    _locks: dict[str, threading.Lock] = field(default_factory=dict, compare=False, repr=False)
    _loading: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    @contextmanager
    def use(self, name: str, contract: Contract) -> Iterator[Engine]:
        """The engine of model ``name``, held for this thread until the block ends."""
        engine = self._engine(name, contract)
        with self._locks[name]:
            yield engine

    def load(self, name: str, contract: Contract) -> bool:
        """Load model ``name`` now (at start, so that the first study does not wait seconds for it);
        False when it cannot be used (logged, and raised as ModelError when a study asks for it)."""
        try:
            self._engine(name, contract)
        except ModelError:
            return False
        return True

    def _engine(self, name: str, contract: Contract) -> Engine:
        with self._loading:
            if name not in self._engines:
                self._locks[name] = threading.Lock()
                path = self.folder / f"{name}.onnx"
                try:
                    if not path.is_file():
                        raise ModelError(f"model {name} is not installed: no {path}")
                    self._engines[name] = load_engine(path, self.backend, contract=contract, cache_dir=self.cache_dir)
                except ModelError as error:
                    log.error("model %s cannot be used: %s", name, error)
                    self._engines[name] = error
            loaded = self._engines[name]
        if isinstance(loaded, ModelError):
            raise ModelError(str(loaded))
        return loaded

    def close(self) -> None:
        """Free every loaded engine."""
        with self._loading:
            for loaded in self._engines.values():
                if not isinstance(loaded, ModelError):
                    loaded.close()
            self._engines.clear()
