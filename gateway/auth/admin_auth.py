"""Who calls the admin plane: the admin token (role ``admin``, every team) or an OIDC bearer
token of an ``auth.admin_issuers`` issuer, its groups mapped to roles and bound to teams.

Gateway keys and provider keys are refused here (``wrong_plane``), whatever they are worth on
the LLM plane; the admin token is refused there. Only ``Authorization: Bearer`` is read.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.audit import token_actor
from gateway.auth.principal import AdminCaller
from gateway.secret import Secret

if TYPE_CHECKING:
    from collections.abc import Mapping

    from gateway.auth.jwt import JwtVerifier

MAX_BEARER = 8192
WEAK_TOKENS = frozenset(
    {"changeme", "change-me", "admin", "password", "secret", "token", "test", "example"}
)
MIN_TOKEN = 32
"""Characters an operator's admin token has at least (a generated one is 43)."""


@dataclass(slots=True, frozen=True)
class Refused:
    status: int
    """401: no or a bad credential; 403: a good one without the scope."""
    reason: str
    """The metric's outcome: missing, invalid, wrong_plane, forbidden."""
    message: str


def weak_token(token: str) -> str | None:
    """Why an operator's admin token is too weak to serve with, or None."""
    lowered = token.lower()
    if len(token) < MIN_TOKEN:
        return f"the admin token is {len(token)} characters; use at least {MIN_TOKEN}"
    if any(word in lowered for word in WEAK_TOKENS) or len(set(token)) < 10:
        return "the admin token looks like an example or a word; generate a random one"
    return None


@dataclass(slots=True)
class AdminAuth:
    token: Secret | None = None
    """Set at start-up: the configured token, or the one generated into the state dir."""
    oidc: JwtVerifier | None = None
    denials: dict[tuple[str | None, str, str], tuple[float, int]] = field(default_factory=dict)
    """Refused calls by (peer, actor, reason): when each was last audited, how many since."""

    async def identify(self, headers: Mapping[str, str]) -> AdminCaller | Refused:
        auth = headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        given = given.strip()
        if not auth:
            if headers.get("x-api-key"):
                return Refused(401, "wrong_plane", _PLANE)
            return Refused(401, "missing", _MISSING)
        if scheme.lower() != "bearer" or not given or len(given) > MAX_BEARER:
            return Refused(401, "invalid", _MISSING)
        if given.startswith("gw_"):
            return Refused(401, "wrong_plane", _PLANE)
        token = self.token
        if token is not None and hmac.compare_digest(
            given.encode("utf-8", "surrogateescape"), token.reveal().encode()
        ):
            return AdminCaller(token_actor(given), "token", frozenset({"admin"}))
        oidc = self.oidc
        if oidc is not None and oidc.looks_like(given):
            from gateway.auth.jwt import JwtRefused

            try:
                verified = await oidc.verify(given)
            except JwtRefused as refused:
                return Refused(401, "invalid", f"the bearer token was refused: {refused.reason}")
            caller = verified.to_admin()
            if caller is None:
                return Refused(
                    403, "forbidden", "the token is valid but maps to no gateway role (role_map)"
                )
            return caller
        return Refused(401, "invalid", "the admin token (or OIDC token) is not valid")


_MISSING = (
    "the admin API needs Authorization: Bearer <admin token> (GATEWAY_ADMIN_TOKEN, or the file"
    " admin-token in the gateway's state directory, which the CLI reads) or an OIDC token"
)
_PLANE = (
    "gateway keys and provider keys are for the model routes (/v1/...), never the admin API:"
    " send Authorization: Bearer <admin token> or an OIDC token"
)
