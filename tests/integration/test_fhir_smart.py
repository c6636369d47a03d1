"""SMART Backend Services for the FHIR poller, against the test FHIR server's real token endpoint:
an RS384 client assertion or a client secret gets a bearer token, the token is reused until it
expires or is refused, a search without one gets 401, and a refusal is one line in the log."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fhir_server import FhirServer, SmartRegistration, nihss_observation
from service.clinical.fhir import FhirError, FhirPoller, search_nihss
from service.clinical.nihss import record_nihss
from service.clinical.smart import SmartAuth, SmartClient, SmartTokens
from service.config import Settings
from service.errors import SetupError
from service.server import smart_client
from service.store.database import Database
from service.store.models import Study

pytestmark = pytest.mark.timeout(120)


def _key_pair() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    return _key_pair()


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    database.upgrade()
    with database.session() as session:
        session.add(Study(study_uid="1.2.3", patient_id="PAT1"))
    yield database
    database.dispose()


def _serve(registration: SmartRegistration) -> FhirServer:
    server = FhirServer(registration).start()
    server.create(nihss_observation("PAT1", 14, datetime(2026, 12, 4, 10, 15)))
    return server


def test_a_signed_client_assertion_gets_a_token_that_is_reused_until_refused(db: Database, keys, tmp_path: Path) -> None:
    private, public = keys
    fhir = _serve(SmartRegistration("strokegate", public_key_pem=public))
    try:
        with httpx.Client(timeout=5) as client:
            assert client.get(f"{fhir.url}/Observation").status_code == 401  # no token: no data
        key_file = tmp_path / "smart.pem"
        key_file.write_bytes(private)
        smart = SmartClient.from_key_file(fhir.token_url, "strokegate", key_file, key_id="sg-1")
        poller = FhirPoller(db, fhir.url, lambda report: record_nihss(db, report)[1], search_for_s=3600, poll_s=1,
                            timeout_s=5, smart=smart)
        try:
            assert poller.poll(poller.client) == 1
            fhir.create(nihss_observation("PAT1", 22, datetime(2026, 12, 4, 10, 20)))
            assert poller.poll(poller.client) == 1
            assert fhir.token_requests == 1 and fhir.unauthorised == 1  # the cached token served both searches
            fhir.revoke_tokens()
            fhir.create(nihss_observation("PAT1", 25, datetime(2026, 12, 4, 10, 25)))
            assert poller.poll(poller.client) == 1  # 401, a new token, the search again
            assert fhir.token_requests == 2 and fhir.unauthorised == 2
        finally:
            poller.stop()
    finally:
        fhir.stop()


def test_a_client_secret_works_and_a_wrong_key_or_secret_fails_in_one_line(db: Database, keys, caplog) -> None:
    private, public = keys
    fhir = _serve(SmartRegistration("strokegate", client_secret="s3cret"))
    try:
        good = SmartTokens(SmartClient(fhir.token_url, "strokegate", client_secret="s3cret"))
        bad = SmartTokens(SmartClient(fhir.token_url, "strokegate", client_secret="guess"))
        with httpx.Client(timeout=5) as tokens_client:
            with httpx.Client(timeout=5, auth=SmartAuth(good, tokens_client)) as client:
                assert [r.value for r in search_nihss(client, fhir.url, "PAT1")] == [14]
            with httpx.Client(timeout=5, auth=SmartAuth(bad, tokens_client)) as client:
                with pytest.raises(FhirError, match=r"token endpoint .* answered HTTP 401 \(invalid_client\)") as refused:
                    search_nihss(client, fhir.url, "PAT1")
        message = str(refused.value)
        assert "\n" not in message and "guess" not in message and "PAT1" not in message
    finally:
        fhir.stop()

    other_private, _ = _key_pair()  # a key the EHR does not know
    fhir = _serve(SmartRegistration("strokegate", public_key_pem=public))
    try:
        poller = FhirPoller(db, fhir.url, lambda report: True, search_for_s=3600, poll_s=1, timeout_s=5,
                            smart=SmartClient(fhir.token_url, "strokegate", private_key_pem=other_private))
        try:
            with caplog.at_level(logging.WARNING, logger="service.clinical.fhir"):
                assert poller.poll(poller.client) == 0  # the NIHSS waits; the loop goes on
            assert any("no access token" in r.getMessage() and "HTTP 401" in r.getMessage() for r in caplog.records)
        finally:
            poller.stop()
    finally:
        fhir.stop()


def test_smart_settings_are_checked_at_startup(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one of fhir_private_key"):
        Settings(fhir_base_url="http://ehr/fhir", fhir_token_url="http://ehr/token", fhir_client_id="sg")
    with pytest.raises(ValueError, match="need fhir_token_url"):
        Settings(fhir_client_id="sg")
    missing = Settings(fhir_base_url="http://ehr/fhir", fhir_token_url="http://ehr/token", fhir_client_id="sg",
                       fhir_private_key=tmp_path / "absent.pem")
    with pytest.raises(SetupError, match="cannot read the SMART private key"):
        smart_client(missing)
    secret = Settings(fhir_base_url="http://ehr/fhir", fhir_token_url="http://ehr/token", fhir_client_id="sg",
                      fhir_client_secret="s3cret")
    assert smart_client(secret).client_secret == "s3cret" and "s3cret" not in repr(secret)
