"""Background loops that outlive their own bugs: a loop that raises is logged, counted, and run
again after a pause, and says it is down meanwhile, so that ``/readyz`` reports it.

Each loop already handles the failures it expects (a bad instance, a database hiccup) item by
item; this is the net under that, for the failure nobody expected.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from service.ops import metrics

log = logging.getLogger(__name__)


class Loop:
    """Runs ``target`` on a daemon thread until it returns (its own stop condition).

    If ``target`` raises, the loop is down for ``restart_delay_s`` (doubling on each crash in a
    row, at most ``max_delay_s``) and then runs ``target`` again; the target must therefore keep
    its state consistent at any point where it may raise.
    """

    def __init__(
        self, name: str, target: Callable[[], None], restart_delay_s: float = 1.0, max_delay_s: float = 30.0
    ) -> None:
        self.name = name
        self.target = target
        self.restart_delay_s = restart_delay_s
        self.max_delay_s = max_delay_s
        self.restarts = 0
        self._down = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        metrics.LOOP_HEALTH.watch(name, self._down.is_set)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """No more restarts (the target stops by its own condition); call before ``join``."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def up(self) -> bool:
        """Running its target: started, not between a crash and its restart, not ended."""
        return self._thread.is_alive() and not self._down.is_set()

    def _run(self) -> None:
        delay = self.restart_delay_s
        while True:
            started = time.monotonic()
            try:
                self.target()
                return
            except Exception:  # noqa: BLE001 - the loop's edge: log, count, restart
                if time.monotonic() - started > self.max_delay_s:
                    delay = self.restart_delay_s  # it had run well for a while: not a crash in a row
                self._down.set()
                self.restarts += 1
                metrics.LOOP_RESTARTS.labels(loop=self.name).inc()
                log.exception("background loop %s crashed; restarting in %.0f s", self.name, delay)
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, self.max_delay_s)
                self._down.clear()


class Rounds:
    """A background loop of rounds: ``round()`` runs at start, then every ``interval_s`` and at once
    on ``wake()``, until ``stop()``. A round that raises is logged and the next one tries again
    (the expected failure: a database hiccup); ``loop`` is the restarting thread under it.

    Subclasses define ``round``; a long round looks at ``stopping`` between its items."""

    failure = "round"
    """What a failed round was, for its log line."""

    def __init__(self, name: str, interval_s: float, join_timeout_s: float = 30.0) -> None:
        self.interval_s, self.join_timeout_s = interval_s, join_timeout_s
        self.stopping = threading.Event()
        self._wake = threading.Event()
        self.loop = Loop(name, self._run)

    def round(self) -> object:
        raise NotImplementedError

    def start(self) -> None:
        self.loop.start()

    def wake(self) -> None:
        """Run a round now rather than at the end of the interval."""
        self._wake.set()

    def stop(self) -> None:
        self.stopping.set()
        self._wake.set()
        self.loop.stop()
        self.loop.join(timeout=self.join_timeout_s)

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.round()
            except Exception as error:  # noqa: BLE001 - the next round tries again
                log.error("%s failed: %s", self.failure, error)
            self._wake.wait(self.interval_s)
            self._wake.clear()


def all_up(loops: Iterable[Loop]) -> bool:
    return all(loop.up for loop in loops)
