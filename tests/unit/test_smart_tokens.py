"""A hostile or broken SMART token endpoint: bounded answers, expiries that must be seconds."""

from __future__ import annotations

import httpx
import pytest

from service.clinical.smart import MAX_TOKEN_RESPONSE_BYTES, SmartClient, SmartError, SmartTokens

CLIENT = SmartClient("https://ehr.invalid/token", "strokegate", client_secret="s3cret")


def tokens_from(answer: httpx.Response) -> tuple[SmartTokens, httpx.Client]:
    return SmartTokens(CLIENT), httpx.Client(transport=httpx.MockTransport(lambda request: answer))


def test_an_oversized_token_answer_is_refused_in_one_line() -> None:
    tokens, http = tokens_from(httpx.Response(200, content=b"{" + b" " * (2 * MAX_TOKEN_RESPONSE_BYTES) + b"}"))
    with pytest.raises(SmartError, match="answered more than"):
        tokens.token(http)


@pytest.mark.parametrize("expiry", ["NaN", -5, 0, "soon"])
def test_an_expiry_that_is_not_a_positive_number_of_seconds_gets_no_token(expiry: object) -> None:
    body = {"access_token": "abc", "token_type": "Bearer", "expires_in": expiry}
    tokens, http = tokens_from(httpx.Response(200, json=body))
    with pytest.raises(SmartError):
        tokens.token(http)


def test_a_token_is_reused_until_it_expires_and_asked_for_once() -> None:
    tokens, http = tokens_from(httpx.Response(200, json={"access_token": "abc", "token_type": "Bearer", "expires_in": 3600}))
    assert tokens.token(http) == tokens.token(http) == "abc"
    assert tokens.requests == 1


def test_a_refusal_whose_body_is_not_an_object_is_still_one_line() -> None:
    tokens, http = tokens_from(httpx.Response(401, json=["not", "an", "object"]))
    with pytest.raises(SmartError, match="answered HTTP 401: check the client id"):
        tokens.token(http)


@pytest.mark.parametrize(("flags", "told"), [
    (["--fhir-token-url", "ftp://ehr.example/token", "--fhir-client-id", "sg", "--fhir-private-key", "key.pem"],
     "must be an http:// or https:// URL"),
    (["--fhir-token-url", "https://ehr.example/token", "--fhir-private-key", "key.pem"], "needs fhir_client_id"),
    (["--fhir-client-id", "sg", "--fhir-key-id", "k1"], "need fhir_token_url"),
])
def test_serve_takes_the_smart_settings_as_flags_and_says_in_one_line_what_is_wrong(
        flags: list[str], told: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from service.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["serve", "--database-url", f"sqlite:///{tmp_path / 'sg.db'}", *flags])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("strokegate: invalid configuration") and told in lines[0]
