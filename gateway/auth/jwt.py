"""Bearer JWTs of configured OIDC issuers: ``JwtVerifier`` checks one and answers a
``VerifiedToken`` (mapped to a ``Principal`` on the LLM plane, an ``AdminCaller`` on the admin
plane) or refuses it with ``JwtRefused`` and a short reason code.

Signatures are checked by PyJWT against the issuer's JWKS, which is discovered and fetched
through the egress guard, cached, and refreshed on an unknown ``kid`` at most once per
``REFRESH_INTERVAL`` per issuer. Verified tokens are cached until they expire, so a repeated
bearer costs a hash and a dict lookup.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import aiohttp
import jwt
from jwt import PyJWK

from gateway.auth.config import JwtIssuer, Role
from gateway.auth.egress import EgressError, fetch_json, loads_strict
from gateway.auth.principal import JWT, AdminCaller, Principal

log = logging.getLogger("gateway.auth")

MAX_TOKEN = 8 * 1024
"""Characters: a bearer longer than any IdP mints is refused before it is parsed."""
MAX_KEYS = 50
"""Keys read from one JWKS; the rest are ignored."""
REFRESH_INTERVAL = 30.0
"""Seconds between two JWKS fetches of one issuer, whatever kids tokens name."""
MAX_AGE = 3600.0
"""Seconds a JWKS is trusted before the next token refreshes it (a key the IdP withdrew
stops working within this long)."""
CACHE_SIZE = 10_000
MIN_RSA_BITS = 2048

REASONS = (
    "malformed", "unknown_issuer", "bad_signature", "expired", "not_yet_valid",
    "wrong_audience", "algorithm", "unknown_kid", "jwks_unavailable", "too_large",
)  # fmt: skip

# The signature family each accepted algorithm needs of a key: its ``kty`` and curves.
_FAMILY: dict[str, tuple[str, frozenset[str] | None]] = {
    **{alg: ("RSA", None) for alg in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    "ES256": ("EC", frozenset({"P-256"})),
    "ES384": ("EC", frozenset({"P-384"})),
    "ES512": ("EC", frozenset({"P-521"})),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
}
ASYMMETRIC = frozenset(_FAMILY)
"""Never ``none`` nor ``HS*``: a JWKS is public, so an HMAC "secret" from it is anyone's."""
_DEFAULT_ALG = {"RSA": "RS256", "P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_JWK_FIELDS = ("kty", "n", "e", "crv", "x", "y", "kid", "alg", "use")
_SHAPE = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_PRINCIPAL_CHARS = 128
_NAME_CHARS = 64
_MAX_VALUES = 64


class JwtRefused(Exception):
    """A token was refused; ``reason`` is one of ``REASONS`` (never the token)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def looks_like_jwt(token: str) -> bool:
    """Whether a bearer is shaped as a JWT (three base64url parts, a JSON header): cheap,
    to tell a JWT from a gateway or provider key before verifying anything."""
    return len(token) <= MAX_TOKEN and _SHAPE.fullmatch(token) is not None


@dataclass(frozen=True)
class VerifiedToken:
    """A token whose signature, issuer, audience and times were checked."""

    issuer: JwtIssuer
    claims: dict[str, Any]
    """As signed; shared with the cache, so read, never change."""
    subject: str
    """The issuer's ``principal_claim``, bounded (see ``_identifier``)."""
    expires_at: float

    @cached_property
    def _principal(self) -> Principal:
        claims, issuer = self.claims, self.issuer
        scopes = _strings(claims.get(issuer.scopes_claim), split=True)
        tag = hashlib.sha256(f"{issuer.issuer}\n{self.subject}".encode()).hexdigest()[:12]
        return Principal(
            id=f"jwt:{self.subject}",
            kind=JWT,
            owner=f"jwt-{tag}",
            team=_name(claims.get(issuer.team_claim)) if issuer.team_claim else None,
            scopes=frozenset(issuer.default_scopes if scopes is None else scopes),
            name=self.subject,
            expires_at=self.expires_at,
        )

    def to_principal(self) -> Principal:
        """The LLM-plane principal: ``jwt:<subject>``, its team and scopes from the claims."""
        return self._principal

    def to_admin(self) -> AdminCaller | None:
        """The admin-plane caller, or None when no value of ``roles_claim`` maps to a role."""
        issuer = self.issuer
        values = _strings(self.claims.get(issuer.roles_claim)) or []
        roles: frozenset[Role] = frozenset(
            issuer.role_map[value] for value in values if value in issuer.role_map
        )
        if not roles:
            return None
        teams: frozenset[str] | None = None
        if issuer.teams_claim is not None and issuer.teams_claim in self.claims:
            # Present: its teams. Present but null, of another type or with no usable team:
            # bound to none (never to every team). Only an absent claim means every team.
            listed = _strings(self.claims[issuer.teams_claim]) or []
            teams = frozenset(t for t in map(_name, listed) if t is not None)
        sub = _identifier(self.claims.get("sub")) or self.subject
        return AdminCaller(actor=f"oidc:{sub}", method="oidc", roles=roles, teams=teams)


def _identifier(value: Any) -> str | None:
    """A claim used as an identifier: as is when printable and at most 128 characters; else
    a digest of it. Never cut or stripped, which could merge two subjects into one."""
    if not isinstance(value, str) or not value:
        return None
    if len(value) <= _PRINCIPAL_CHARS and value.isprintable():
        return value
    return "~" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _name(value: Any) -> str | None:
    """A team name from a claim: printable, at most 64 characters, else absent."""
    if (
        isinstance(value, str)
        and 0 < len(value) <= _NAME_CHARS
        and value.isprintable()
        and value == value.strip()
    ):
        return value
    return None


def _strings(value: Any, *, split: bool = False) -> list[str] | None:
    """A claim holding one string or a list of them (a space-separated string when
    ``split``); None when absent or of another type. Other items and long values dropped."""
    if isinstance(value, str):
        items: Iterable[Any] = value.split() if split else [value]
    elif isinstance(value, list):
        items = value[:_MAX_VALUES]
    else:
        return None
    return [
        item
        for item in items
        if isinstance(item, str) and 0 < len(item) <= _NAME_CHARS and item.isprintable()
    ][:_MAX_VALUES]


@dataclass(slots=True)
class _Key:
    """One usable key of a JWKS."""

    kid: str | None
    kty: str
    crv: str | None
    alg: str | None
    jwk: dict[str, Any]
    verifiers: dict[str, PyJWK] = field(default_factory=dict)

    def accepts(self, alg: str) -> bool:
        """Whether a token signed with ``alg`` may be checked with this key: the key's own
        type, curve and declared ``alg`` must agree (no algorithm confusion)."""
        kty, curves = _FAMILY[alg]
        return (
            self.kty == kty
            and (curves is None or self.crv in curves)
            and (self.alg is None or self.alg == alg)
        )

    def verifier(self, alg: str) -> PyJWK:
        """The key bound to ``alg`` (PyJWT then refuses any other algorithm with it)."""
        bound = self.verifiers.get(alg)
        if bound is None:
            bound = self.verifiers[alg] = PyJWK(self.jwk, algorithm=alg)
        return bound


def parse_jwks(document: dict[str, Any]) -> tuple[_Key, ...]:
    """The usable signing keys of a JWKS document; malformed, private, symmetric, weak or
    encryption keys skipped. ValueError when the document has no ``keys`` list."""
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise ValueError("not a JWKS")
    keys: list[_Key] = []
    for entry in entries[:MAX_KEYS]:
        key = _parse_key(entry)
        if key is not None:
            keys.append(key)
    return tuple(keys)


def _parse_key(entry: Any) -> _Key | None:
    if not isinstance(entry, dict) or "d" in entry:  # a private key has no place in a JWKS
        return None
    kty, crv, alg, kid = (entry.get(name) for name in ("kty", "crv", "alg", "kid"))
    if kty not in ("RSA", "EC", "OKP") or (crv is not None and not isinstance(crv, str)):
        return None
    if alg is not None and alg not in ASYMMETRIC:
        return None
    if kid is not None and (not isinstance(kid, str) or len(kid) > 256):
        return None
    if entry.get("use", "sig") != "sig":
        return None
    ops = entry.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return None
    jwk = {name: entry[name] for name in _JWK_FIELDS if name in entry}
    probe = alg or _DEFAULT_ALG.get(kty if kty == "RSA" else str(crv), "EdDSA")
    if probe not in ASYMMETRIC:
        return None
    key = _Key(kid=kid, kty=kty, crv=crv, alg=alg, jwk=jwk)
    if not key.accepts(probe):
        return None
    try:
        verifier = key.verifier(probe)
    except (jwt.PyJWTError, ValueError, TypeError, binascii.Error):
        return None
    if kty == "RSA" and getattr(verifier.key, "key_size", 0) < MIN_RSA_BITS:
        return None
    return key


@dataclass(slots=True)
class _IssuerKeys:
    """One issuer's JWKS as last fetched, and when it was fetched or tried."""

    issuer: JwtIssuer
    keys: tuple[_Key, ...] = ()
    loaded_at: float | None = None
    attempted_at: float | None = None
    jwks_uri: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held during a fetch: callers that arrive meanwhile wait, then find it just made."""

    def find(self, kid: str | None, alg: str) -> _Key | None:
        """The key a token names (or, without a kid, the one key of its type); None when
        there is none. A kid whose key is of another type is refused (``algorithm``)."""
        if kid is None:
            candidates = [key for key in self.keys if key.accepts(alg)]
            return candidates[0] if len(candidates) == 1 else None
        named = [key for key in self.keys if key.kid == kid]
        if not named:
            return None
        for key in named:
            if key.accepts(alg):
                return key
        raise JwtRefused("algorithm")


@dataclass(slots=True)
class _Cached:
    token: VerifiedToken
    valid_until: float


class JwtVerifier:
    """Verifies bearer JWTs of ``issuers``; ``session_factory`` makes the egress-guarded
    session JWKS and discovery fetches go through (``egress_session``)."""

    looks_like_jwt = staticmethod(looks_like_jwt)
    looks_like = staticmethod(looks_like_jwt)

    def __init__(
        self,
        issuers: list[JwtIssuer],
        session_factory: Callable[[], aiohttp.ClientSession],
        clock: Callable[[], float] = time.time,
        *,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        self._issuers: dict[str, _IssuerKeys] = {}
        for issuer in issuers:
            if issuer.issuer in self._issuers:
                raise ValueError(f"issuer {issuer.issuer!r} is configured twice")
            self._issuers[issuer.issuer] = _IssuerKeys(issuer)
        self._session_factory = session_factory
        self._clock = clock
        self._cache: OrderedDict[bytes, _Cached] = OrderedDict()
        self._cache_size = cache_size

    @property
    def cached(self) -> int:
        """Verified tokens held in the cache."""
        return len(self._cache)

    async def verify(self, token: str) -> VerifiedToken:
        """The verified token, or ``JwtRefused`` with the reason."""
        if not isinstance(token, str):
            raise JwtRefused("malformed")
        if len(token) > MAX_TOKEN:
            raise JwtRefused("too_large")
        now = self._clock()
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        cached = self._cache.get(digest)
        if cached is not None:
            if now < cached.valid_until:
                self._cache.move_to_end(digest)
                return cached.token
            del self._cache[digest]
        verified = await self._verify(token, now)
        self._remember(digest, verified)
        return verified

    def _remember(self, digest: bytes, verified: VerifiedToken) -> None:
        # Until the instant the full check would refuse it: exp plus the issuer's leeway.
        valid_until = verified.expires_at + verified.issuer.leeway
        self._cache[digest] = _Cached(verified, valid_until)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def _verify(self, token: str, now: float) -> VerifiedToken:
        if not looks_like_jwt(token):
            raise JwtRefused("malformed")
        header, claims = _unverified(token)
        try:
            jwt.get_unverified_header(token)  # PyJWT's own header rules (kid, crit)
        except (jwt.PyJWTError, ValueError, TypeError):
            raise JwtRefused("malformed") from None
        iss = claims.get("iss")
        state = self._issuers.get(iss) if isinstance(iss, str) else None
        if state is None:
            raise JwtRefused("unknown_issuer")
        issuer = state.issuer
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ASYMMETRIC or alg not in issuer.algorithms:
            raise JwtRefused("algorithm")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or len(kid) > 256):
            raise JwtRefused("malformed")
        # Cheap refusals before any key lookup, so that a forged token cannot make us fetch.
        expires_at = _check_times(claims, now, issuer.leeway)
        _check_audience(claims, issuer.audience)
        subject = _identifier(claims.get(issuer.principal_claim))
        if subject is None:
            raise JwtRefused("malformed")
        key = await self._signing_key(state, kid, alg)
        try:
            verifier = key.verifier(alg)
        except (jwt.PyJWTError, ValueError, TypeError):
            raise JwtRefused("algorithm") from None
        _check_signature(token, verifier, alg, issuer)
        return VerifiedToken(issuer=issuer, claims=claims, subject=subject, expires_at=expires_at)

    async def _signing_key(self, state: _IssuerKeys, kid: str | None, alg: str) -> _Key:
        now = self._clock()
        if state.loaded_at is None or now - state.loaded_at >= MAX_AGE:
            await self._refresh(state)
        if state.loaded_at is None:
            raise JwtRefused("jwks_unavailable")
        key = state.find(kid, alg)
        if key is None:
            await self._refresh(state)  # the IdP may have rotated its keys
            key = state.find(kid, alg)
        if key is None:
            raise JwtRefused("unknown_kid")
        return key

    async def _refresh(self, state: _IssuerKeys) -> None:
        """Fetch the issuer's JWKS, unless one was fetched or tried within
        ``REFRESH_INTERVAL``; callers that arrive during a fetch wait for it and use it."""
        async with state.lock:
            now = self._clock()
            if state.attempted_at is not None and now - state.attempted_at < REFRESH_INTERVAL:
                return
            state.attempted_at = now
            try:
                state.keys = await self._fetch(state)
                state.loaded_at = now
            except EgressError as error:
                state.jwks_uri = None  # discover again next time: the IdP may have moved it
                log.warning("JWKS of %s unavailable (%s)", state.issuer.issuer, error.reason)

    async def _fetch(self, state: _IssuerKeys) -> tuple[_Key, ...]:
        issuer = state.issuer
        async with self._session_factory() as session:
            uri = issuer.jwks_url or state.jwks_uri
            if uri is None:
                discovery = await fetch_json(
                    session, issuer.issuer.rstrip("/") + "/.well-known/openid-configuration"
                )
                # OIDC Discovery 4.3: the document must name the issuer we asked about.
                if discovery.get("issuer") != issuer.issuer:
                    raise EgressError("discovery_issuer")
                found = discovery.get("jwks_uri")
                if not isinstance(found, str):
                    raise EgressError("discovery")
                uri = state.jwks_uri = found
            try:
                return parse_jwks(await fetch_json(session, uri))
            except ValueError:
                raise EgressError("not_jwks") from None


def _segment(part: str) -> dict[str, Any]:
    """One JSON object segment of a token, strictly: duplicate keys refused, as another
    parser might read the other of two values."""
    try:
        raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        value = loads_strict(raw)
    except (EgressError, ValueError, binascii.Error):
        raise JwtRefused("malformed") from None
    if not isinstance(value, dict):
        raise JwtRefused("malformed")
    return value


def _unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    header, payload, _ = token.split(".")
    return _segment(header), _segment(payload)


def _number(value: Any) -> float | None:
    """A NumericDate: a JSON number (not a string, not a boolean)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _check_times(claims: dict[str, Any], now: float, leeway: float) -> float:
    """``exp`` required, ``nbf`` and ``iat`` checked when present; answers ``exp``."""
    expires_at = _number(claims.get("exp"))
    if expires_at is None:
        raise JwtRefused("malformed")
    if now - leeway >= expires_at:
        raise JwtRefused("expired")
    for name in ("nbf", "iat"):
        if name in claims:
            moment = _number(claims[name])
            if moment is None:
                raise JwtRefused("malformed")
            if moment > now + leeway:
                raise JwtRefused("not_yet_valid")
    return expires_at


def _check_audience(claims: dict[str, Any], accepted: list[str]) -> None:
    aud = claims.get("aud")
    values = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if not any(isinstance(value, str) and value in accepted for value in values):
        raise JwtRefused("wrong_audience")


_REFUSALS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.InvalidSignatureError, "bad_signature"),
    (jwt.InvalidAlgorithmError, "algorithm"),
    (jwt.InvalidKeyError, "algorithm"),
    (jwt.InvalidAudienceError, "wrong_audience"),
    (jwt.InvalidIssuerError, "unknown_issuer"),
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid"),
)


def _check_signature(token: str, key: PyJWK, alg: str, issuer: JwtIssuer) -> None:
    """PyJWT checks the signature, issuer and audience again (times are ours: our clock)."""
    try:
        jwt.decode(
            token,
            key=key,
            algorithms=[alg],
            audience=issuer.audience,
            issuer=issuer.issuer,
            options={
                "require": ["exp", "iss", "aud"],
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "enforce_minimum_key_length": True,
            },
        )
    except jwt.MissingRequiredClaimError as error:
        raise JwtRefused("wrong_audience" if error.claim == "aud" else "malformed") from None
    except jwt.PyJWTError as error:
        for kind, reason in _REFUSALS:
            if isinstance(error, kind):
                raise JwtRefused(reason) from None
        raise JwtRefused("malformed") from None
    except (ValueError, TypeError):  # crafted input PyJWT does not wrap
        raise JwtRefused("malformed") from None
