"""The embedded job queue (``job_queue: database``): worker threads of `strokegate serve` that claim
jobs from the database themselves. Nothing else to run; several serve processes sharing PostgreSQL
share the work through the row locks of the claims."""

from __future__ import annotations

import logging
import threading

from service.jobs.runner import JobRunner
from service.ops.loops import Loop
from service.ops.owners import new_owner

log = logging.getLogger(__name__)


class DatabasePool:
    """``count`` threads, each claiming and running one job at a time."""

    def __init__(self, runner: JobRunner, count: int = 1, poll_s: float = 0.5) -> None:
        self.runner = runner
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._wake = threading.Condition()
        self.loops = [Loop(f"worker-{i}", self._loop) for i in range(count)]

    def start(self) -> None:
        threading.Thread(target=self.runner.warm_up, name="model-warm-up", daemon=True).start()
        for loop in self.loops:
            loop.start()

    def queued(self, job_ids: list[int]) -> None:
        """New jobs are in the database: idle threads look now instead of at their next poll."""
        with self._wake:
            self._wake.notify(len(job_ids))

    def stop(self) -> None:
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        for loop in self.loops:
            loop.stop()
        for loop in self.loops:
            loop.join(timeout=120)

    def _loop(self) -> None:
        owner = new_owner()
        while not self._stop.is_set():
            try:
                job = self.runner.claim(owner)
            except Exception as error:  # noqa: BLE001 - database hiccup; try again
                log.error("claiming a job failed: %s", error)
                job = None
            if job is None:
                with self._wake:
                    if not self._stop.is_set():
                        self._wake.wait(self.poll_s)
                continue
            self.runner.run(job.id, owner)
