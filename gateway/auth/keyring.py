"""``KeyRing``: gateway keys checked on every call, and made, rotated and revoked by admins.

A check (``verify``) takes the same path for an unknown id and a wrong secret: the HMAC of
the presented secret is always computed and compared, in constant time, with a digest (a
random stand-in when the id is unknown), and both answer ``Refusal("invalid")``. Whether a
key is revoked or expired is told only to a caller who holds its secret.

Records come from the store's key table (and ``auth.keys``, read-only) through a cache of
``auth.key_cache`` seconds per public id, and a verified key is remembered for as long, so
a repeated call costs one HMAC and one dict lookup. A change made here drops this ring's
cache for the key at once; another ring on the same store (another replica) sees it when its
cache runs out, within ``key_cache``.

Every change is refused (``KeyRefused``, nothing written) unless its ``audit`` callback,
called after the checks and before the store is written, returns: the admin API writes the
audit line there, so a change whose line cannot be written is never made.
"""

from __future__ import annotations

import builtins
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.auth.config import NAME, SCOPES, AuthSettings, DeclaredKey, duration
from gateway.auth.keys import (
    ID_LENGTH,
    KEY_ID,
    SECRET_LENGTH,
    KeyRecord,
    digest,
    looks_like_key,
    new_id,
    new_key,
    parse,
)
from gateway.auth.principal import KEY, AdminCaller, Principal
from gateway.secret import Secret

if TYPE_CHECKING:
    from gateway.store.keys import KeyStore

log = logging.getLogger("gateway.auth")

MAX_EXPIRY = 10 * 365 * 86400.0
"""No key lives longer than ten years."""
MAX_GRACE = 90 * 86400.0
"""A rotated key's previous secret works at most this long (``auth.rotation_grace``'s bound)."""
MAX_CACHED = 10_000
"""Entries per cache: ids looked up (unknown ones too) and verified keys. Past it, what has
expired is dropped, and if that is not enough, everything (ids sprayed by a caller must not
grow memory)."""
GLOB = r"^[A-Za-z0-9._:/@+*?\[\]-]{1,200}$"
WRITE_SCOPE = "keys:write"
Reason = Literal["invalid", "revoked", "expired", "unreadable"]
Audit = Callable[[KeyRecord], Awaitable[None]]
"""Called with the record about to be stored, after every check; raising refuses the change."""


class KeyRefused(Exception):
    """An admin request about keys that is refused; ``status`` is its HTTP answer (400 bad,
    403 beyond the caller, 404 absent or not the caller's to see, 409 not in a state for it)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class KeySpec(BaseModel):
    """A key to create (the admin API's body, the CLI's options)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    team: str = Field(pattern=NAME)
    name: str = Field(pattern=NAME)
    models: list[Annotated[str, Field(pattern=GLOB)]] = Field(default_factory=list, max_length=64)
    """Model globs the key may call; empty: what the policy allows."""
    scopes: list[str] = Field(default_factory=lambda: ["llm"], min_length=1, max_length=8)
    expires: float | Annotated[str, Field(max_length=32)] | None = None
    """Its lifetime: seconds, or ``30m``, ``24h``, ``90d``; default ``auth.key_expiry``."""
    pool: str | None = Field(None, pattern=NAME)
    """The upstream credential pool its calls use; default the team's, or the only one."""

    @field_validator("scopes")
    @classmethod
    def _known_scopes(cls, value: list[str]) -> list[str]:
        unknown = [scope[:40] for scope in value if scope not in SCOPES]
        if unknown:
            raise ValueError(
                f"unknown scope(s) {', '.join(unknown)}: a key holds {', '.join(sorted(SCOPES))}"
            )
        return sorted(set(value))

    @field_validator("expires")
    @classmethod
    def _lifetime(cls, value: float | str | None) -> float | None:
        return None if value is None else lifetime(value, MAX_EXPIRY, "expires")


def lifetime(value: float | str, most: float, what: str) -> float:
    """Seconds from a duration (``90d``), more than 0 and at most ``most``."""
    seconds = duration(value)
    if not 0 < seconds <= most:
        raise ValueError(f"{what} must be more than 0 and at most {most / 86400:g} days")
    return seconds


@dataclass(slots=True, frozen=True)
class Verified:
    ok: ClassVar[Literal[True]] = True
    reason: ClassVar[Literal["ok"]] = "ok"
    principal: Principal
    """``key:<public id>``; its ``deprecated_until`` and ``expires_soon`` are the ones below."""
    record: KeyRecord
    deprecated_until: float | None
    """Set when the call used the previous secret of a rotated key: it works until then
    (``X-Gateway-Key-Deprecated``, counted, audited)."""
    expires_soon: bool
    """The key expires within ``auth.key_expiry_warning`` (``X-Gateway-Key-Expires``)."""


