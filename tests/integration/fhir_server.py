"""A small FHIR R4 server for the tests: FastAPI serving real fhir.resources Observation and
Bundle JSON, with create, update (a new version) and the search StrokeGate makes
(``Observation?patient.identifier=...&code=system|code,...``). ``delay_s`` makes it slow.

With a ``SmartRegistration`` it is also a SMART Backend Services authorisation server: ``/token``
takes an OAuth2 client-credentials request authenticated by an RS384 client assertion (verified
with the registered public key, audience this token URL) or a client secret (HTTP Basic), and the
search answers 401 without a token it issued and has not revoked."""

from __future__ import annotations

import base64
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import parse_qs

import jwt

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.observation import Observation

from dicom_tools import free_port

FHIR_JSON = "application/fhir+json"


def nihss_observation(patient_id: str, value: int, effective: datetime, status: str = "final",
                      code: str = "72089-6") -> Observation:
    """An NIHSS total score Observation for the patient with identifier ``patient_id`` (a naive
    ``effective`` is UTC)."""
    if effective.tzinfo is None:
        effective = effective.replace(tzinfo=timezone.utc)
    return Observation.model_validate({
        "resourceType": "Observation",
        "status": status,
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "survey"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": "Total score [NIHSS]"}]},
        "subject": {"identifier": {"system": "urn:oid:1.2.3.4", "value": patient_id}},
        "effectiveDateTime": effective.isoformat(),
        "valueQuantity": {"value": value, "unit": "{score}", "system": "http://unitsofmeasure.org", "code": "{score}"},
    })


@dataclass(frozen=True)
class SmartRegistration:
    """The one client the token endpoint knows: its id and its public key (PEM) or its secret."""

    client_id: str
    public_key_pem: bytes | None = None
    client_secret: str | None = None
    expires_in: int = 300


class FhirServer:
    """Observations in memory, served over HTTP on 127.0.0.1 at a free port until ``stop``."""

    def __init__(self, smart: SmartRegistration | None = None) -> None:
        self.observations: dict[str, Observation] = {}
        self.delay_s = 0.0
        self.searches = 0
        self.smart = smart
        self.tokens: set[str] = set()
        self.token_requests = 0
        self.unauthorised = 0
        self.port = free_port()
        app = FastAPI()

        @app.post("/token")
        async def token(request: Request) -> Response:
            self.token_requests += 1
            form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
            refused = self._refusal(form, request.headers.get("authorization", ""))
            if refused:
                return JSONResponse({"error": refused}, status_code=401 if refused == "invalid_client" else 400)
            issued = uuid.uuid4().hex
            self.tokens.add(issued)
            return JSONResponse({"access_token": issued, "token_type": "bearer", "expires_in": self.smart.expires_in,
                                 "scope": form.get("scope", "")})

        @app.get("/Observation")
        def search(request: Request) -> Response:
            if self.smart is not None:
                bearer = request.headers.get("authorization", "")
                if not bearer.startswith("Bearer ") or bearer.removeprefix("Bearer ") not in self.tokens:
                    self.unauthorised += 1
                    return JSONResponse({"resourceType": "OperationOutcome", "issue": [
                        {"severity": "error", "code": "login", "diagnostics": "no valid access token"}]}, status_code=401)
            self.searches += 1
            time.sleep(self.delay_s)
            patient = request.query_params.get("patient.identifier", "")
            codes = request.query_params.get("code", "").split(",")
            matches = [
                o for o in self.observations.values()
                if o.subject.identifier.value == patient
                and any(f"{c.system}|{c.code}" in codes for c in o.code.coding)
            ]
            bundle = Bundle.model_validate({
                "resourceType": "Bundle", "type": "searchset", "total": len(matches),
                "entry": [{"fullUrl": f"{self.url}/Observation/{o.id}", "resource": o.model_dump(mode="json"),
                           "search": {"mode": "match"}} for o in matches],
            })
            return Response(bundle.model_dump_json(exclude_none=True), media_type=FHIR_JSON)

        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                     lifespan="off", log_config=None))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_url(self) -> str:
        return f"{self.url}/token"

    def revoke_tokens(self) -> None:
        """Forget every token issued: the next search with one gets 401."""
        self.tokens.clear()

    def _refusal(self, form: dict[str, str], authorization: str) -> str | None:
        """The OAuth2 error of a token request, or None when it is granted."""
        smart = self.smart
        if smart is None:
            return "invalid_request"
        if form.get("grant_type") != "client_credentials":
            return "unsupported_grant_type"
        if smart.public_key_pem is not None:
            if form.get("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer":
                return "invalid_client"
            try:
                claims = jwt.decode(form.get("client_assertion", ""), smart.public_key_pem, algorithms=["RS384"],
                                    audience=self.token_url, issuer=smart.client_id, options={"require": ["exp", "jti", "sub"]})
            except jwt.PyJWTError:
                return "invalid_client"
            return None if claims["sub"] == smart.client_id else "invalid_client"
        expected = base64.b64encode(f"{smart.client_id}:{smart.client_secret}".encode()).decode()
        return None if authorization == f"Basic {expected}" else "invalid_client"

    def create(self, observation: Observation) -> Observation:
        """Store as version 1 with a new id."""
        observation.id = uuid.uuid4().hex[:16]
        return self._stamp(observation, 1)

    def update(self, observation_id: str, observation: Observation) -> Observation:
        """Store as the next version of ``observation_id``."""
        version = int(self.observations[observation_id].meta.versionId) + 1
        observation.id = observation_id
        return self._stamp(observation, version)

    def _stamp(self, observation: Observation, version: int) -> Observation:
        observation.meta = {"versionId": str(version), "lastUpdated": datetime.now(timezone.utc).isoformat()}
        observation = Observation.model_validate(observation.model_dump(mode="json"))
        self.observations[observation.id] = observation
        return observation

    def start(self) -> FhirServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise AssertionError("the FHIR server did not start within 10 s")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
