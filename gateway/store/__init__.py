"""Session state: one interface (``Store``), a backend per URL scheme."""

from __future__ import annotations

import os
import re
from urllib.parse import parse_qsl, urlencode, urlparse

from gateway.secret import Secret
from gateway.store.base import (
    LimitExceeded,
    LoadFailed,
    Retention,
    SessionEnded,
    Store,
    StoreRefused,
)
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
from gateway.store.redis import RedisStore, display_url
from gateway.store.sqlite import SqliteStore

SHARED_SCHEMES = frozenset({"redis", "rediss", "unix"})
"""Stores several processes share (``gateway serve --workers``, replicas)."""
_PREFIX = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def open_store(url: str, *, store_summaries: bool = False) -> Store:
    """``memory://``; ``sqlite:///relative.db`` / ``sqlite:////absolute/path.db``; or Redis:
    ``redis://[:password@]host:6379/0``, ``rediss://`` (TLS), ``unix:///path.sock?db=0``, each
    with an optional ``?prefix=name`` (default ``gateway``; keys are ``gw:{name}:...``). The
    password comes from the URL or ``GATEWAY_REDIS_PASSWORD``. ``store_summaries``: whether
    compaction's saved rewrites (summaries) are written to the store's disk or server."""
    parsed = urlparse(url)
    if parsed.scheme == "memory":
        return MemoryStore()
    if parsed.scheme == "sqlite":
        path = url.removeprefix("sqlite:///")
        if not path or path == url:
            raise ValueError(f"sqlite store needs a file: sqlite:///path.db, got {url!r}")
        return SqliteStore(path, store_summaries=store_summaries)
    if parsed.scheme in SHARED_SCHEMES:
        return _redis(url, store_summaries)
    raise ValueError(
        f"unknown store {display_url(url)!r}: use memory://, sqlite:///path.db or"
        " redis://host:6379/0"
    )


def _redis(url: str, store_summaries: bool) -> RedisStore:
    parsed = urlparse(url)
    query = parse_qsl(parsed.query, keep_blank_values=True)
    prefixes = [value for name, value in query if name == "prefix"]
    prefix = prefixes[-1] if prefixes else "gateway"
    if not _PREFIX.fullmatch(prefix):
        raise ValueError("the Redis store's prefix is 1-64 letters, digits, '_', '.' or '-'")
    rest = urlencode([(name, value) for name, value in query if name != "prefix"])
    bare = url.split("?", 1)[0] + (f"?{rest}" if rest else "")
    password = None
    if parsed.password is None and os.environ.get("GATEWAY_REDIS_PASSWORD"):
        password = Secret(os.environ["GATEWAY_REDIS_PASSWORD"])
    elif parsed.password:
        Secret(parsed.password)  # known to the redactor: never in a log line or a span
    return RedisStore(bare, prefix=prefix, password=password, store_summaries=store_summaries)


__all__ = [
    "INTERNAL_FIELDS",
    "SHARED_SCHEMES",
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
    "RedisStore",
    "Retention",
    "SessionEnded",
    "SessionQuery",
    "SessionRecord",
    "SqliteStore",
    "Store",
    "StoreRefused",
    "TokenTotals",
    "TurnEnd",
    "TurnStart",
    "TurnTicket",
    "budget_key_parts",
    "display_url",
    "open_store",
]
