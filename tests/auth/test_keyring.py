"""KeyRing: keys verified (unknown id and wrong secret alike), expiring, rotated with a grace,
revoked at once here and within ``key_cache`` on another replica, declared read-only, and
never made with more than their creator holds."""

from __future__ import annotations

import hmac
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.auth import keyring as keyring_module
from gateway.auth.config import AuthSettings, DeclaredKey
from gateway.auth.keyring import MAX_CACHED, KeyRefused, KeyRing, KeySpec, Refusal, Verified
from gateway.auth.keys import KeyRecord, checksum, digest, new_key, parse
from gateway.auth.principal import AdminCaller
from gateway.secret import Secret
from gateway.store import MemoryStore

PEPPER = Secret("keyring-test-pepper-" + "k" * 30)
ADMIN = AdminCaller("token:0123456789ab", "token", frozenset({"admin"}))
SEARCH_ADMIN = AdminCaller("oidc:ana", "oidc", frozenset({"key-admin"}), frozenset({"search"}))
VIEWER = AdminCaller("oidc:vic", "oidc", frozenset({"viewer", "auditor"}))
DAY = 86400.0


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class CountingStore(MemoryStore):
    """The memory store, counting how often keys are read from it."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def get_key(self, key_id: str) -> dict[str, Any] | None:
        self.reads += 1
        return await super().get_key(key_id)


def _ring(store: Any, clock: Clock, pools: set[str] | None = None, **auth: Any) -> KeyRing:
    settings = AuthSettings.model_validate(auth)
    return KeyRing(
        store, PEPPER, settings, clock=clock, pools=None if pools is None else lambda: pools
    )


async def _new(ring: KeyRing, **spec: Any) -> tuple[KeyRecord, str]:
    record, key = await ring.create(
        KeySpec.model_validate({"team": "search", "name": "ci", **spec}), ADMIN
    )
    return record, key.reveal()


def _with_id(token: str, key_id: str) -> str:
    body = f"gw_{key_id}_{token[16:59]}"
    return body + checksum(body)


def _with_secret(token: str, secret: str) -> str:
    body = f"{token[:16]}{secret}"
    return body + checksum(body)


def _other_secret(token: str) -> str:
    return _with_secret(token, new_key()[1].reveal()[16:59])


async def test_a_created_key_verifies_as_its_principal() -> None:
    clock = Clock()
    ring = _ring(MemoryStore(), clock)
    record, token = await _new(ring, models=["claude-*"], pool="platform", expires="30d")
    verified = await ring.verify(token)
    assert isinstance(verified, Verified) and verified.ok
    principal = verified.principal
    assert principal.id == f"key:{record.id}" and principal.kind == "key"
    assert (principal.owner, principal.team, principal.name) == (record.id, "search", "ci")
    assert principal.scopes == frozenset({"llm"}) and principal.models == ("claude-*",)
    assert principal.pool == "platform" and principal.expires_at == clock.now + 30 * DAY
    assert verified.deprecated_until is None and not verified.expires_soon
    assert record.created_by == ADMIN.actor and record.digest != token[16:59]


async def test_an_unknown_id_and_a_wrong_secret_take_the_same_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compared: list[int] = []
    real = hmac.compare_digest

    def counted(a: Any, b: Any) -> bool:
        compared.append(1)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counted)
    store = CountingStore()
    ring = _ring(store, Clock(), key_cache=0)
    _, token = await _new(ring)
    outcomes = []
    for attempt in (_other_secret(token), _with_id(token, "ZZZZZZZZZZZZ")):
        store.reads, compared[:] = 0, []
        refusal = await ring.verify(attempt)
        outcomes.append((type(refusal), refusal.reason, store.reads, len(compared)))
    assert outcomes[0] == outcomes[1] == (Refusal, "invalid", 1, 2)


async def test_the_answer_names_only_the_id_the_caller_sent() -> None:
    ring = _ring(MemoryStore(), Clock())
    _, token = await _new(ring)
    unknown = _with_id(token, "ZZZZZZZZZZZZ")
    assert await ring.verify(unknown) == Refusal("invalid", "ZZZZZZZZZZZZ")
    assert await ring.verify(_other_secret(token)) == Refusal("invalid", token[3:15])
    for malformed in ("gw_" + token, token[1:], token[:-1] + "!", "gw_", "sk-ant-api03-xyz", ""):
        assert await ring.verify(malformed) == Refusal("invalid", None)


async def test_an_expired_key_is_refused_and_warned_before() -> None:
    clock = Clock()
    ring = _ring(MemoryStore(), clock, key_expiry_warning="7d")
    record, token = await _new(ring, expires="10d")
    clock.now += 3 * DAY + 1
    verified = await ring.verify(token)
    assert isinstance(verified, Verified) and verified.expires_soon
    assert verified.principal.expires_soon
    clock.now = record.expires_at  # type: ignore[assignment]
    assert await ring.verify(token) == Refusal("expired", record.id)
    # Only a caller holding the secret learns that the key exists and has expired.
    assert await ring.verify(_other_secret(token)) == Refusal("invalid", record.id)


async def test_a_cached_verification_never_outlives_the_key() -> None:
    clock = Clock()
    ring = _ring(MemoryStore(), clock, key_cache=60)
    record, token = await _new(ring, expires=30)
    assert (await ring.verify(token)).ok
    clock.now += 31
    assert await ring.verify(token) == Refusal("expired", record.id)


async def test_the_default_expiry_is_the_configured_one() -> None:
    clock = Clock()
    ring = _ring(MemoryStore(), clock, key_expiry="90d")
    record, _ = await _new(ring)
    assert record.expires_at == clock.now + 90 * DAY


async def test_rotation_keeps_the_id_and_the_old_secret_for_its_grace() -> None:
    clock = Clock()
    ring = _ring(MemoryStore(), clock)
    record, old = await _new(ring)
    rotated, new = await ring.rotate(record.id, 3600, ADMIN)
    new_token = new.reveal()
    assert rotated.id == record.id and new_token[3:15] == record.id and new_token != old
    assert rotated.previous_until == clock.now + 3600 and rotated.rotated_at == clock.now

    fresh = await ring.verify(new_token)
    assert isinstance(fresh, Verified) and fresh.deprecated_until is None
    stale = await ring.verify(old)
    assert isinstance(stale, Verified) and stale.deprecated_until == clock.now + 3600
    assert stale.principal.deprecated_until == clock.now + 3600
    assert stale.principal.id == fresh.principal.id, "usage and budgets go on under the id"

    clock.now += 3600
    assert await ring.verify(old) == Refusal("invalid", record.id)
    assert (await ring.verify(new_token)).ok


async def test_a_rotation_without_grace_refuses_the_old_secret_at_once() -> None:
    clock = Clock()
    ring = _ring(MemoryStore(), clock, rotation_grace="24h")
    record, old = await _new(ring)
    assert (await ring.verify(old)).ok  # cached: the rotation must drop it
    rotated, _ = await ring.rotate(record.id, 0, ADMIN)
    assert rotated.previous_digest is None and rotated.previous_until is None
    assert await ring.verify(old) == Refusal("invalid", record.id)
    defaulted, _ = await ring.rotate(record.id, None, ADMIN)
    assert defaulted.previous_until == clock.now + DAY


async def test_a_revocation_holds_at_once_here_and_within_key_cache_on_another_replica() -> None:
    clock = Clock()
    store = MemoryStore()
    here, there = _ring(store, clock, key_cache=1), _ring(store, clock, key_cache=1)
    record, token = await _new(here)
    assert (await here.verify(token)).ok and (await there.verify(token)).ok
    revoked = await here.revoke(record.id, ADMIN)
    assert revoked.revoked_at == clock.now
    assert await here.verify(token) == Refusal("revoked", record.id)
    assert (await there.verify(token)).ok, "the other replica trusts its cache a moment"
    clock.now += 1
    assert await there.verify(token) == Refusal("revoked", record.id)
    again = await here.revoke(record.id, ADMIN, now=True)
    assert again == revoked, "revoking a revoked key changes nothing"


async def test_a_lookup_in_flight_during_a_revocation_is_not_cached() -> None:
    """A verification that read the record before a revocation landed must not keep it."""
    store = MemoryStore()

    class Racing:
        """The store, with a revocation landing while a read is on its way (once)."""

        armed = False

        async def get_key(self, key_id: str) -> dict[str, Any] | None:
            data = await store.get_key(key_id)
            if self.armed:
                self.armed = False
                await ring.revoke(key_id, ADMIN)
            return data

        async def put_key(self, record: dict[str, Any]) -> None:
            await store.put_key(record)

        async def list_keys(self) -> list[dict[str, Any]]:
            return await store.list_keys()

    racing = Racing()
    ring = _ring(racing, Clock(), key_cache=60)
    record, token = await _new(ring)
    racing.armed = True
    assert (await ring.verify(token)).ok  # it read the record before the revocation
    assert await ring.verify(token) == Refusal("revoked", record.id)


async def test_changes_are_audited_before_they_are_made() -> None:
    store = MemoryStore()
    clock = Clock()
    ring = _ring(store, clock)
    seen: list[KeyRecord] = []

    async def refuse(record: KeyRecord) -> None:
        seen.append(record)
        raise RuntimeError("the audit log is full")

    with pytest.raises(RuntimeError):
        await ring.create(KeySpec(team="search", name="ci"), ADMIN, audit=refuse)
    assert await store.list_keys() == [] and seen[0].team == "search"
    record, token = await _new(ring)
    with pytest.raises(RuntimeError):
        await ring.rotate(record.id, 0, ADMIN, audit=refuse)
    with pytest.raises(RuntimeError):
        await ring.revoke(record.id, ADMIN, audit=refuse)
    assert (await ring.verify(token)).ok, "nothing changed"
    assert await ring.get(record.id) == record


async def test_declared_keys_verify_and_are_read_only() -> None:
    key_id, key = new_key()
    token = key.reveal()
    declared = DeclaredKey(
        id=key_id,
        hash=digest(PEPPER.reveal().encode(), token[16:59]),
        name="deploy",
        team="platform",
        models=["gpt-*"],
    )
    ring = _ring(MemoryStore(), Clock(), keys=[declared.model_dump()])
    await ring.load_declared()
    verified = await ring.verify(token)
    assert isinstance(verified, Verified) and verified.record.declared
    assert verified.principal.team == "platform" and verified.principal.models == ("gpt-*",)
    for change in (ring.rotate(key_id, None, ADMIN), ring.revoke(key_id, ADMIN)):
        with pytest.raises(KeyRefused, match=r"declared in the config \(auth.keys\)") as refused:
            await change
        assert refused.value.status == 409
    assert [r.id for r in await ring.list()] == [key_id]


def test_a_declared_key_that_could_never_verify_is_refused() -> None:
    for key in (
        {"id": "short1", "hash": "a" * 64, "name": "n", "team": "t"},
        {"id": "A" * 12, "hash": "a" * 64, "name": "n", "team": "t", "scopes": ["admin"]},
    ):
        with pytest.raises(ValueError, match=r"auth\.keys"):
            _ring(MemoryStore(), Clock(), keys=[key])


async def test_a_key_never_gets_more_than_its_creator_holds() -> None:
    ring = _ring(MemoryStore(), Clock(), pools={"platform"})
    spec = KeySpec(team="billing", name="ci")
    with pytest.raises(KeyRefused, match="your own teams") as other_team:
        await ring.create(spec, SEARCH_ADMIN)
    assert other_team.value.status == 403
    with pytest.raises(KeyRefused, match="keys:write") as read_only:
        await ring.create(spec, VIEWER)
    assert read_only.value.status == 403
    with pytest.raises(KeyRefused, match="no upstream has a credential pool"):
        await ring.create(KeySpec(team="search", name="ci", pool="elsewhere"), SEARCH_ADMIN)
    record, _ = await ring.create(KeySpec(team="search", name="ci"), SEARCH_ADMIN)
    assert record.team == "search"
    billing, _ = await ring.create(spec, ADMIN)
    for change in (
        ring.rotate(billing.id, None, SEARCH_ADMIN),
        ring.revoke(billing.id, SEARCH_ADMIN),
    ):
        with pytest.raises(KeyRefused, match=f"no key {billing.id}") as hidden:
            await change
        assert hidden.value.status == 404, "another team's key is as if absent"
    assert [r.id for r in await ring.list(SEARCH_ADMIN.teams)] == [record.id]
    assert {r.id for r in await ring.list()} == {record.id, billing.id}


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"scopes": ["admin"]}, "unknown scope"),
        ({"scopes": []}, "at least 1"),
        ({"expires": "11000d"}, "at most 3650 days"),
        ({"expires": 0}, "more than 0"),
        ({"expires": -5}, "more than 0"),
        ({"expires": "forever"}, "not a duration"),
        ({"expires": True}, "valid"),
        ({"team": "../etc"}, "pattern"),
        ({"team": 5}, "valid string"),
        ({"models": ["claude-*", "a b"]}, "pattern"),
        ({"models": ["m"] * 65}, "at most 64"),
        ({"pool": "x" * 65}, "pattern"),
    ],
)
def test_a_spec_refuses_what_no_key_may_hold(body: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        KeySpec.model_validate({"team": "search", "name": "ci", **body})


FIELDS = set(KeySpec.model_fields)


@given(
    st.dictionaries(
        st.text(min_size=1, max_size=30).filter(lambda name: name not in FIELDS),
        st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20)),
        min_size=1,
        max_size=5,
    )
)
def test_a_spec_never_takes_a_field_it_does_not_know(extra: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as refused:
        KeySpec.model_validate({"team": "search", "name": "ci", **extra})
    assert {e["type"] for e in refused.value.errors()} == {"extra_forbidden"}


async def test_a_corrupt_stored_record_never_verifies(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore()
    ring = _ring(store, Clock(), key_cache=0)
    record, token = await _new(ring)
    await store.put_key({**record.to_json(), "digest": 42})
    assert await ring.verify(token) == Refusal("invalid", record.id)
    assert await ring.get(record.id) is None and await ring.list() == []
    assert f"key {record.id} is unreadable" in caplog.text and token[16:59] not in caplog.text


async def test_ids_sprayed_at_the_ring_do_not_grow_its_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(keyring_module, "MAX_CACHED", 50)
    ring = _ring(MemoryStore(), Clock(), key_cache=60)
    _, token = await _new(ring)
    for n in range(500):
        assert (await ring.verify(_with_id(token, f"{n:012d}"))).reason == "invalid"
        assert len(ring._records) <= 50
    assert MAX_CACHED == 10_000


async def test_a_secret_never_reaches_a_record_or_a_repr() -> None:
    store = MemoryStore()
    ring = _ring(store, Clock())
    record, token = await _new(ring)
    stored = str(await store.list_keys())
    secret = parse(token)[1]  # type: ignore[index]
    assert secret not in stored and token not in stored and PEPPER.reveal() not in stored
    assert PEPPER.reveal() not in repr(ring) and secret not in repr(record)
