"""The ``authenticate`` step: which credential the call presents, whose it is (``Principal``),
and which credential goes upstream.

- ``passthrough``: the caller's provider key goes upstream unchanged (``credentials``); the key
  is the principal. The admin token is refused here: it must never reach a provider.
- ``keys`` / ``jwt`` / ``mixed``: the call presents a gateway key (``gw_...``) or a JWT in
  ``Authorization: Bearer``, ``x-api-key`` or ``X-Gateway-Key``. Every client credential header
  is stripped and the principal's pool credential (``pools``) is sent instead; in ``mixed``
  mode a principal with scope ``upstream:byok`` may bring its own provider key, which then goes
  upstream in the provider's own header. A provider key sent instead of a gateway credential is
  refused, and neither used nor stored.

Every refusal is a ``GatewayError`` whose message says the gateway (not the provider) refused,
names a gateway key only by its public id, and says how to fix it.
"""

from __future__ import annotations

import fnmatch
import re
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import lru_cache
from typing import TYPE_CHECKING

import orjson
from multidict import CIMultiDict, istr

from gateway.appkeys import AUDIT, METRICS
from gateway.auth.authenticator import Authenticator
from gateway.auth.principal import PASSTHROUGH, Principal, passthrough
from gateway.credentials import AUTHORIZATION, X_API_KEY, Credential, credential
from gateway.errors import Forbidden, KeysUnreadable, TwoCredentials, Unauthenticated
from gateway.redact import claim

if TYPE_CHECKING:
    from collections.abc import Mapping

    from gateway.auth.pools import Choice
    from gateway.exchange import Exchange

X_GATEWAY_KEY = "x-gateway-key"
KEY_PREFIX = "gw_"
MAX_CREDENTIAL = 8192
"""A credential header longer than this is no credential the gateway issues (JWTs included)."""
_PUBLIC_ID = re.compile(r"^gw_([A-Za-z0-9]{1,32})_")
PROVIDER_NAMES = {"openai": "OpenAI", "anthropic": "Anthropic"}


def gateway_not(provider: str) -> str:
    """How every message the gateway makes itself begins: Claude Code prints a 401 after
    "Failed to authenticate", so the reader must see who refused."""
    return f"gateway (not {PROVIDER_NAMES.get(provider, provider)})"


@dataclass(slots=True)
class Authenticated:
    """What ``authenticate`` found (not frozen: a frozen dataclass sets each field through
    ``object.__setattr__``, once per call)."""

    principal: Principal
    credential: Credential
    """The identity's key hash is the principal's owner; ``drop``: passthrough's header."""
    choice: Choice | None = None
    """The pool credential the gateway sends upstream in place of every client credential
    (None: the client's own credential goes, as in passthrough and bring-your-own-key)."""
    method: str = "passthrough"
    outcome: str = "ok"


async def authenticate(ex: Exchange, auth: Authenticator) -> Authenticated:
    """The call's principal and upstream credential; raises ``Unauthenticated`` or
    ``Forbidden``. Passthrough, the default, costs one cached hash and a comparison."""
    headers = ex.request.headers
    provider = ex.upstream.provider
    if _repeated(headers):  # every copy would go upstream; the principal is one of them
        raise TwoCredentials()
    if _carries(headers, auth.admin_token):  # in any spelling: it must never go upstream
        refused = _admin_token_refused(provider)
        refused.method = "passthrough" if auth.mode == "passthrough" else "none"
        raise refused
    if auth.mode == "passthrough":
        who = credential(headers, provider)
        return Authenticated(passthrough(who.key_hash), who)
    return await _gateway_credential(ex, auth, headers, provider)


