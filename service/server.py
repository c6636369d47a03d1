"""The running service: receiver, recorder, tracker, workers, sender and HTTP, started and stopped
together. Everything is in-process; the state lives in the database and the spool."""

from __future__ import annotations

import logging
import threading
from datetime import datetime

import uvicorn

from service.analysis.pipeline import AnalysisParameters
from service.analysis.worker import Workers
from service.config import Settings
from service.delivery.outbox import Sender
from service.ingest.scp import Receiver, ReceiverConfig
from service.ingest.spool import Spool
from service.ingest.tracker import Recorder, Tracker, reconcile
from service.ops.http import create_app
from service.ops.loops import Loop, all_up
from service.store import jobs
from service.store.database import Database

log = logging.getLogger(__name__)


class StrokeGate:
    """One service instance built from ``settings``."""

    def __init__(self, settings: Settings, http: bool = True) -> None:
        self.settings = settings
        self.db = Database(settings.database_url)
        self.spool = Spool(settings.spool_dir)
        settings.results_dir.mkdir(parents=True, exist_ok=True)
        self.recorder = Recorder(self.db, self.spool)
        self.receiver = Receiver(
            ReceiverConfig(
                ae_title=settings.ae_title, host=settings.host, port=settings.port, max_pdu=settings.max_pdu,
                max_associations=settings.max_associations, allowed_calling_aets=tuple(settings.allowed_calling_aets),
                allowed_hosts=tuple(settings.allowed_hosts), min_free_bytes=settings.min_free_bytes,
                network_timeout_s=settings.network_timeout_s, sync_each=settings.receive_sync,
                sync_interval_s=settings.receive_sync_interval_s, max_connections=settings.max_connections,
                max_associations_per_host=settings.max_associations_per_host,
                association_request_timeout_s=settings.association_request_timeout_s,
                max_instance_bytes=settings.max_instance_bytes,
            ),
            self.spool,
            self.recorder.record,
        )
        self.tracker = Tracker(self.db, self.spool, settings.series_idle_s, settings.retention_hours,
                               unsettled_since=self._unsettled_since)
        self.sender = Sender(self.db, settings.results_dir, settings.ae_title, settings.delivery_backoff_s,
                             settings.delivery_backoff_max_s, settings.destinations)
        self.workers = Workers(
            self.db, settings.spool_dir, settings.results_dir,
            AnalysisParameters.from_settings(settings),
            {d.name: frozenset(d.send) for d in settings.destinations}, settings.job_lease_s, settings.job_max_attempts,
            count=settings.workers, on_results=self.sender.wake,
        )
        self._running = False
        self._http: uvicorn.Server | None = None
        self._http_thread: threading.Thread | None = None
        if http:
            config = uvicorn.Config(create_app(self.db, self.ready), host=settings.http_host,
                                    port=settings.http_port, log_level="warning", lifespan="off")
            self._http = uvicorn.Server(config)

    @property
    def loops(self) -> list[Loop]:
        """Every background loop, each restarted after a crash."""
        return [*self.receiver.loops, self.recorder.loop, self.tracker.loop, *self.workers.loops, self.sender.loop]

    def ready(self) -> bool:
        """Readiness: started, every background loop up, and the receiver able to make instances
        durable (journal and spool writable, free space above min_free_bytes)."""
        return self._running and all_up(self.loops) and self.receiver.accepting

    def _unsettled_since(self) -> datetime | None:
        """The oldest acknowledged instance not yet in the database: unfiled, or filed and queued."""
        times = [t for t in (self.receiver.unfiled_since(), self.recorder.unrecorded_since()) if t is not None]
        return min(times) if times else None

    def start(self) -> None:
        """Migrate, recover what a crash left, then start every component."""
        self.db.upgrade()
        journalled = self.receiver.recover()
        if journalled:
            log.info("recovered after restart: %d journalled instances filed into the spool", journalled)
        recovered = reconcile(self.spool, self.db)
        released = jobs.release_dead_leases(self.db)
        if recovered or released:
            log.info("recovered after restart: %d instances recorded, %d jobs requeued", recovered, released)
        self.recorder.start()
        self.tracker.start()
        self.workers.start()
        self.sender.start()
        self.receiver.start()
        if self._http is not None:
            self._http_thread = threading.Thread(target=self._http.run, name="http", daemon=True)
            self._http_thread.start()
        self._running = True

    @property
    def dicom_port(self) -> int:
        return self.receiver.port

    @property
    def http_port(self) -> int | None:
        if self._http is None or not self._http.started:
            return None
        return self._http.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        """Stop taking new work first, then let the rest finish."""
        self._running = False
        self.receiver.stop()
        self.recorder.stop()
        self.tracker.stop()
        self.workers.stop()
        self.sender.stop()
        if self._http is not None:
            self._http.should_exit = True
            if self._http_thread is not None:
                self._http_thread.join(timeout=10)
        self.db.dispose()
