"""open_store: one backend per URL scheme."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.store import MemoryStore, RedisStore, SqliteStore, display_url, open_store


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