async def _gateway_credential(
    ex: Exchange, auth: Authenticator, headers: Mapping[str, str], provider: str
) -> Authenticated:
    presented = _presented(headers)
    ours = [(h, t) for h, t in presented if _ours(t, auth)]
    others = [(h, t) for h, t in presented if not _ours(t, auth)]
    if not ours:
        if others:
            raise _provider_key_refused(provider, auth.mode)
        raise Unauthenticated(
            f"{gateway_not(provider)}: no credential. This gateway takes {_takes(auth.mode)} as"
            " the API key (Authorization: Bearer, x-api-key or X-Gateway-Key); ask your"
            " platform team for one (gateway keys create).",
            "missing",
        )
    if len({t for _h, t in ours}) > 1:
        raise TwoCredentials()
    token = ours[0][1]
    method = "key" if token.startswith(KEY_PREFIX) else "jwt"
    try:
        return await _checked(ex, auth, token, method, ours[0][0], others, provider)
    except (Unauthenticated, Forbidden) as refused:
        refused.method = method  # counted by how the credential was checked
        raise


async def _checked(
    ex: Exchange,
    auth: Authenticator,
    token: str,
    method: str,
    carried_in: str,
    others: list[tuple[str, str]],
    provider: str,
) -> Authenticated:
    """The gateway credential ``token`` (a key or a JWT, as ``method`` says) checked, and what
    its principal may do with this call."""
    if method == "key":
        principal = await _verify_key(auth, token, provider)
        if principal.deprecated_until is not None:
            deprecated_use(ex, principal)
    else:
        principal = await _verify_jwt(auth, token, provider)
    if "llm" not in principal.scopes:
        raise Forbidden(
            f"{gateway_not(provider)}: {_named(principal)} has no scope llm, so it may not call"
            " models. Ask a key admin for a key with scope llm.",
            "scope",
        )
    _check_model(ex, principal, provider)
    if others:  # a provider key beside the gateway credential: only bring-your-own-key
        if auth.mode != "mixed" or "upstream:byok" not in principal.scopes:
            raise _provider_key_refused(provider, auth.mode, beside=_named(principal))
        own = {"openai": AUTHORIZATION, "anthropic": X_API_KEY}.get(provider, AUTHORIZATION)
        mine = [(h, t) for h, t in others if h == own]
        if not mine:
            raise Unauthenticated(
                f"{gateway_not(provider)}: bring your own key in {own}, the provider's own"
                " header, and the gateway credential in the other one or in X-Gateway-Key.",
                "invalid",
            )
        # Their key goes upstream in its header; the header that carried the gateway
        # credential does not (X-Gateway-Key never does: no x-gateway-* header goes upstream).
        drop = carried_in if carried_in != X_GATEWAY_KEY else None
        byok = replace(principal, byok=True)
        return Authenticated(byok, Credential(principal.owner, drop), None, method)
    choice = pool_choice(auth, ex.upstream.name, principal, provider)
    outcome = "deprecated" if principal.deprecated_until is not None else "ok"
    return Authenticated(principal, Credential(principal.owner), choice, method, outcome)


def check_open_path(
    auth: Authenticator,
    principal: Principal,
    method: str,
    path: str,
    body: bytes,
    provider: str,
) -> None:
    """A gateway key or JWT on a provider path that is no model route: only the methods and
    paths the operator opened (``auth.open_paths``), and a key's model limits hold there
    too (a body it cannot read is refused to such a key)."""
    if principal.kind == PASSTHROUGH:
        return
    if not auth.open_path(method, path):
        raise Forbidden(
            f"{gateway_not(provider)}: {method} {path[:100]} is not open to gateway"
            " credentials: it would use the organization's provider account outside every"
            " policy. An operator opens it in auth.open_paths.",
            "path",
        )
    if principal.models and body.strip():
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = None
        model = parsed.get("model") if isinstance(parsed, dict) else None
        if parsed is None or (model is not None and not isinstance(model, str)):
            raise Forbidden(
                f"{gateway_not(provider)}: {_named(principal)} may call only some models, and"
                " this body does not say which in a way the gateway can read.",
                "model",
            )
        if isinstance(model, str) and not _models(principal.models).fullmatch(model):
            raise Forbidden(
                f"{gateway_not(provider)}: {_named(principal)} may not call model"
                f" {claim(model[:100])!r}. Use a model it allows.",
                "model",
            )


