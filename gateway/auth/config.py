"""The ``auth`` block of the gateway's config, and the upstream credential entries: who may
call, how they prove it, and which provider credentials the gateway sends for them.

Secrets are never written here: credential values are references (``env:VAR``,
``file:/path``), the pepper comes from ``GATEWAY_KEY_PEPPER`` or ``pepper_file``, and keys
declared in config carry only their hash (``gateway keys hash``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Mode = Literal["passthrough", "keys", "jwt", "mixed"]
Role = Literal["viewer", "operator", "key-admin", "auditor", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "operator", "key-admin", "auditor", "admin")
Algorithm = Literal[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"
]
"""Asymmetric only: an issuer's JWKS is public, so a symmetric (HS*) token could be signed
by anyone holding it, and ``none`` signs nothing."""
NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
REFERENCE = re.compile(r"^(env:[A-Za-z_][A-Za-z0-9_]{0,127}|file:/[^\x00]{1,1023})$")
SCOPES = frozenset({"llm", "upstream:byok"})
"""Scopes a principal of the LLM plane can hold: ``llm`` calls models; ``upstream:byok`` may
bring its own provider key (``mixed`` mode)."""

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def duration(value: Any) -> float:
    """Seconds from ``90``, ``"90s"``, ``"30m"``, ``"24h"`` or ``"90d"``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and (match := _DURATION.match(value)):
        return float(match.group(1)) * _UNIT[match.group(2)]
    raise ValueError(f"not a duration: {value!r} (use seconds, or 30s, 15m, 24h, 90d)")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)


class CredentialEntry(_Strict):
    """One provider credential of a pool, by reference."""

    name: str = Field(pattern=NAME)
    """Shown in logs, metrics and alerts (never the value)."""
    value: str
    """``env:VAR`` or ``file:/path`` (a mounted Secret): never the credential itself."""
    header: Literal["x-api-key", "authorization"] | None = None
    """The header it is sent in; default the provider's own (OpenAI ``Authorization: Bearer``,
    Anthropic ``x-api-key``). ``authorization`` sends ``Bearer <value>``."""

    @field_validator("value")
    @classmethod
    def _reference(cls, value: str) -> str:
        if not REFERENCE.match(value):
            raise ValueError(
                "a credential is written as a reference, env:VARIABLE or file:/path, never "
                "inline: move the value to an environment variable or a mounted file"
            )
        return value


