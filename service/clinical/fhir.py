"""FHIR R4: the NIHSS of each new study's patient, searched on the EHR's FHIR server.

For every study first received less than ``search_for_s`` ago the poller searches, every
``poll_s``, ``Observation?patient.identifier=<PatientID>&code=http://loinc.org|72089-6,
http://loinc.org|70182-1`` and stores each Observation found as an NIHSS record (source id
``Observation/<id>/_history/<versionId>``, so a corrected Observation, a new version, is a new
record, and one seen again is not). It keeps searching through the whole window, so that an
Observation created after the study, or corrected, is found. The search names the identifier's
value only: DICOM's IssuerOfPatientID is not a FHIR identifier system, so the records carry no
issuer. The poller runs beside the imaging: a FHIR server that is down or slow delays only the
NIHSS (each request gives up after ``timeout_s``), never an imaging result.

Observations with status entered-in-error, cancelled or registered are skipped, as are those
without a numeric value. With a SMART client configured (``smart.SmartClient``: token URL, client
id, a private key or a client secret) every search carries an OAuth2 client-credentials bearer
token (SMART Backend Services), cached until it expires; a token that cannot be had fails the
search like a server that is down, in one line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

import httpx
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.observation import Observation
from pydantic import ValidationError
from sqlalchemy import select

from service.clinical.hl7 import NIHSS_CODES
from service.clinical.nihss import NihssReport, as_utc, parse_score
from service.clinical.smart import SmartAuth, SmartClient, SmartError, SmartTokens, bounded_body
from service.errors import InputError
from service.findings import NihssSource
from service.ops.loops import Rounds
from service.store.database import Database
from service.store.models import Study, utcnow

log = logging.getLogger(__name__)

LOINC = "http://loinc.org"
SKIPPED_STATUSES = ("entered-in-error", "cancelled", "registered")
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
MAX_PAGES = 5


class FhirError(Exception):
    """The FHIR server could not be asked, or answered something that is not a Bundle."""


def search_url(base_url: str) -> str:
    return base_url.rstrip("/") + "/Observation"


def search_parameters(patient_id: str) -> dict[str, str]:
    return {"patient.identifier": patient_id, "code": ",".join(f"{LOINC}|{code}" for code in NIHSS_CODES)}


def observation_report(observation: Observation, patient_id: str) -> NihssReport:
    """The NIHSS of one Observation; InputError saying why when it has none."""
    if observation.status in SKIPPED_STATUSES:
        raise InputError(f"status {observation.status}")
    codes = {(c.system, c.code) for c in (observation.code.coding or [])}
    if not any((LOINC, code) in codes for code in NIHSS_CODES):
        raise InputError("not coded LOINC 72089-6 or 70182-1")
    if observation.valueQuantity is not None and observation.valueQuantity.value is not None:
        value = parse_score(str(observation.valueQuantity.value))
    elif observation.valueInteger is not None:
        value = parse_score(str(observation.valueInteger))
    else:
        raise InputError("no valueQuantity or valueInteger")
    when = observation.effectiveDateTime or (observation.effectivePeriod.start if observation.effectivePeriod else None) \
        or observation.issued
    if when is None:
        raise InputError("no effective or issued time")
    if not isinstance(when, datetime):
        when = datetime(when.year, when.month, when.day)
    if not observation.id:
        raise InputError("no resource id")
    version = observation.meta.versionId if observation.meta and observation.meta.versionId else None
    if version is None and observation.meta and observation.meta.lastUpdated:
        version = observation.meta.lastUpdated.isoformat()
    source_id = f"Observation/{observation.id}" + (f"/_history/{version}" if version else "")
    return NihssReport(
        patient_id=patient_id, patient_issuer=None, value=value, assessed_at=as_utc(when), source=NihssSource.FHIR,
        source_id=source_id[:128], detail=f"status {observation.status}",
    )


def search_nihss(client: httpx.Client, base_url: str, patient_id: str) -> list[NihssReport]:
    """Every NIHSS the server holds for ``patient_id`` (at most MAX_PAGES pages); FhirError when
    the server cannot be asked or does not answer a Bundle."""
    reports: list[NihssReport] = []
    url: str | None = search_url(base_url)
    parameters: dict | None = search_parameters(patient_id)
    for _ in range(MAX_PAGES):
        bundle = _get_bundle(client, url, parameters)
        for entry in bundle.entry or []:
            resource = entry.resource
            if resource is None or resource.get_resource_type() != "Observation":
                continue
            try:
                reports.append(observation_report(resource, patient_id))
            except InputError as error:
                log.info("FHIR Observation/%s skipped: %s", resource.id, error)
        url = next((link.url for link in bundle.link or [] if link.relation == "next"), None)
        parameters = None
        if url is None:
            break
    return reports


def _get_bundle(client: httpx.Client, url: str, parameters: dict | None) -> Bundle:
    """One search page; errors name the URL without its query (which holds the patient identifier)."""
    where = url.split("?", 1)[0]
    try:
        with client.stream("GET", url, params=parameters, headers={"Accept": "application/fhir+json"}) as response:
            if response.status_code != 200:
                raise FhirError(f"{where} answered HTTP {response.status_code}")
            body = bounded_body(response, MAX_RESPONSE_BYTES)
            if body is None:
                raise FhirError(f"{where} answered more than {MAX_RESPONSE_BYTES} bytes")
    except httpx.HTTPError as error:
        raise FhirError(f"{where}: {type(error).__name__}: {str(error).replace(url, where)}") from None
    except SmartError as error:
        raise FhirError(f"{where}: no access token: {error}") from None
    try:
        return Bundle.model_validate_json(body)
    except ValidationError as error:
        raise FhirError(f"{where} did not answer a FHIR Bundle: {str(error)[:200]}") from None


class FhirPoller(Rounds):
    """The loop that searches the FHIR server for the NIHSS of recent studies' patients."""

    def __init__(
        self, db: Database, base_url: str, store: Callable[[NihssReport], bool], *, search_for_s: float,
        poll_s: float, timeout_s: float, smart: SmartClient | None = None,
    ) -> None:
        self.db, self.base_url, self.store = db, base_url, store
        self.search_for_s, self.timeout_s = search_for_s, timeout_s
        self.token_client = httpx.Client(timeout=timeout_s, follow_redirects=False)
        self.tokens = SmartTokens(smart) if smart is not None else None
        auth = SmartAuth(self.tokens, self.token_client) if self.tokens is not None else None
        self.client = httpx.Client(timeout=timeout_s, follow_redirects=False, auth=auth)
        super().__init__("fhir", poll_s, join_timeout_s=2 * timeout_s + 5)

    failure = "FHIR search round"

    def round(self) -> int:
        return self.poll(self.client)

    def stop(self) -> None:
        super().stop()
        self.client.close()
        self.token_client.close()

    def poll(self, client: httpx.Client) -> int:
        """One round over the patients of recent studies; returns how many new records it stored."""
        since = utcnow() - timedelta(seconds=self.search_for_s)
        with self.db.session() as session:
            patients = sorted(set(session.scalars(
                select(Study.patient_id).where(Study.first_received_at >= since, Study.patient_id.is_not(None))
            )))
        stored = 0
        for patient_id in patients:
            if self.stopping.is_set():
                break
            try:
                reports = search_nihss(client, self.base_url, patient_id)
            except FhirError as error:
                log.warning("FHIR search failed (the NIHSS waits, the imaging does not): %s", error)
                continue
            for report in reports:
                try:
                    stored += bool(self.store(report))
                except InputError as error:
                    log.warning("FHIR %s not stored: %s", report.source_id, error)
        return stored
