"""The stores' key table: records kept by id, each caller given its own copy; in SQLite each
change written at once and read back after a restart."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from gateway.auth.config import AuthSettings
from gateway.auth.keyring import KeyRing, KeySpec, Verified
from gateway.auth.principal import AdminCaller
from gateway.secret import Secret
from gateway.store import MemoryStore, SqliteStore
from tests.harness import disk_error

PEPPER = Secret("store-test-pepper-" + "s" * 30)
ADMIN = AdminCaller("token:0123456789ab", "token", frozenset({"admin"}))


def _record(key_id: str = "AbCdEfGhIjKl", **changes: Any) -> dict[str, Any]:
    return {"id": key_id, "name": "ci", "team": "search", "scopes": ["llm"], **changes}


async def test_the_memory_table_keeps_records_and_hands_out_copies() -> None:
    store = MemoryStore()
    assert await store.get_key("AbCdEfGhIjKl") is None and await store.list_keys() == []
    record = _record()
    await store.put_key(record)
    record["team"] = "changed after the put"
    got = await store.get_key("AbCdEfGhIjKl")
    assert got == _record()
    assert got is not None
    got["scopes"].append("upstream:byok")
    assert await store.get_key("AbCdEfGhIjKl") == _record(), "a caller's copy is its own"
    await store.put_key(_record(team="billing"))
    assert await store.list_keys() == [_record(team="billing")]


@pytest.mark.parametrize("bad", [{}, {"id": 5}, {"id": ""}, {"id": "x" * 65}])
async def test_a_record_without_a_usable_id_is_refused(bad: dict[str, Any]) -> None:
    store = MemoryStore()
    with pytest.raises(ValueError, match="id"):
        await store.put_key(bad)
    assert await store.list_keys() == []


async def test_sqlite_keys_survive_a_restart_and_verify_after_it(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    first = SqliteStore(path)
    await first.open()
    ring = KeyRing(first, PEPPER, AuthSettings())
    record, key = await ring.create(KeySpec(team="search", name="ci"), ADMIN)
    revoked, _ = await ring.create(KeySpec(team="search", name="old"), ADMIN)
    await ring.revoke(revoked.id, ADMIN)
    await first.close()

    second = SqliteStore(path)
    await second.open()
    try:
        again = KeyRing(second, PEPPER, AuthSettings())
        assert {r.id for r in await again.list()} == {record.id, revoked.id}
        assert isinstance(await again.verify(key.reveal()), Verified)
        assert await again.get(revoked.id) == await ring.get(revoked.id)
    finally:
        await second.close()


async def test_sqlite_writes_a_key_before_the_put_returns(tmp_path: Path) -> None:
    """Not behind, as sessions are: a key change is on disk when the admin is answered."""
    path = tmp_path / "gateway.db"
    store = SqliteStore(path, flush_interval=3600)
    await store.open()
    try:
        await store.put_key(_record())
        rows = await asyncio.to_thread(_rows, path)
        assert [row[0] for row in rows] == ["AbCdEfGhIjKl"]
    finally:
        await store.close()


def _rows(path: Path) -> list[tuple[str, bytes]]:
    with sqlite3.connect(path) as db:
        return list(db.execute("SELECT id, data FROM keys"))


async def test_sqlite_a_failed_key_write_changes_nothing(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "gateway.db")
    await store.open()
    try:
        ring = KeyRing(store, PEPPER, AuthSettings())
        record, key = await ring.create(KeySpec(team="search", name="ci"), ADMIN)
        store._write_key = disk_error  # type: ignore[method-assign, assignment]
        with pytest.raises(sqlite3.OperationalError):
            await ring.revoke(record.id, ADMIN)
        assert await ring.get(record.id) == record
        assert isinstance(await ring.verify(key.reveal()), Verified), "still not revoked"
    finally:
        await store.close()
