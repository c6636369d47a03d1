"""Prometheus metrics: prefix ``strokegate_``, base units, no patient identifiers or UIDs in labels.

Every label value comes from a fixed set written here or in the code that counts, never from
received data as such: a sender must not be able to make new time series.
"""

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
BYTES_RECEIVED = Counter("strokegate_received_bytes_total", "Bytes of DICOM instances stored in the spool")
ASSOCIATIONS = Counter("strokegate_associations_total", "Association requests", ["result"])
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


MODALITY_LABELS = frozenset({"CT", "MR", "PT", "OT", "SEG", "SR"})
"""The ``modality`` label values besides "other" and "unknown" (no Modality)."""


def modality_label(modality: str | None) -> str:
    """The ``modality`` label of a received instance's Modality: one of a fixed set."""
    if not modality:
        return "unknown"
    return modality if modality in MODALITY_LABELS else "other"