def pool_choice(auth: Authenticator, upstream: str, principal: Principal, provider: str) -> Choice:
    """The pool credential for ``principal`` on ``upstream`` (the forward step asks again
    after a fallback changed the upstream); raises ``Forbidden`` when none serves it."""
    pools = auth.pools
    choice = (
        pools.choose(upstream, principal.pool, principal.team, auth.team_pools)
        if pools is not None
        else None
    )
    if choice is None:
        raise Forbidden(
            f"{gateway_not(provider)}: no provider credential serves {_named(principal)}"
            f" (team {principal.team or 'none'}) on upstream {upstream}. An operator sets"
            f" upstreams.{upstream}.credentials and auth.team_pools, or the key's pool.",
            "no_pool",
        )
    return choice


def _repeated(headers: Mapping[str, str]) -> bool:
    """A credential header sent more than once (a second ``Authorization`` would go upstream
    beside the one the principal was read from). Looked up by ``istr`` names: no case folding
    per call."""
    getall = getattr(headers, "getall", None)
    if getall is None:
        return False
    return (
        len(getall(_AUTHORIZATION, _NONE)) > 1
        or len(getall(_X_API_KEY, _NONE)) > 1
        or len(getall(_X_GATEWAY_KEY, _NONE)) > 1
    )


_AUTHORIZATION, _X_API_KEY, _X_GATEWAY_KEY = (
    istr("Authorization"),
    istr("x-api-key"),
    istr("x-gateway-key"),
)
_NONE: tuple[str, ...] = ()


def _carries(headers: Mapping[str, str], token: str | None) -> bool:
    """Whether a credential header holds the admin token anywhere in it (``Bearer``, a tab,
    another scheme, ``x-api-key: Bearer ...``): two substring searches."""
    if token is None:
        return False
    auth, key = headers.get(AUTHORIZATION), headers.get(X_API_KEY)
    return (auth is not None and token in auth) or (key is not None and token in key)


