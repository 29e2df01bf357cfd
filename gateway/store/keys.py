"""The key table every store keeps beside its sessions: gateway key records by public id
(``gateway.auth.keys.KeyRecord.to_json``), so that a store shared by replicas shares them.

Records are held as JSON bytes, as a backend stores them: what a caller gets is its own
copy, and a record that does not encode is refused when it is put, not when it is read.
Key changes are rare admin actions: a backend with a disk writes each one at once and the
put returns once it is written (``_persist_key``); reads are served from memory.
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson

MAX_KEY_ID = 64
"""The longest id the table takes (public ids are 12 characters; config ids up to 32)."""


class KeyStore(Protocol):
    """What ``gateway.auth.keyring.KeyRing`` asks of a store."""

    async def put_key(self, record: dict[str, Any]) -> None:
        """Create or replace the record with its ``id``; returns once it is stored."""
        ...

    async def get_key(self, key_id: str) -> dict[str, Any] | None: ...

    async def list_keys(self) -> list[dict[str, Any]]: ...

    @property
    def keys_known(self) -> bool:
        """Whether the store has its keys at hand: False for a shared store it could not read
        yet (Redis away since start), where an unknown key may be one it holds."""
        ...


class KeyTable:
    """Key records in memory; a backend with a disk overrides ``_persist_key`` and fills the
    table at open (``_loaded_keys``). A mixin placed before ``SessionTable``."""

    keys_known = True
    """Its table is every key there is (``KeyStore.keys_known``); a Redis store sets it once it
    has read its keys."""

    def __init__(self) -> None:
        super().__init__()
        self._keys: dict[str, bytes] = {}

    async def put_key(self, record: dict[str, Any]) -> None:
        key_id = record.get("id")
        if not isinstance(key_id, str) or not 0 < len(key_id) <= MAX_KEY_ID:
            raise ValueError("a key record needs its id")
        data = orjson.dumps(record)
        await self._persist_key(key_id, data)  # stored first: memory never runs ahead of it
        self._keys[key_id] = data

    async def get_key(self, key_id: str) -> dict[str, Any] | None:
        data = self._keys.get(key_id)
        return None if data is None else _decoded(data)

    async def list_keys(self) -> list[dict[str, Any]]:
        return [_decoded(data) for data in self._keys.values()]

    async def _persist_key(self, key_id: str, data: bytes) -> None:
        return None

    def _loaded_keys(self, rows: list[tuple[str, bytes]]) -> None:
        for key_id, data in rows:
            self._keys[key_id] = bytes(data)


def _decoded(data: bytes) -> dict[str, Any]:
    decoded: dict[str, Any] = orjson.loads(data)
    return decoded
