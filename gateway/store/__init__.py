"""Session state: one interface (``Store``), a backend per URL scheme."""

from __future__ import annotations

from urllib.parse import urlparse

from gateway.store.base import LimitExceeded, LoadFailed, Retention, SessionEnded, Store
from gateway.store.memory import MemoryStore
from gateway.store.records import (
    INTERNAL_FIELDS,
    Backlog,
    BudgetCounter,
    BudgetLimit,
    CompactionNote,
    Grant,
    LimitHit,
    Limits,
    ModelTotals,
    SessionQuery,
    SessionRecord,
    TokenTotals,
    TurnEnd,
    TurnStart,
    TurnTicket,
    budget_key_parts,
)
from gateway.store.sqlite import SqliteStore


def open_store(url: str) -> Store:
    """``memory://``, or ``sqlite:///relative.db`` / ``sqlite:////absolute/path.db``."""
    parsed = urlparse(url)
    if parsed.scheme == "memory":
        return MemoryStore()
    if parsed.scheme == "sqlite":
        path = url.removeprefix("sqlite:///")
        if not path or path == url:
            raise ValueError(f"sqlite store needs a file: sqlite:///path.db, got {url!r}")
        return SqliteStore(path)
    raise ValueError(f"unknown store {url!r}: use memory:// or sqlite:///path.db")


__all__ = [
    "INTERNAL_FIELDS",
    "Backlog",
    "BudgetCounter",
    "BudgetLimit",
    "CompactionNote",
    "Grant",
    "LimitExceeded",
    "LimitHit",
    "Limits",
    "LoadFailed",
    "MemoryStore",
    "ModelTotals",
    "Retention",
    "SessionEnded",
    "SessionQuery",
    "SessionRecord",
    "SqliteStore",
    "Store",
    "TokenTotals",
    "TurnEnd",
    "TurnStart",
    "TurnTicket",
    "budget_key_parts",
    "open_store",
]
