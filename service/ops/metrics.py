"""Prometheus metrics: prefix ``strokegate_``, base units, no patient identifiers or UIDs in labels.

Every label value comes from a fixed set written here or in the code that counts, never from
received data as such: a sender must not be able to make new time series.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

import service

BUILD = Info("strokegate_build", "Build information")
BUILD.info({"version": service.__version__})

INSTANCES_RECEIVED = Counter(
    "strokegate_instances_received_total", "DICOM instances stored in the spool", ["modality", "sop_class"]
)
RECEIVE_SECONDS = Histogram(
    "strokegate_receive_seconds",
    "Per C-STORE: 'dataset', from its command to the last byte of its dataset (a sender held up by "
    "delayed acknowledgements shows here); 'durable', journalling it before Success (fdatasync)",
    ["phase"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5),
)
INSTANCES_REJECTED = Counter(
    "strokegate_instances_rejected_total", "C-STORE requests answered with a failure status", ["reason"]
)
INSTANCES_QUARANTINED = Counter(
    "strokegate_instances_quarantined_total",
    "Acknowledged instances kept in the spool's quarantine folder instead of being filed (see the log for why)",
    ["reason"],
)
FILING_FAILURES = Counter(
    "strokegate_filing_failures_total", "Attempts to file a journalled instance that failed to write (retried)"
)
BYTES_RECEIVED = Counter("strokegate_received_bytes_total", "Bytes of DICOM instances stored in the spool")
ASSOCIATIONS = Counter("strokegate_associations_total", "Association requests", ["result"])
CONNECTIONS_REFUSED = Counter(
    "strokegate_connections_refused_total", "TCP connections closed before association, by limit", ["reason"]
)
ASSOCIATIONS_ABORTED = Counter(
    "strokegate_associations_aborted_total", "Associations we aborted, by cause", ["reason"]
)
ASSOCIATIONS_ACTIVE = Gauge("strokegate_associations_active", "Associations open now")
SERIES_COMPLETED = Counter("strokegate_series_completed_total", "Series found complete")
STUDIES_COMPLETED = Counter("strokegate_studies_completed_total", "Study versions queued for analysis")
JOBS = Gauge("strokegate_jobs", "Jobs by state", ["state"])
JOBS_FAILED = Counter("strokegate_jobs_failed_total", "Jobs that ended failed", ["error"])
STAGE_SECONDS = Histogram(
    "strokegate_stage_duration_seconds",
    "Duration of each processing stage",
    ["stage"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
LAST_INSTANCE_TO_ACK = Histogram(
    "strokegate_last_instance_to_pacs_ack_seconds",
    "From a study version's last received instance to the PACS acknowledging its last result",
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
)
LAST_INSTANCE_TO_DECISION = Histogram(
    "strokegate_last_instance_to_seg_sr_ack_seconds",
    "From a study version's last received instance to the PACS acknowledging its SEG and SR (sent first)",
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
)
DELIVERY_ATTEMPTS = Counter("strokegate_delivery_attempts_total", "C-STORE attempts of result objects", ["result"])
DELIVERY_FAILURES = Counter("strokegate_delivery_failures_total", "Failed C-STORE attempts of result objects")
DELIVERY_CONFIRMATIONS = Counter(
    "strokegate_delivery_confirmations_total",
    "Uncertain result objects (sent, no response recorded) a destination was asked about by C-FIND, by answer"
    " (held: not sent again; absent, unknown: sent again)",
    ["answer"],
)
SPOOL_BYTES = Gauge("strokegate_spool_bytes", "Bytes of DICOM files in the spool")


class Reading(Collector):
    """A gauge for a reading taken now and then (free disk space): exported only once a value was
    read, so that an alert never sees a zero that nobody measured."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry = REGISTRY) -> None:
        self.name = name
        self.documentation = documentation
        self.registry = registry
        self._value: float | None = None
        self._lock = threading.Lock()
        registry.register(self)

    def set(self, value: float) -> None:
        with self._lock:
            self._value = float(value)

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            value = self._value
        if value is not None:
            yield GaugeMetricFamily(self.name, self.documentation, value=value)


SPOOL_FREE_BYTES = Reading("strokegate_spool_free_bytes", "Free bytes on the spool's file system, as last read")

LOOPS = ("dicom-receiver", "dicom-filer", "journal-flush", "recorder", "tracker", "sender", "worker", "http", "clinical",
         "hl7", "fhir")
"""The service's background loops, by the names of their threads (a pool's threads are NAME-0, NAME-1, ...)."""


class LoopHealth(Collector):
    """``strokegate_loop_up{loop}``: 1 while a background loop's thread is alive, 0 once a loop that
    ran in this process has ended (it died, or the service is stopping). Read from the live threads at
    each scrape, so a loop that dies by any path shows, with no code in the loop itself; a loop that is
    alive but stuck does not (the backlog and delivery alerts catch that)."""

    def __init__(self, loops: tuple[str, ...] = LOOPS) -> None:
        self._pattern = re.compile(rf"(?:{'|'.join(re.escape(loop) for loop in loops)})(?:-\d+)?")
        self._seen: set[str] = set()
        self._down: dict[str, Callable[[], bool]] = {}
        self._lock = threading.Lock()

    def watch(self, name: str, down: Callable[[], bool]) -> None:
        """Also read ``down()`` for the loop of thread ``name``: a loop whose thread lives on while it
        waits to restart after a crash (service.ops.loops) reads 0 meanwhile."""
        with self._lock:
            self._down[name] = down

    def describe(self) -> list[GaugeMetricFamily]:
        return [self._family()]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        alive = {t.name for t in threading.enumerate() if t.is_alive() and self._pattern.fullmatch(t.name)}
        with self._lock:
            down = {name for name, is_down in self._down.items() if is_down()}
            alive -= down
            self._seen |= alive | down
            seen = sorted(self._seen)
        family = self._family()
        for name in seen:
            family.add_metric([name], 1.0 if name in alive else 0.0)
        yield family

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily("strokegate_loop_up", "1 while a background loop runs, 0 once it has ended", labels=["loop"])


LOOP_HEALTH = LoopHealth()
REGISTRY.register(LOOP_HEALTH)

INFERENCE_SECONDS = Histogram(
    "strokegate_inference_seconds",
    "Duration of one run of a learned model (one batch), by model name and inference backend",
    ["model", "backend"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


MODALITY_LABELS = frozenset({"CT", "MR", "PT", "OT", "SEG", "SR"})
"""The ``modality`` label values besides "other" and "unknown" (no Modality)."""


def modality_label(modality: str | None) -> str:
    """The ``modality`` label of a received instance's Modality: one of a fixed set."""
    if not modality:
        return "unknown"
    return modality if modality in MODALITY_LABELS else "other"
LOOP_RESTARTS = Counter("strokegate_loop_restarts_total", "Background loops restarted after a crash", ["loop"])
RECEIVER_READY = Gauge(
    "strokegate_receiver_accepting", "1 while the receiver can make instances durable (journal open, spool writable, space)"
)
