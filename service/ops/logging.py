"""Log format: one line per event, UTC time, level, component. No UIDs or patient identifiers.

Patient names, IDs and accession numbers are never logged. UIDs (study, series, SOP instance: they
lead back to a patient in the PACS) are replaced in every formatted line, tracebacks included, by a
tag: ``uid:`` and the first 8 hex digits of an HMAC-SHA256 of the UID under a key of this
installation. Lines about the same object carry the same tag, the tag does not give the UID back,
and ``strokegate log-tag UID`` prints a UID's tag so that an operator can find its lines.
Standard DICOM UIDs (``1.2.840.10008.*``: SOP classes, transfer syntaxes) and short dotted numbers
(addresses, versions) are left as they are.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from pathlib import Path

_DOTTED = re.compile(r"(?<![\d.])[0-2](?:\.\d+){2,}(?!\d)")
_DICOM_ROOT = "1.2.840.10008."
TAG_KEY_FILE = "log-tag.key"


def uid_tag(uid: str, key: bytes) -> str:
    """The tag that stands for ``uid`` in the logs of the installation with ``key``."""
    return "uid:" + hmac.new(key, uid.encode("ascii", "replace"), hashlib.sha256).hexdigest()[:8]


def _is_uid(text: str) -> bool:
    parts = text.split(".")
    if text.startswith(_DICOM_ROOT):
        return False
    return not (len(parts) <= 4 and all(len(p) <= 3 for p in parts))  # an IPv4 address or a version number


def redact(text: str, key: bytes) -> str:
    """``text`` with every UID replaced by its tag."""
    return _DOTTED.sub(lambda m: uid_tag(m[0], key) if _is_uid(m[0]) else m[0], text)


class RedactingFormatter(logging.Formatter):
    """The house format, with UIDs replaced by their tags in the whole line and its traceback."""

    def __init__(self, key: bytes) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%SZ")
        self.converter = time.gmtime
        self._key = key

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), self._key)


def tag_key(configured: str | None, folder: Path) -> bytes:
    """The installation's tag key: ``configured`` (the log_tag_key setting) or the one kept in
    ``folder`` (created owner-only at the first start)."""
    if configured:
        return configured.encode()
    path = folder / TAG_KEY_FILE
    if not path.exists():
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            with open(path, "x", opener=lambda name, flags: os.open(name, flags, 0o600)) as out:
                out.write(secrets.token_hex(32))
        except FileExistsError:  # another process made it first
            pass
    return path.read_text().strip().encode()


def configure(level: str = "INFO", key: bytes | None = None) -> None:
    """Log to stderr in the house format; ``key``: the tag key (None: one for this process only)."""
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter(key or secrets.token_bytes(32)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pynetdicom logs every PDU and highdicom every module it copies at INFO; keep them to warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its steps; open_database says what changed
    # httpx logs each request's URL at INFO, and a FHIR search URL holds the patient identifier.
    logging.getLogger("httpx").setLevel(logging.WARNING)