@dataclass(slots=True, frozen=True)
class Refusal:
    ok: ClassVar[Literal[False]] = False
    principal: ClassVar[None] = None
    reason: Reason
    """``invalid`` (malformed, unknown id or wrong secret: one answer for all three),
    ``revoked`` or ``expired`` (said only to a caller holding the key's secret), or
    ``unreadable``: an id the store does not know while it could not read its keys yet (a
    replica started while Redis was away), which may be a good key."""
    key_id: str | None
    """The public id the token named (None when it did not parse): safe to show, and the
    same whether such a key exists or not."""


@dataclass(slots=True)
class _Hit:
    until: float
    verified: Verified


class KeyRing:
    __slots__ = (
        "_auth",
        "_clock",
        "_declared",
        "_generation",
        "_pepper_bytes",
        "_pools",
        "_records",
        "_stand_in",
        "_store",
        "_verified",
    )

    def __init__(
        self,
        store: KeyStore,
        pepper: Secret,
        auth: AuthSettings,
        clock: Callable[[], float] = time.time,
        pools: Callable[[], Collection[str]] | None = None,
    ) -> None:
        """``pools``: the upstream credential pools there are now, which a new key may name
        (None: not checked here)."""
        self._store = store
        self._pepper_bytes = pepper.reveal().encode()
        """The HMAC key, encoded once (a slot: shown by no repr)."""
        self._auth = auth
        self._clock = clock
        self._pools = pools
        self._declared = {record.id: record for record in map(_declared, auth.keys)}
        self._records: dict[str, tuple[float, KeyRecord | None]] = {}
        self._verified: dict[tuple[str, str], _Hit] = {}
        self._generation = 0
        """Bumped by every local change: a lookup that started before one is not cached."""
        # Compared with when the id is unknown: a digest no secret is known to have.
        self._stand_in = secrets.token_hex(32)

    @property
    def changes(self) -> int:
        """How many changes this ring made (create, rotate, revoke): a reader of ``list``
        may keep its copy while this stays the same."""
        return self._generation

    def __repr__(self) -> str:
        return f"KeyRing({len(self._declared)} declared, {len(self._records)} cached)"

    def clock(self) -> float:
        """The ring's time (``clock``): what ``KeyRecord.status`` is taken at."""
        return self._clock()

    async def load_declared(self) -> None:
        """Check the keys of ``auth.keys`` (read at construction) against the store: a
        stored key with a declared key's id is shadowed by it, and said so."""
        for key_id in self._declared:
            if await self._store.get_key(key_id) is not None:
                log.warning(
                    "key %s is declared in auth.keys and also stored: the declared one is used",
                    key_id,
                )

    # -- the request path -----------------------------------------------------------------------
    async def verify(self, token: str) -> Verified | Refusal:
        """The key ``token`` is, checked. Anything but a well-formed key with a right
        checksum (``looks_like_key`` tells a caller which credentials to bring here) is
        ``invalid`` without a lookup, its public id unnamed."""
        parsed = parse(token) if looks_like_key(token) else None
        if parsed is None:
            self._mac(_MALFORMED_SECRET)  # the work of a well-formed key, for its shape
            return Refusal("invalid", None)
        key_id, secret = parsed
        mac = self._mac(secret)
        now = self._clock()
        # Keyed by the HMAC of the secret shown: a caller cannot choose an HMAC output, so
        # the dict's equality test tells nothing about a stored digest.
        hit = self._verified.get((key_id, mac))
        if hit is not None and now < hit.until:
            return hit.verified
        return await self._check(key_id, mac, now)

    def _mac(self, secret: str) -> str:
        return digest(self._pepper_bytes, secret)

    async def _check(self, key_id: str, mac: str, now: float) -> Verified | Refusal:
        generation = self._generation
        record = await self._record(key_id, now, generation)
        current = record.digest if record is not None else self._stand_in
        previous = self._stand_in
        if record is not None and record.previous_digest is not None:
            previous = record.previous_digest
        # Both compared, always: the same work for an unknown id, a wrong secret, a right one.
        is_current = hmac.compare_digest(mac, current)
        is_previous = hmac.compare_digest(mac, previous)
        if record is None:
            return Refusal("invalid" if self._store.keys_known else "unreadable", key_id)
        grace = record.previous_until
        in_grace = is_previous and grace is not None and now < grace
        if not (is_current or in_grace):
            return Refusal("invalid", key_id)
        status = record.status(now)
        if status != "active":
            return Refusal("revoked" if status == "revoked" else "expired", key_id)
        deprecated_until = None if is_current else grace
        warning = self._auth.key_expiry_warning
        expires = record.expires_at
        expires_soon = expires is not None and expires - now <= warning
        principal = _principal(record, deprecated_until, expires_soon)
        verified = Verified(principal, record, deprecated_until, expires_soon)
        if self._auth.key_cache > 0 and generation == self._generation:
            # Remembered no longer than anything it says stays true.
            ends = [now + self._auth.key_cache]
            ends.extend(t for t in (expires, deprecated_until, record.revoked_at) if t is not None)
            if expires is not None and not expires_soon:
                ends.append(expires - warning)
            _remember(self._verified, (key_id, mac), _Hit(min(ends), verified), now)
        return verified

    async def _record(self, key_id: str, now: float, generation: int) -> KeyRecord | None:
        cached = self._records.get(key_id)
        if cached is not None and now < cached[0]:
            return cached[1]
        record = self._declared.get(key_id)
        if record is None:
            record = _stored(await self._store.get_key(key_id), key_id)
        known = record is not None or self._store.keys_known  # not "no such key" for a second
        if self._auth.key_cache > 0 and generation == self._generation and known:
            _remember(self._records, key_id, (now + self._auth.key_cache, record), now)
        return record

    def _forget(self, key_id: str) -> None:
        """A local change: this ring stops trusting what it cached of the key at once."""
        self._generation += 1
        self._records.pop(key_id, None)
        for cached in [cached for cached in self._verified if cached[0] == key_id]:
            del self._verified[cached]

    # -- admin ----------------------------------------------------------------------------------
    async def create(
        self, spec: KeySpec, creator: AdminCaller, *, audit: Audit | None = None
    ) -> tuple[KeyRecord, Secret]:
        """A new key: its record, and the key itself (shown once, never stored)."""
        _may_write(creator)
        if not creator.sees(spec.team):
            teams = ", ".join(sorted(creator.teams or ()))
            raise KeyRefused(
                f"you may create keys only for your own teams ({teams}), not {spec.team}", 403
            )
        if spec.pool is not None and self._pools is not None:
            pools = self._pools()
            if spec.pool not in pools:
                shown = ", ".join(sorted(pools)) or "none are configured"
                raise KeyRefused(f"no upstream has a credential pool {spec.pool} ({shown})")
        if spec.pool is not None and creator.teams is not None:
            # A team-bound creator names only its teams' pools (auth.team_pools): any other
            # pool spends a provider account that is not its teams' to give.
            own = {p for t, p in self._auth.team_pools.items() if t in creator.teams}
            if spec.pool not in own:
                raise KeyRefused(
                    f"the credential pool {spec.pool} is not one of your teams' (auth.team_pools);"
                    " a key of yours may use your teams' pools, or name none",
                    403,
                )
        now = self._clock()
        key_id = await self._free_id()
        _, token = new_key(key_id)
        record = KeyRecord(
            id=key_id,
            name=spec.name,
            team=spec.team,
            scopes=tuple(spec.scopes),
            models=tuple(dict.fromkeys(spec.models)),
            pool=spec.pool,
            created_at=now,
            created_by=creator.actor,
            expires_at=now + min(_expires(spec) or self._auth.key_expiry, MAX_EXPIRY),
            digest=self._token_digest(token),
        )
        await self._store_change(record, audit)
        return record, token

    async def rotate(
        self,
        key_id: str,
        grace: float | None,
        by: AdminCaller,
        *,
        audit: Audit | None = None,
    ) -> tuple[KeyRecord, Secret]:
        """A new secret for the same id; the previous one keeps working for ``grace``
        seconds (default ``auth.rotation_grace``; 0: refused at once)."""
        record = await self._editable(key_id, by)
        now = self._clock()
        status = record.status(now)
        if status != "active":
            raise KeyRefused(
                f"key {key_id} is {status}: a rotation would not bring it back; create a new key",
                409,
            )
        grace = self._auth.rotation_grace if grace is None else grace
        if not 0 <= grace <= MAX_GRACE:
            raise KeyRefused(f"grace must be between 0 and {MAX_GRACE / 86400:g} days")
        _, token = new_key(key_id)
        rotated = replace(
            record,
            digest=self._token_digest(token),
            previous_digest=record.digest if grace > 0 else None,
            previous_until=now + grace if grace > 0 else None,
            rotated_at=now,
        )
        await self._store_change(rotated, audit)
        return rotated, token

    async def revoke(
        self, key_id: str, by: AdminCaller, now: bool = False, *, audit: Audit | None = None
    ) -> KeyRecord:
        """Refused from now on: at once on this ring, within ``auth.key_cache`` on the others.
        ``now`` asks that other replicas drop it at once too: a shared store with a change
        feed (the scale-out issue's Redis) will broadcast it; the stores of this release are
        one process's, where the two are the same. Revoking a revoked key changes nothing."""
        record = await self._editable(key_id, by)
        if record.revoked_at is not None:
            return record
        revoked = replace(record, revoked_at=self._clock())
        await self._store_change(revoked, audit)
        return revoked

    async def get(self, key_id: str) -> KeyRecord | None:
        """The record as stored now (not cached); None for an unknown or malformed id."""
        if not KEY_ID.match(key_id):
            return None
        declared = self._declared.get(key_id)
        if declared is not None:
            return declared
        return _stored(await self._store.get_key(key_id), key_id)

    async def list(self, teams: frozenset[str] | None = None) -> builtins.list[KeyRecord]:
        """Every key (of ``teams`` only, when given), oldest first; declared keys first."""
        stored = [_stored(data, None) for data in await self._store.list_keys()]
        records = [*self._declared.values(), *(r for r in stored if r is not None)]
        if teams is not None:
            records = [r for r in records if r.team in teams]
        return sorted(records, key=lambda r: (not r.declared, r.created_at or 0.0, r.id))

    async def _editable(self, key_id: str, by: AdminCaller) -> KeyRecord:
        _may_write(by)
        record = await self.get(key_id)
        if record is None or not by.sees(record.team):
            raise KeyRefused("no such key" if not KEY_ID.match(key_id) else f"no key {key_id}", 404)
        if record.declared:
            raise KeyRefused(
                f"key {key_id} is declared in the config (auth.keys): rotate or revoke it by "
                "changing the config, then reload",
                409,
            )
        return record

    async def _free_id(self) -> str:
        # 62**12 ids: a clash is all but impossible, and checked all the same.
        for _ in range(8):
            key_id = new_id()
            if key_id not in self._declared and await self._store.get_key(key_id) is None:
                return key_id
        raise KeyRefused("no free key id could be drawn; try again", 503)  # pragma: no cover

    def _token_digest(self, token: Secret) -> str:
        parsed = parse(token.reveal())
        assert parsed is not None  # made by new_key
        return self._mac(parsed[1])

    async def _store_change(self, record: KeyRecord, audit: Audit | None) -> None:
        if audit is not None:
            await audit(record)  # raises to refuse: nothing is written
        await self._store.put_key(record.to_json())
        self._forget(record.id)


