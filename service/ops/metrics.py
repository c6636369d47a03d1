"""Prometheus metrics: prefix ``strokegate_``, base units, no patient identifiers or UIDs in labels."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

import service

BUILD = Info("strokegate_build", "Build information")
BUILD.info({"version": service.__version__})

INSTANCES_RECEIVED = Counter(
    "strokegate_instances_received_total", "DICOM instances stored in the spool", ["modality", "sop_class"]
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
DELIVERY_ATTEMPTS = Counter("strokegate_delivery_attempts_total", "C-STORE attempts of result objects", ["result"])
DELIVERY_FAILURES = Counter("strokegate_delivery_failures_total", "Failed C-STORE attempts of result objects")
SPOOL_BYTES = Gauge("strokegate_spool_bytes", "Bytes of DICOM files in the spool")
SPOOL_FREE_BYTES = Gauge("strokegate_spool_free_bytes", "Free bytes on the spool's file system")
LOOP_RESTARTS = Counter("strokegate_loop_restarts_total", "Background loops restarted after a crash", ["loop"])
RECEIVER_READY = Gauge(
    "strokegate_receiver_accepting", "1 while the receiver can make instances durable (journal open, spool writable, space)"
)
