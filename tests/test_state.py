"""The state directory: generated once, private, shared by processes that start together."""

from __future__ import annotations

import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gateway.state import ADMIN_TOKEN_FILE, read_or_create, read_state, state_dir


def test_the_default_lies_beside_the_sqlite_store(tmp_path: Path) -> None:
    assert state_dir(None, f"sqlite:///{tmp_path}/g.db") == tmp_path / "gateway-state"
    assert state_dir(tmp_path / "x", "memory://") == tmp_path / "x"
    assert state_dir(None, "memory://") == state_dir(None, "sqlite:///gateway.db")


def test_a_value_is_generated_once_private_and_read_back(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    first = read_or_create(directory, ADMIN_TOKEN_FILE)
    assert len(first) >= 40
    assert read_or_create(directory, ADMIN_TOKEN_FILE) == first
    assert read_state(directory, ADMIN_TOKEN_FILE) == first
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / ADMIN_TOKEN_FILE).stat().st_mode) == 0o600


def test_processes_starting_together_agree(tmp_path: Path) -> None:
    with ThreadPoolExecutor(8) as pool:
        values = set(pool.map(lambda _: read_or_create(tmp_path / "s", "x"), range(16)))
    assert len(values) == 1


def test_a_file_that_is_not_ours_is_refused(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"a" * 10_000)
    with pytest.raises(ValueError, match="not a state file"):
        read_state(tmp_path, "big")
    assert read_state(tmp_path, "absent") is None