_MALFORMED_SECRET = "0" * SECRET_LENGTH


def _may_write(caller: AdminCaller) -> None:
    if not caller.may(WRITE_SCOPE):
        raise KeyRefused(f"changing keys needs the {WRITE_SCOPE} scope (key-admin or admin)", 403)


def _expires(spec: KeySpec) -> float | None:
    # ``KeySpec._lifetime`` made it seconds.
    return None if spec.expires is None else float(spec.expires)


def _principal(record: KeyRecord, deprecated_until: float | None, expires_soon: bool) -> Principal:
    return Principal(
        id=f"{KEY}:{record.id}",
        kind=KEY,
        owner=record.id,
        team=record.team,
        scopes=frozenset(record.scopes),
        models=record.models,
        pool=record.pool,
        name=record.name,
        expires_at=record.expires_at,
        deprecated_until=deprecated_until,
        expires_soon=expires_soon,
    )


def _declared(key: DeclaredKey) -> KeyRecord:
    """A key of ``auth.keys`` as a read-only record; ``ValueError`` for one that could never
    verify or would hold what no key may."""
    if len(key.id) != ID_LENGTH:
        raise ValueError(
            f"auth.keys: {key.id}: a gateway key's id is {ID_LENGTH} characters "
            "(copy it from `gateway keys hash`)"
        )
    unknown = sorted(set(key.scopes) - SCOPES)
    if unknown:
        raise ValueError(f"auth.keys: {key.id}: unknown scope(s) {', '.join(unknown)}")
    return KeyRecord(
        id=key.id,
        name=key.name,
        team=key.team,
        scopes=tuple(sorted(set(key.scopes))),
        models=tuple(key.models),
        pool=key.pool,
        created_at=None,
        created_by="config",
        expires_at=key.expires,
        digest=key.hash,
        declared=True,
    )


def _stored(data: dict[str, Any] | None, key_id: str | None) -> KeyRecord | None:
    """A record from the store; a corrupt one is logged (by id) and treated as absent: it
    must not verify, and must not stop the others from being listed."""
    if data is None:
        return None
    try:
        record = KeyRecord.from_json(data)
    except ValueError as exc:
        log.error("key store: the record of key %s is unreadable: %s", key_id or "?", exc)
        return None
    if key_id is not None and record.id != key_id:
        log.error("key store: the record stored for key %s names another id", key_id)
        return None
    return record


def _remember(cache: dict[Any, Any], key: Any, value: Any, now: float) -> None:
    if len(cache) >= MAX_CACHED and key not in cache:
        for stale in [k for k, v in cache.items() if _until(v) <= now]:
            del cache[stale]
        if len(cache) >= MAX_CACHED:
            cache.clear()
    cache[key] = value


def _until(entry: Any) -> float:
    until: float = entry.until if isinstance(entry, _Hit) else entry[0]
    return until