def _presented(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """Every credential the request carries, as (header, token); bounded in length."""
    found: list[tuple[str, str]] = []
    auth = headers.get(AUTHORIZATION)
    if auth:
        scheme, _, token = auth.partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else auth.strip()
        if token:
            found.append((AUTHORIZATION, token))
    for name in (X_API_KEY, X_GATEWAY_KEY):
        value = headers.get(name)
        if value and (value := value.strip()):
            found.append((name, value))
    for _name, token in found:
        if len(token) > MAX_CREDENTIAL:
            raise Unauthenticated(
                "gateway: a credential header is longer than any credential the gateway"
                f" issues ({MAX_CREDENTIAL} characters).",
                "invalid",
            )
    return found


def _ours(token: str, auth: Authenticator) -> bool:
    if token.startswith(KEY_PREFIX):
        return auth.mode in ("keys", "mixed")
    return auth.mode in ("jwt", "mixed") and auth.jwt is not None and auth.jwt.looks_like(token)


async def _verify_key(auth: Authenticator, token: str, provider: str) -> Principal:
    shown = public_id(token)
    if auth.keys is None:
        raise Unauthenticated(
            f"{gateway_not(provider)}: this gateway does not take gateway keys.", "invalid"
        )
    verified = await auth.keys.verify(token)
    if not verified.ok:
        reason = verified.reason
        if reason == "unreadable":
            raise KeysUnreadable(gateway_not(provider), shown)
        why = {
            "expired": "has expired; ask a key admin to create a new one (gateway keys create)",
            "revoked": "has been revoked; ask a key admin for a new one (gateway keys create)",
        }.get(
            reason,
            "is not valid (no such key, or a wrong or old secret); check that the whole key"
            " was copied, or ask a key admin for a new one (gateway keys create)",
        )
        raise Unauthenticated(f"{gateway_not(provider)}: the gateway key {shown} {why}.", reason)
    assert verified.principal is not None
    return verified.principal


async def _verify_jwt(auth: Authenticator, token: str, provider: str) -> Principal:
    assert auth.jwt is not None
    from gateway.auth.jwt import JwtRefused

    try:
        verified = await auth.jwt.verify(token)
    except JwtRefused as refused:
        raise Unauthenticated(
            f"{gateway_not(provider)}: the bearer token (a JWT) was refused: {refused.reason}."
            " Get a fresh token from your identity provider for this gateway's audience.",
            "expired" if refused.reason == "expired" else "invalid",
        ) from None
    return verified.to_principal()  # its pool: its team's (``auth.team_pools``, by ``choose``)


def _check_model(ex: Exchange, principal: Principal, provider: str) -> None:
    if not principal.models or ex.facts is None:
        return
    model = ex.facts.model or ""
    if not _models(principal.models).fullmatch(model):
        allowed = ", ".join(principal.models[:10])
        raise Forbidden(
            f"{gateway_not(provider)}: {_named(principal)} may not call model {model[:100]!r}"
            f" (it may call: {allowed}). Use one of those models, or ask a key admin for a key"
            " that allows it.",
            "model",
        )


@lru_cache(maxsize=1024)
def _models(globs: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(fnmatch.translate(g) for g in globs), re.IGNORECASE)


def public_id(token: str) -> str:
    """A gateway key as it may be shown: ``gw_<public id>_…`` (never the secret)."""
    match = _PUBLIC_ID.match(token)
    return f"gw_{match.group(1)}_…" if match else "gw_…"


def _named(principal: Principal) -> str:
    if principal.kind == "key":
        return f"the gateway key gw_{principal.owner}_…"
    return f"the principal {principal.id}"


def _takes(mode: str) -> str:
    return {"keys": "gateway keys (gw_...)", "jwt": "bearer JWTs of its identity provider"}.get(
        mode, "gateway keys (gw_...) or bearer JWTs"
    )


def _admin_token_refused(provider: str) -> Unauthenticated:
    return Unauthenticated(
        f"{gateway_not(provider)}: the admin token is for the admin API (/gateway/...), never"
        " for model calls, and was not sent on. Use a gateway key or a provider key.",
        "wrong_plane",
    )


def _provider_key_refused(provider: str, mode: str, beside: str | None = None) -> Unauthenticated:
    where = f" beside {beside}" if beside else ""
    name = PROVIDER_NAMES.get(provider, provider)
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return Unauthenticated(
        f"{gateway_not(provider)}: the request carries what looks like {article} {name} key{where};"
        f" this gateway takes {_takes(mode)} and sends its own provider credentials, so that"
        " key was neither used nor stored. Send the gateway credential your platform team gave"
        " you as the API key instead.",
        "provider_key",
    )


DEPRECATED_AUDIT_EVERY = 60.0
"""Seconds between two audit lines for the same key's previous secret in use."""
_deprecated_audited: dict[str, float] = {}


def deprecated_use(ex: Exchange, principal: Principal) -> None:
    """A call with a rotated key's previous secret: counted, and audited once a minute per
    key, so operators see who has not switched."""
    assert principal.deprecated_until is not None
    metrics = ex.app[METRICS]
    metrics.deprecated_secret_uses.inc((metrics.team(principal.team),))
    now = time.monotonic()
    if now - _deprecated_audited.get(principal.owner, -1e9) >= DEPRECATED_AUDIT_EVERY:
        if len(_deprecated_audited) > 10_000:
            _deprecated_audited.clear()
        _deprecated_audited[principal.owner] = now
        ex.app[AUDIT].record(
            "key_deprecated_use", actor=principal.id, key_id=principal.owner,
            team=principal.team, grace_ends=_iso(principal.deprecated_until),
        )  # fmt: skip


def key_notices(principal: Principal, headers: CIMultiDict[str]) -> None:
    """Answer headers for a rotated key's previous secret (``X-Gateway-Key-Deprecated``) and
    a key near its expiry (``X-Gateway-Key-Expires``)."""
    if principal.deprecated_until is not None:
        headers["X-Gateway-Key-Deprecated"] = f"expires={_iso(principal.deprecated_until)}"
    if principal.expires_soon and principal.expires_at is not None:
        headers["X-Gateway-Key-Expires"] = _iso(principal.expires_at)


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
