"""Sending result objects to one destination by C-STORE."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from service.config import Destination
from service.ingest.scp import no_delay_on_open

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SendOutcome:
    path: Path
    status: int | None  # None: not sent (no association, no context, connection lost)
    error: str | None

    @property
    def delivered(self) -> bool:
        """Success, or a warning status (the object was stored); a failure status is not a delivery."""
        return self.status is not None and (self.status == 0x0000 or self.status in (0x0001, 0x0107, 0x0116) or (self.status & 0xF000) == 0xB000)


def send_files(destination: Destination, paths: list[Path], calling_ae: str, timeout_s: float = 30.0) -> list[SendOutcome]:
    """C-STORE every file to ``destination`` over one association; one outcome per file."""
    datasets = [dcmread(p) for p in paths]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    for sop_class, syntax in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}):
        ae.add_requested_context(sop_class, [syntax])
    ae.add_requested_context(Verification)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                         evt_handlers=[(evt.EVT_CONN_OPEN, no_delay_on_open)])
    if not assoc.is_established:
        reason = "association rejected" if assoc.is_rejected else "association not established (connection refused or timed out)"
        return [SendOutcome(p, None, reason) for p in paths]
    outcomes = []
    try:
        for path, ds in zip(paths, datasets, strict=True):
            if not assoc.is_established:
                outcomes.append(SendOutcome(path, None, "association lost"))
                continue
            try:
                status = assoc.send_c_store(ds)
            except (ValueError, RuntimeError) as error:  # e.g. no accepted presentation context
                outcomes.append(SendOutcome(path, None, str(error)))
                continue
            code = int(status.Status) if "Status" in status else None
            outcomes.append(SendOutcome(path, code, None if code == 0 else f"status 0x{code:04X}" if code is not None else "no response"))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes
