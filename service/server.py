"""The running service: receiver, recorder, tracker, job queue, sender and HTTP, started and stopped
together. Analysis runs in-process (job_queue database) or in `strokegate worker` processes (celery);
the state lives in the database and the spool."""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from datetime import datetime

import uvicorn

from service.analysis.clinical_revision import ClinicalReviser, StaleOutcome
from service.analysis.pipeline import AnalysisParameters
from service.clinical.fhir import FhirPoller
from service.clinical.hl7 import Hl7Listener
from service.clinical.nihss import NihssReport, record_nihss
from service.clinical.smart import SmartClient
from service.config import DicomTransport, JobQueueKind, Settings
from service.delivery.outbox import Sender, release_dead_claims
from service.dicomnet import tls
from service.errors import SetupError
from service.ingest.scp import Receiver, ReceiverConfig
from service.ingest.spool import Spool
from service.ingest.tracker import Recorder, Tracker, reconcile
from service.ops.http import create_app
from service.ops.loops import Loop, all_up
from service.jobs import lease
from service.jobs.queue import job_queue
from service.jobs.runner import JobRunner
from service.ops.startup import bind, check_broker, open_database, port_problem, private_folder
from service.store import tokens
from service.store.database import Database

log = logging.getLogger(__name__)


class StrokeGate:
    """One service instance built from ``settings``."""

    def __init__(self, settings: Settings, http: bool = True, db: Database | None = None) -> None:
        """Opens (and migrates) the database unless given ``db`` (open_database), creates the
        folders owner-only and loads the TLS files; a SetupError says what to change when one of
        them cannot be used."""
        self.settings = settings
        private_folder(settings.spool_dir, "spool", "spool_dir")
        private_folder(settings.results_dir, "results", "results_dir")
        self.db = db or open_database(settings.database_url)
        self.spool = Spool(settings.spool_dir)
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
                tls=_receiver_tls(settings), accept_plain=settings.dicom_transport != DicomTransport.TLS,
            ),
            self.spool,
            self.recorder.record,
        )
        self.sender = Sender(self.db, settings.results_dir, settings.ae_title, settings.delivery_backoff_s,
                             settings.delivery_backoff_max_s, settings.destinations, tls=_destination_tls(settings))
        if settings.job_queue == JobQueueKind.CELERY:
            check_broker(settings.broker_url)
        self.reviser = ClinicalReviser(
            self.db, settings.results_dir, {d.name: frozenset(d.send) for d in settings.destinations},
            on_results=self.sender.wake, on_outcome_stale=self.on_outcome_stale,
        )
        runner = job_runner(settings, self.db, on_results=self.sender.wake, on_finished=self.reviser.wake)
        self.jobs = job_queue(settings, self.db, runner)
        self.tracker = Tracker(self.db, self.spool, settings.series_idle_s, settings.retention_hours,
                               unsettled_since=self._unsettled_since, on_queued=self.jobs.queued)
        self.hl7: Hl7Listener | None = None
        self.fhir = None if settings.fhir_base_url is None else FhirPoller(
            self.db, settings.fhir_base_url, self.record_nihss, search_for_s=settings.fhir_search_for_s,
            poll_s=settings.fhir_poll_s, timeout_s=settings.fhir_timeout_s, smart=smart_client(settings),
        )
        self._running = False
        self._http: uvicorn.Server | None = None
        self._http_thread: threading.Thread | None = None
        self._http_socket: socket.socket | None = None
        if http:
            app = create_app(self.db, self.ready, api_auth=settings.api_auth, metrics_auth=settings.metrics_auth,
                             docs=settings.api_docs, wake_sender=self.sender.wake, record_nihss=self.record_nihss)
            config = uvicorn.Config(app, host=settings.http_host, port=settings.http_port, log_level="warning",
                                    lifespan="off", log_config=None, ssl_certfile=settings.http_tls_certificate,
                                    ssl_keyfile=settings.http_tls_key)
            try:
                config.load()
            except (OSError, ssl.SSLError) as error:
                raise SetupError(f"cannot load the HTTPS certificate {settings.http_tls_certificate} with key "
                                 f"{settings.http_tls_key} ({error.strerror or error}): give PEM files readable by "
                                 "this user, the key unencrypted and matching the certificate") from None
            self._http = uvicorn.Server(config)

    @property
    def loops(self) -> list[Loop]:
        """Every background loop, each restarted after a crash."""
        clinical = [self.reviser.loop, *(p.loop for p in (self.hl7, self.fhir) if p is not None)]
        return [*self.receiver.loops, self.recorder.loop, self.tracker.loop, *self.jobs.loops, self.sender.loop,
                *clinical]

    def record_nihss(self, report: NihssReport) -> bool:
        """Store an NIHSS received by any way in and have the clinical results looked at; True when
        it is new (False: this message or resource version was stored before)."""
        _, new = record_nihss(self.db, report)
        if new:
            self.reviser.wake()
        return new

    def on_outcome_stale(self, stale: StaleOutcome) -> None:
        """A study version's clinical input changed and its new report (the outcomes recomputed by the
        reviser) and summary image are queued: logged, for whoever else must know."""
        log.info("study version %d: clinical revision %d queued (%s%s)", stale.version, stale.revision,
                 stale.nihss.describe() if stale.nihss else "NIHSS not available",
                 ", with a new summary image" if stale.summary is not None else "")

    def ready(self) -> bool:
        """Readiness: started, every background loop up, and the receiver able to make instances
        durable (journal and spool writable, free space above min_free_bytes)."""
        return self._running and all_up(self.loops) and self.receiver.accepting

    def _unsettled_since(self) -> datetime | None:
        """The oldest acknowledged instance not yet in the database: unfiled, or filed and queued."""
        times = [t for t in (self.receiver.unfiled_since(), self.recorder.unrecorded_since()) if t is not None]
        return min(times) if times else None

    def start(self) -> None:
        """Recover what a crash left, then start every component; the ports are bound before any
        thread starts, so that a port in use ends the start (SetupError) with nothing running."""
        if self._http is not None:
            self._http_socket = bind(self.settings.http_host, self.settings.http_port, "HTTP", "--http-port")
        journalled = self.receiver.recover()
        if journalled:
            log.info("recovered after restart: %d journalled instances filed into the spool", journalled)
        recovered = reconcile(self.spool, self.db)
        released = lease.release_dead_leases(self.db)
        unclaimed = release_dead_claims(self.db)
        if recovered or released or unclaimed:
            log.info("recovered after restart: %d instances recorded, %d jobs requeued, %d deliveries due again",
                     recovered, released, unclaimed)
        if self.settings.hl7_port is not None:
            try:
                self.hl7 = Hl7Listener(
                    self.settings.hl7_host, self.settings.hl7_port, self.record_nihss,
                    max_message_bytes=self.settings.hl7_max_message_bytes,
                    max_connections=self.settings.hl7_max_connections, timeout_s=self.settings.network_timeout_s,
                    receiver=self.settings.ae_title,
                )
            except OSError as error:
                if self._http_socket is not None:
                    self._http_socket.close()
                raise SetupError(port_problem(error, self.settings.hl7_host, self.settings.hl7_port, "HL7",
                                              "--hl7-port")) from None
        try:
            self.receiver.start()
        except OSError as error:
            if self._http_socket is not None:
                self._http_socket.close()
            if self.hl7 is not None:
                self.hl7.stop()
            raise SetupError(port_problem(error, self.settings.host, self.settings.port, "DICOM", "--port")) from None
        self.recorder.start()
        self.tracker.start()
        self.jobs.start()
        self.sender.start()
        self.reviser.start()
        if self.hl7 is not None:
            self.hl7.start()
        if self.fhir is not None:
            self.fhir.start()
        if self._http is not None:
            self._http_thread = threading.Thread(target=self._http.run, args=([self._http_socket],), name="http", daemon=True)
            self._http_thread.start()
        self._running = True
        self._warn_about_exposure()

    def _warn_about_exposure(self) -> None:
        """Say at start what an operator may not have meant: no destination, a receiver open to
        any sender, an API without tokens."""
        settings = self.settings
        if not settings.destinations:
            log.warning("no destination set: results stay in %s and are sent nowhere; add --destination AE@host:port",
                        settings.results_dir)
        if _loopback(settings.host):
            log.info("the DICOM receiver listens on %s only: a PACS on another machine reaches it once host is set "
                     "to an address of this machine it can reach (--host)", settings.host)
        elif not settings.allowed_calling_aets and not settings.allowed_hosts:
            log.warning("any host may send studies to %s:%d: set allowed_hosts and allowed_calling_aets to your PACS",
                        settings.host, self.dicom_port)
        if not settings.api_auth:
            log.warning("api_auth is false: anyone who reaches %s:%d may read /api and act as an operator",
                        settings.http_host, settings.http_port)
        elif self._http is not None and not tokens.any_active(self.db):
            log.info("no API token yet: create one with strokegate token create --role operator --name NAME")

    @property
    def dicom_port(self) -> int:
        return self.receiver.port

    @property
    def hl7_port(self) -> int | None:
        return self.hl7.port if self.hl7 is not None else None

    @property
    def http_port(self) -> int | None:
        if self._http_socket is None:
            return None
        return self._http_socket.getsockname()[1]

    def stop(self) -> None:
        """Stop taking new work first, then let the rest finish."""
        self._running = False
        self.receiver.stop()
        if self.hl7 is not None:
            self.hl7.stop()
        if self.fhir is not None:
            self.fhir.stop()
        self.recorder.stop()
        self.tracker.stop()
        self.jobs.stop()
        self.reviser.stop()
        self.sender.stop()
        if self._http is not None:
            self._http.should_exit = True
            if self._http_thread is not None:
                self._http_thread.join(timeout=10)
        self.db.dispose()


