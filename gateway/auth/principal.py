"""Who is calling, as proven by a credential: ``Principal`` on the LLM plane, ``AdminCaller``
on the admin plane. Organization -> teams -> principals -> sessions.

A principal is a gateway key, a JWT subject, or in passthrough mode the provider key the
caller brought (the local tenant). Everything a client merely asserts (agent name,
``X-Gateway-Mode``, a session id) is a claim and never widens what these say.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from gateway.auth.config import Role

PASSTHROUGH = "passthrough"
KEY = "key"
JWT = "jwt"


@dataclass(slots=True, frozen=True)
class Principal:
    id: str
    """Public and stable: ``key:<public id>``, ``jwt:<subject>``, ``passthrough:<key hash>``.
    Safe to show, log and match in policy (``match: {principal: ...}``)."""
    kind: str
    """``key``, ``jwt`` or ``passthrough``."""
    owner: str
    """What the principal's sessions, budgets and slots are tied to (``Identity.key_hash``):
    the key's public id, the JWT subject's tag, or the provider key's hash."""
    team: str | None = None
    scopes: frozenset[str] = frozenset({"llm"})
    models: tuple[str, ...] = ()
    """Model globs the credential may call (empty: what the policy allows)."""
    pool: str | None = None
    """The upstream credential pool its calls use (None: the team's, or the only one)."""
    name: str | None = None
    expires_at: float | None = None
    deprecated_until: float | None = None
    """Set when the call used a rotated key's previous secret: it works until then."""
    expires_soon: bool = False
    """The key expires within ``auth.key_expiry_warning``: answers say when."""
    byok: bool = False
    """The call carries the principal's own provider key, which goes upstream (``mixed``)."""


@lru_cache(maxsize=4096)
def passthrough(key_hash: str | None) -> Principal:
    """The principal of a passthrough call: the provider key it brings (one per key)."""
    return Principal(
        id=f"passthrough:{key_hash or 'nokey'}", kind=PASSTHROUGH, owner=key_hash or "nokey"
    )


ROLE_SCOPES: dict[Role, frozenset[str]] = {
    "viewer": frozenset({"health:read", "sessions:read", "policy:read", "budgets:read",
                         "metrics:read"}),
    "operator": frozenset({"health:read", "sessions:read", "policy:read", "budgets:read",
                           "metrics:read", "sessions:write", "degrade:write",
                           "credentials:write"}),
    "key-admin": frozenset({"health:read", "keys:read", "keys:write"}),
    "auditor": frozenset({"health:read", "sessions:read", "policy:read", "budgets:read",
                          "metrics:read", "keys:read", "audit:read"}),
    "admin": frozenset({"health:read", "sessions:read", "policy:read", "budgets:read",
                        "metrics:read", "sessions:write", "degrade:write", "credentials:write",
                        "keys:read", "keys:write", "audit:read"}),
}  # fmt: skip
"""What each admin role may do. A route names one of these scopes when it is registered."""
ADMIN_SCOPES = ROLE_SCOPES["admin"]


@dataclass(slots=True, frozen=True)
class AdminCaller:
    """An admin-plane caller: how it proved itself, its role, and the teams it is bound to."""

    actor: str
    """As the audit log names it: ``token:<hash>`` (the admin token) or ``oidc:<subject>``."""
    method: str
    """``token`` or ``oidc``."""
    roles: frozenset[Role]
    teams: frozenset[str] | None = None
    """The teams its roles cover; None: every team (and objects of no team)."""

    @property
    def scopes(self) -> frozenset[str]:
        return frozenset().union(*(ROLE_SCOPES[role] for role in self.roles))

    def may(self, scope: str) -> bool:
        return scope in self.scopes

    def sees(self, team: str | None) -> bool:
        """Whether an object of ``team`` is visible to it (else it answers 404, as if absent)."""
        return self.teams is None or (team is not None and team in self.teams)
