"""Session state: one interface (``Store``), a backend per URL scheme."""

from __future__ import annotations

import inspect
import os
import re
from urllib.parse import parse_qsl, unquote, urlencode, urlparse, urlsplit

from redis.asyncio import ConnectionPool

from gateway.secret import Secret
from gateway.store.base import (
    LimitExceeded,
    LoadFailed,
    Retention,
    SessionChanged,
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
from gateway.store.redis import SECRET_PARAMS, RedisStore, display_url
from gateway.store.sqlite import SqliteStore

SHARED_SCHEMES = frozenset({"redis", "rediss", "unix"})
"""Stores several processes share (``gateway serve --workers``, replicas)."""
_PREFIX = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_DB_PATH = re.compile(r"(/[0-9]{0,6})?")


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


def store_url_problem(url: str) -> str | None:
    """What is wrong with a Redis store URL redis-py would refuse only once the store opens
    (a port that is no number, an unknown or bad parameter), or None. Said without the URL:
    it may hold a password."""
    parsed = urlsplit(url)
    if parsed.scheme not in SHARED_SCHEMES:
        return None
    if parsed.scheme != "unix" and not _DB_PATH.fullmatch(parsed.path):
        return "the Redis store URL is refused: its path is a database number (/0)"
    try:
        bare, _, _ = _redis_parts(url)
        pool = ConnectionPool.from_url(bare)
    except ValueError as exc:
        said = str(exc)
        if said.startswith("Invalid value for '"):  # a parameter's name: redis-py's own
            return f"the Redis store URL is refused: {said[:120]}"
        if said.startswith("the Redis store"):
            return said
        # Not echoed: a password holding '/', '@' or '?' unescaped splits where it should not.
        return (
            "the Redis store URL is refused: not redis[s]://[:password@]host[:port][/db]"
            " (a password with '/', '@', ':' or '?' in it is percent-encoded)"
        )
    unknown = set(pool.connection_kwargs) - _accepted(pool.connection_class)
    if unknown:  # the connection would refuse them when it is made, on the first call
        names = ", ".join(sorted(unknown))
        return f"the Redis store URL is refused: a parameter is not Redis's ({names[:200]})"
    return None


def _accepted(connection: type) -> frozenset[str]:
    """The arguments a redis-py connection class takes (its own, then its bases')."""
    names: set[str] = set()
    for cls in connection.__mro__:
        init = cls.__dict__.get("__init__")
        if init is not None:
            names.update(
                name
                for name, p in inspect.signature(init).parameters.items()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name != "self"
            )
    return frozenset(names)


def _query_secrets(url: str) -> list[str]:
    return [
        value
        for name, value in parse_qsl(urlsplit(url).query, keep_blank_values=True)
        if name.strip().lower() in SECRET_PARAMS
    ]


def _redis_parts(url: str) -> tuple[str, str, list[str]]:
    """The URL redis-py reads (``prefix`` taken out), the prefix, and the secrets in it."""
    parsed = urlsplit(url)
    query = parse_qsl(parsed.query, keep_blank_values=True)
    prefixes = [value for name, value in query if name == "prefix"]
    prefix = prefixes[-1] if prefixes else "gateway"
    if not _PREFIX.fullmatch(prefix):
        raise ValueError("the Redis store's prefix is 1-64 letters, digits, '_', '.' or '-'")
    rest = urlencode([(name, value) for name, value in query if name != "prefix"])
    bare = url.split("?", 1)[0] + (f"?{rest}" if rest else "")
    secrets = [s for s in (parsed.password, *_query_secrets(url)) if s]
    return bare, prefix, [*secrets, *(unquote(s) for s in secrets)]


def _redis(url: str, store_summaries: bool) -> RedisStore:
    problem = store_url_problem(url)
    if problem is not None:
        raise ValueError(problem)
    bare, prefix, secrets = _redis_parts(url)
    for secret in secrets:
        Secret(secret)  # known to the redactor: never in a log line or a span
    password = None
    if urlsplit(url).password is None and os.environ.get("GATEWAY_REDIS_PASSWORD"):
        password = Secret(os.environ["GATEWAY_REDIS_PASSWORD"])
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
    "SessionChanged",
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
    "store_url_problem",
]
