"""The state directory: what the gateway generates on first start and keeps (the key pepper,
the admin token), private (0700, files 0600) and read again on every start after.

Blocking (files): call from a thread or before the event loop runs.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from gateway.private import FILE_MODE, make_private_dirs

PEPPER_FILE = "key-pepper"
ADMIN_TOKEN_FILE = "admin-token"
MAX_STATE_FILE = 4096
"""A state file longer than this is not ours: refused, not read."""


def state_dir(configured: Path | None, store: str) -> Path:
    """``state_dir`` when set; else ``gateway-state`` beside the SQLite store, or in the
    working directory with another store (where the default ``gateway.db`` would be): the
    CLI, run where the gateway runs, finds the generated admin token there."""
    if configured is not None:
        return configured
    if store.startswith("sqlite:///"):
        return Path(store.removeprefix("sqlite:///")).parent / "gateway-state"
    return Path("gateway-state")


def read_state(directory: Path, name: str) -> str | None:
    """A state file's value (stripped), or None when there is none yet."""
    path = directory / name
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_STATE_FILE + 1)
    except FileNotFoundError:
        return None
    if len(raw) > MAX_STATE_FILE:
        raise ValueError(f"{path}: larger than {MAX_STATE_FILE} bytes, not a state file")
    return raw.decode("ascii", errors="strict").strip() or None


def read_or_create(directory: Path, name: str, nbytes: int = 32) -> str:
    """The value in ``directory/name``, generated (``nbytes`` random bytes, URL-safe) and
    written 0600 on first use. Two processes starting at once agree: the value is written
    whole to a file of this process's own, then linked into place, which only one can do;
    the loser reads the winner's value (never a half-written file)."""
    existing = read_state(directory, name)
    if existing is not None:
        return existing
    make_private_dirs(directory)
    value = secrets.token_urlsafe(nbytes)
    path = directory / name
    draft = directory / f".{name}.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        _write(draft, value)
        try:
            os.link(draft, path)
        except FileExistsError:
            found = read_state(directory, name)
            if found is None:
                raise ValueError(f"{path} exists but is empty") from None
            return found
        except OSError:  # a volume without hard links: an exclusive create instead
            try:
                _write(path, value)
            except FileExistsError:
                return read_state(directory, name) or value
    finally:
        draft.unlink(missing_ok=True)
    return value


def _write(path: Path, value: str) -> None:
    """``value`` into a new file at ``path`` (0600), on disk before it returns."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        os.write(fd, (value + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
