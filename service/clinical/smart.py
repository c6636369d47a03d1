"""SMART Backend Services authorisation for the FHIR poller: an OAuth2 client-credentials access
token, asked of the EHR's token endpoint and sent as ``Authorization: Bearer`` on every search.

The client authenticates either with a signed JWT client assertion (the SMART way: RS384 with its
private key, ``iss`` = ``sub`` = client id, ``aud`` = the token URL, five minutes' life, a unique
``jti``) or with a client secret (HTTP Basic, for EHRs that register clients so). The token is
cached until shortly before it expires; a 401 from the FHIR server drops it and the request is
retried once with a new one. Every failure is one ``SmartError`` line naming the token URL, never
a secret or the token.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import httpx

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_ALGORITHM = "RS384"
ASSERTION_LIFETIME_S = 300
EXPIRY_MARGIN_S = 30.0
DEFAULT_SCOPE = "system/Observation.read"
MAX_TOKEN_RESPONSE_BYTES = 64 * 1024
MAX_TOKEN_LIFETIME_S = 24 * 3600.0  # a token is asked for again at least daily, whatever the server says


class SmartError(Exception):
    """No access token could be had (the endpoint refused, was unreachable, or answered nonsense)."""


@dataclass(frozen=True)
class SmartClient:
    """How StrokeGate is registered with the EHR's authorisation server: a private key (PEM, RSA)
    or a client secret, exactly one."""

    token_url: str
    client_id: str
    private_key_pem: bytes | None = None
    key_id: str | None = None  # the JWK "kid" the EHR knows the public key by
    client_secret: str | None = None
    scope: str = DEFAULT_SCOPE

    def __post_init__(self) -> None:
        if (self.private_key_pem is None) == (self.client_secret is None):
            raise ValueError("SMART backend services needs exactly one of a private key or a client secret")
        if not self.token_url.startswith(("http://", "https://")):
            raise ValueError(f"the SMART token URL {self.token_url!r} must be an http:// or https:// URL")
        if not self.client_id:
            raise ValueError("the SMART client id is empty")

    @classmethod
    def from_key_file(cls, token_url: str, client_id: str, key_path: Path, key_id: str | None = None,
                      scope: str = DEFAULT_SCOPE) -> SmartClient:
        """A client authenticating with the PEM private key at ``key_path`` (ValueError when unreadable)."""
        try:
            pem = key_path.read_bytes()
        except OSError as error:
            raise ValueError(f"cannot read the SMART private key {key_path}: {error.strerror}") from None
        return cls(token_url, client_id, private_key_pem=pem, key_id=key_id, scope=scope)


def client_assertion(client: SmartClient, now: float | None = None) -> str:
    """The signed JWT that authenticates ``client`` to its token endpoint (RS384)."""
    import jwt

    issued = int(time.time() if now is None else now)
    claims = {"iss": client.client_id, "sub": client.client_id, "aud": client.token_url, "exp": issued + ASSERTION_LIFETIME_S,
              "iat": issued, "jti": uuid.uuid4().hex}
    headers = {"kid": client.key_id} if client.key_id else None
    try:
        return jwt.encode(claims, client.private_key_pem, algorithm=ASSERTION_ALGORITHM, headers=headers)
    except (ValueError, TypeError, jwt.PyJWTError) as error:
        raise SmartError(f"cannot sign the SMART client assertion with the configured key: {error}") from None


def bounded_body(response: httpx.Response, limit: int) -> bytes | None:
    """The body of a streamed ``response``, read chunk by chunk; None as soon as it passes ``limit`` bytes."""
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


class SmartTokens:
    """The access token for one client, asked for when there is none or it is about to expire."""

    def __init__(self, client: SmartClient) -> None:
        self.client = client
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = threading.Lock()
        self.requests = 0  # token requests made: the cache's effect, for the log and the tests

    def token(self, http: httpx.Client) -> str:
        """A valid access token, from the cache or the token endpoint (SmartError when none)."""
        with self._lock:
            if self._token is None or time.monotonic() >= self._expires_at:
                self._token, lifetime = self._request(http)
                self._expires_at = time.monotonic() + max(lifetime - EXPIRY_MARGIN_S, 0.0)
            return self._token

    def forget(self, token: str) -> None:
        """Drop ``token`` (the server refused it), so that the next call asks for a new one."""
        with self._lock:
            if self._token == token:
                self._token = None

    def _request(self, http: httpx.Client) -> tuple[str, float]:
        client = self.client
        form = {"grant_type": "client_credentials", "scope": client.scope}
        auth = None
        if client.private_key_pem is not None:
            form |= {"client_assertion_type": CLIENT_ASSERTION_TYPE, "client_assertion": client_assertion(client)}
        else:
            auth = httpx.BasicAuth(client.client_id, client.client_secret or "")
        self.requests += 1
        try:
            with http.stream("POST", client.token_url, data=form, auth=auth, headers={"Accept": "application/json"}) as response:
                status, content = response.status_code, bounded_body(response, MAX_TOKEN_RESPONSE_BYTES)
        except httpx.HTTPError as error:
            raise SmartError(f"SMART token endpoint {client.token_url}: {type(error).__name__}: {error}") from None
        if content is None:
            raise SmartError(f"SMART token endpoint {client.token_url} answered more than {MAX_TOKEN_RESPONSE_BYTES} bytes")
        if status != 200:
            reason = ""
            try:
                reason = str(json.loads(content).get("error", ""))[:80]
            except (ValueError, AttributeError):
                pass
            raise SmartError(f"SMART token endpoint {client.token_url} answered HTTP {status}"
                             + (f" ({reason})" if reason else "") + ": check the client id and key or secret")
        try:
            body = json.loads(content)
            token, kind = body["access_token"], str(body.get("token_type", "bearer"))
            lifetime = float(body.get("expires_in", 300))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise SmartError(f"SMART token endpoint {client.token_url} answered no access_token") from None
        if not math.isfinite(lifetime) or lifetime <= 0:
            raise SmartError(f"SMART token endpoint {client.token_url} answered an expiry that is not a positive number of seconds")
        lifetime = min(lifetime, MAX_TOKEN_LIFETIME_S)
        if not isinstance(token, str) or not token or kind.lower() != "bearer":
            raise SmartError(f"SMART token endpoint {client.token_url} answered no bearer token (token_type {kind!r})")
        return token, lifetime


class SmartAuth(httpx.Auth):
    """httpx authentication: the bearer token on each request; on a 401 a new token, once."""

    def __init__(self, tokens: SmartTokens, token_client: httpx.Client) -> None:
        self.tokens, self.token_client = tokens, token_client

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self.tokens.token(self.token_client)
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            self.tokens.forget(token)
            request.headers["Authorization"] = f"Bearer {self.tokens.token(self.token_client)}"
            yield request