class JwtIssuer(_Strict):
    """An OIDC issuer whose bearer JWTs are accepted."""

    issuer: str
    """The ``iss`` claim, exactly (an https URL)."""
    audience: list[str] = Field(min_length=1)
    """Accepted ``aud`` values: required, so a token minted for another service is refused."""
    jwks_url: str | None = None
    """Where its signing keys are; default from ``<issuer>/.well-known/openid-configuration``."""
    algorithms: list[Algorithm] = ["RS256", "ES256"]
    leeway: float = Field(60.0, ge=0, le=600)
    """Seconds of clock skew allowed on ``exp``, ``nbf`` and ``iat``."""
    principal_claim: str = "sub"
    team_claim: str | None = "team"
    scopes_claim: str = "scope"
    """A space-separated string or a list."""
    roles_claim: str = "roles"
    """Admin plane: the claim holding the caller's groups or roles."""
    role_map: dict[str, Role] = {}
    """Admin plane: a value of ``roles_claim`` to a gateway role. An issuer without one is not
    accepted on the admin plane."""
    teams_claim: str | None = None
    """Admin plane: a claim listing the teams the caller's role is bound to; without it (or
    with no value) the role covers every team."""
    default_scopes: list[str] = ["llm"]
    """LLM plane: the scopes of a token that carries none."""

    @field_validator("issuer", "jwks_url")
    @classmethod
    def _https(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value


class DeclaredKey(_Strict):
    """A gateway key declared in config by its hash (``gateway keys hash``), never the key."""

    id: str = Field(pattern=r"^[A-Za-z0-9]{6,32}$")
    """The key's public id (the part after ``gw_``)."""
    hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    """HMAC-SHA256 of its secret with this deployment's pepper."""
    name: str = Field(pattern=NAME)
    team: str = Field(pattern=NAME)
    scopes: list[str] = ["llm"]
    models: list[str] = []
    """Model globs the key may call; empty: what the policy allows."""
    pool: str | None = None
    """The upstream credential pool its calls use."""
    expires: float | None = None
    """Unix time it stops working (none: declared keys are rotated by changing the config)."""


class AuthSettings(_Strict):
    mode: Mode = "passthrough"
    """``passthrough`` (the caller's own provider key goes upstream; loopback only unless
    ``allow_network_passthrough``), ``keys`` (gateway keys; the gateway sends its own provider
    credentials), ``jwt`` (bearer JWTs of ``jwt_issuers``), ``mixed`` (keys or JWTs)."""
    pepper_file: Path | None = None
    """A file holding the pepper gateway key hashes are made with (a mounted Secret); else
    ``GATEWAY_KEY_PEPPER``; else one generated into ``state_dir`` (single process only)."""
    key_cache: float = Field(1.0, ge=0, le=60)
    """Seconds a verified gateway key is trusted before the store is asked again: a
    revocation on another replica takes at most this long."""
    key_expiry: float = Field(90 * 86400.0, gt=0, le=10 * 365 * 86400)
    """Default lifetime of a new key (``90d``); ``keys create --expires`` sets another."""
    key_expiry_warning: float = Field(7 * 86400.0, gt=0)
    """Calls with a key expiring within this long carry ``X-Gateway-Key-Expires``."""
    rotation_grace: float = Field(86400.0, ge=0, le=90 * 86400)
    """Default time the previous secret keeps working after ``keys rotate``."""
    jwt_issuers: list[JwtIssuer] = []
    """Issuers whose JWTs the LLM plane accepts (``jwt`` and ``mixed`` modes)."""
    admin_issuers: list[JwtIssuer] = []
    """Issuers whose JWTs the admin plane accepts, mapped to roles by ``role_map``."""
    egress_allow: list[str] = []
    """CIDRs the egress guard lets JWKS and discovery fetches reach although private (an
    identity provider inside the cluster). Loopback, link-local and metadata addresses are
    refused unless listed here."""
    keys: list[DeclaredKey] = []
    """Gateway keys declared by hash (for config kept in git)."""
    open_paths: list[str] = ["GET /v1/models", "GET /v1/models/*"]
    """Provider paths besides the model routes that gateway keys and JWTs may call:
    ``METHOD /glob`` (``POST /v1/embeddings``) or a bare glob for every method. They go
    upstream with the pool credential but no policy, session or budget applies, so each one
    opened is a decision (``DELETE /v1/models/*`` deletes the organization's fine-tunes). A
    key limited to models is held to them when the body names one."""
    team_pools: dict[str, str] = {}
    """A team's upstream credential pool, for principals that name none (JWT subjects)."""

    @field_validator("egress_allow")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        from gateway.auth.egress import parse_allow

        parse_allow(value)  # names a bad entry
        return value

    @field_validator("key_expiry", "key_expiry_warning", "rotation_grace", mode="before")
    @classmethod
    def _durations(cls, value: Any) -> float:
        return duration(value)

    @model_validator(mode="after")
    def _issuers_needed(self) -> AuthSettings:
        if self.mode == "jwt" and not self.jwt_issuers:
            raise ValueError("auth.mode jwt needs at least one of auth.jwt_issuers")
        return self


def pool_problems(
    auth: AuthSettings, credentials: Mapping[str, Mapping[str, Sequence[CredentialEntry]]]
) -> list[tuple[tuple[str, ...], str]]:
    """What can never work in the upstream credential pools, each at its place in the config:
    ``credentials`` is each upstream's ``credentials`` by upstream name. A pool's name and
    entries, ``team_pools`` and declared keys naming a pool no upstream has, and a mode that
    sends the gateway's own credentials with none configured. (Pools in passthrough mode are
    unused, and fine.)"""
    problems: list[tuple[tuple[str, ...], str]] = []
    known: set[str] = set()
    for upstream, pools in credentials.items():
        for pool, entries in pools.items():
            at = ("upstreams", upstream, "credentials", pool)
            if not re.match(NAME, pool):
                problems.append((at, "not a pool name (letters, digits, '.', '_', '-')"))
            if not entries:
                problems.append((at, "an empty pool: list at least one entry"))
            names = [entry.name for entry in entries]
            twice = sorted({name for name in names if names.count(name) > 1})
            if twice:
                problems.append((at, f"entry names used twice: {', '.join(twice)}"))
            known.add(pool)
    shown = ", ".join(sorted(known)) or "none are configured"
    for team, pool in auth.team_pools.items():
        if pool not in known:
            where = ("auth", "team_pools", team)
            problems.append((where, f"no upstream has a pool named {pool!r} (pools: {shown})"))
    for index, key in enumerate(auth.keys):
        if key.pool is not None and key.pool not in known:
            key_at = ("auth", "keys", str(index), "pool")
            problems.append((key_at, f"no upstream has a pool named {key.pool!r} (pools: {shown})"))
    if auth.mode in ("keys", "jwt") and not known:
        problems.append(
            (
                ("auth", "mode"),
                f"auth.mode {auth.mode} sends the gateway's own provider credentials, and no"
                " upstream has any: add upstreams.<name>.credentials (env:VAR or file:/path)",
            )
        )
    return problems
