"""open_store: one backend per URL scheme."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.store import MemoryStore, SqliteStore, open_store


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


@pytest.mark.parametrize("url", ["redis://localhost:6379", "postgres://db", "gateway.db", ""])
def test_unknown_scheme(url: str) -> None:
    with pytest.raises(ValueError, match="unknown store"):
        open_store(url)