def job_runner(settings: Settings, db: Database, on_results: Callable[[], None] | None = None,
               on_finished: Callable[[], None] | None = None) -> JobRunner:
    """What runs a claimed job, as ``settings`` configure the analysis and the destinations."""
    return JobRunner(
        db, settings.spool_dir, settings.results_dir, AnalysisParameters.from_settings(settings),
        {d.name: frozenset(d.send) for d in settings.destinations}, settings.job_lease_s, settings.job_max_attempts,
        on_results=on_results, on_finished=on_finished,
    )


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _receiver_tls(settings: Settings) -> ssl.SSLContext | None:
    if settings.dicom_transport == DicomTransport.PLAIN:
        return None
    return tls.server_context(settings.tls_certificate, settings.tls_key, settings.tls_ca,
                              settings.tls_require_client_certificate)


def _destination_tls(settings: Settings) -> dict[str, ssl.SSLContext]:
    """The TLS context of each destination sent to over DICOM TLS, by name."""
    return {
        d.name: tls.client_context(d.tls_ca or settings.tls_ca, settings.tls_certificate, settings.tls_key,
                                   d.tls_check_hostname)
        for d in settings.destinations if d.tls
    }


def smart_client(settings: Settings) -> SmartClient | None:
    """The SMART Backend Services client the settings describe, or None (FHIR without a token);
    SetupError, one line, when its private key cannot be read."""
    if settings.fhir_token_url is None or settings.fhir_client_id is None:
        return None
    try:
        if settings.fhir_private_key is not None:
            return SmartClient.from_key_file(settings.fhir_token_url, settings.fhir_client_id, settings.fhir_private_key,
                                             settings.fhir_key_id, settings.fhir_scope)
        secret = settings.fhir_client_secret.get_secret_value() if settings.fhir_client_secret is not None else None
        return SmartClient(settings.fhir_token_url, settings.fhir_client_id, client_secret=secret, scope=settings.fhir_scope)
    except ValueError as error:
        raise SetupError(f"{error}: fix fhir_private_key (a PEM RSA key readable by StrokeGate) or the SMART settings") from None
