"""open_store: one backend per URL scheme."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.redact import REDACTOR
from gateway.store import (
    MemoryStore,
    RedisStore,
    SqliteStore,
    display_url,
    open_store,
    store_url_problem,
)


def test_memory_url() -> None:
    assert isinstance(open_store("memory://"), MemoryStore)


def test_sqlite_relative_path() -> None:
    store = open_store("sqlite:///gateway.db")
    assert isinstance(store, SqliteStore)
    assert store.path == Path("gateway.db")
    assert not store.path.is_absolute()


def test_sqlite_relative_path_with_folders() -> None:
    store = open_store("sqlite:///data/sessions/gateway.db")
    assert isinstance(store, SqliteStore)
    assert store.path == Path("data/sessions/gateway.db")


def test_sqlite_absolute_path() -> None:
    store = open_store("sqlite:////var/lib/gateway/gateway.db")
    assert isinstance(store, SqliteStore)
    assert store.path == Path("/var/lib/gateway/gateway.db")


async def test_sqlite_url_opens_a_working_store(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/nested/gateway.db")
    assert isinstance(store, SqliteStore)
    assert store.path == tmp_path / "nested" / "gateway.db"
    await store.open()
    await store.close()
    assert store.path.is_file()


@pytest.mark.parametrize("url", ["sqlite:///", "sqlite://", "sqlite://gateway.db"])
def test_sqlite_without_a_file(url: str) -> None:
    with pytest.raises(ValueError, match="sqlite"):
        open_store(url)


@pytest.mark.parametrize("url", ["postgres://db", "gateway.db", "", "memcached://:pw@host"])
def test_unknown_scheme(url: str) -> None:
    with pytest.raises(ValueError, match="unknown store") as refused:
        open_store(url)
    assert "pw@" not in str(refused.value)  # a password in a URL is never echoed


@pytest.mark.parametrize(
    ("url", "prefix", "bare"),
    [
        ("redis://localhost:6379/0", "gateway", "redis://localhost:6379/0"),
        ("rediss://:pw@cache:6380/2?prefix=team-a", "team-a", "rediss://:pw@cache:6380/2"),
        ("unix:///run/redis.sock?db=1&prefix=x.y", "x.y", "unix:///run/redis.sock?db=1"),
    ],
)
def test_redis_urls(url: str, prefix: str, bare: str) -> None:
    store = open_store(url)
    assert isinstance(store, RedisStore)
    assert store.keys.base == f"gw:{{{prefix}}}:"
    assert store.url == bare
    assert "pw" not in store.shown_url


@pytest.mark.parametrize("prefix", ["", "a b", "x" * 65, "{tag}", "a:b"])
def test_a_redis_prefix_is_a_plain_name(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        open_store(f"redis://localhost/0?prefix={prefix}")


def test_the_redis_password_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_REDIS_PASSWORD", "from-the-env-0123456789")
    store = open_store("redis://localhost:6379/0")
    assert isinstance(store, RedisStore)
    assert store._password is not None
    assert store._password.reveal() == "from-the-env-0123456789"
    assert "from-the-env" not in repr(store._password)
    assert display_url("redis://user:secret@h:1/0") == "redis://user:***@h:1/0"
    assert display_url("redis://:secret@h:1/0") == "redis://:***@h:1/0"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pa/ss@h:1/0", "redis://:***@h:1/0"),  # '/' unescaped in the password
        ("redis://:pa?ss@h:1/0", "redis://:***@h:1/0"),  # '?' unescaped
        ("redis://a@b@h/0", "redis://***@h/0"),  # '@' unescaped
        ("unix:///s.sock?db=1&password=xyz&x=1", "unix:///s.sock?db=1&password=***"),
        ("rediss://u:p@h/0?ssl_password=q", "rediss://u:***@h/0?ssl_password=***"),
        ("redis://:p@h/0?password=a@b", "redis://:***@h/0?password=***"),
        ("redis://:pa?password=x@h/0", "redis://***"),  # nothing of it can be told apart
        ("redis://h:1/0?db=2", "redis://h:1/0?db=2"),
    ],
)
def test_display_url_hides_every_password(url: str, shown: str) -> None:
    assert display_url(url) == shown


@settings(max_examples=300, deadline=None)
@given(
    password=st.text(st.characters(codec="ascii", exclude_categories=("Cc",)), min_size=6),
    where=st.sampled_from(["authority", "query", "both"]),
)
def test_no_password_shows_in_display_url(password: str, where: str) -> None:
    """Whatever a password holds, escaped or not: the shown URL has none of it (a fragment
    of four characters or more)."""
    authority = f":{password}@" if where != "query" else ""
    query = f"?db=0&password={password}" if where != "authority" else ""
    shown = display_url(f"redis://{authority}cache.internal:6379/0{query}")
    fragments = {password[i : i + 6] for i in range(len(password) - 5)}
    frame = "redis://cache.internal:6379/0?db=0&password=***"
    leaked = [f for f in fragments if f in shown and f not in frame]
    assert not leaked, shown


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("redis://:s3cret-pw@127.0.0.1:notaport/0", "not redis[s]://"),
        ("redis://:s3cret-pw@127.0.0.1:1/0?db=x", "Invalid value for 'db'"),
        ("redis://:s3cret/pw@127.0.0.1:1/0", "database number"),
        ("redis://127.0.0.1:1/zero", "database number"),
        ("redis://127.0.0.1:1/0?colour=blue", "not Redis's (colour)"),
        ("redis://127.0.0.1:1/0?prefix=a:b", "prefix"),
    ],
)
def test_a_malformed_redis_url_is_refused_without_its_password(url: str, said: str) -> None:
    problem = store_url_problem(url)
    assert problem is not None and said in problem
    assert "s3cret" not in problem
    with pytest.raises(ValueError) as refused:
        open_store(url)
    assert "s3cret" not in str(refused.value)


@pytest.mark.parametrize(
    "url",
    ["redis://h", "redis://h:6379/", "rediss://h/15?ssl_cert_reqs=none", "unix:///r.sock?db=3",
     "memory://", "sqlite:///x.db"],
)  # fmt: skip
def test_a_good_store_url_has_no_problem(url: str) -> None:
    assert store_url_problem(url) is None


def test_a_password_in_the_query_is_known_to_the_redactor() -> None:
    password = "query-pw-" + "7f3a9c" * 4
    known = REDACTOR.known()
    try:
        open_store(f"unix:///run/redis.sock?db=1&password={password}")
        assert password not in REDACTOR.redact(f"said: {password}", "log")
    finally:
        REDACTOR.forget_since(known)
