"""Files only the gateway's user may read: the store (which keeps compaction summaries, text
derived from prompts) and the audit log. Created 0600 in directories created 0700, whatever
the umask; files and directories that already exist keep the modes their owner gave them.

Blocking (``os`` calls): call from a thread, as the store's and the audit log's writers do.
"""

from __future__ import annotations

import os
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700


def make_private_dirs(path: Path) -> None:
    """``mkdir -p`` with every directory it creates at 0700."""
    missing: list[Path] = []
    for parent in (path, *path.parents):
        if parent.exists():
            break
        missing.append(parent)
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=DIR_MODE)
        except FileExistsError:
            continue  # made meanwhile by someone else: theirs to set
        os.chmod(directory, DIR_MODE)  # mkdir's mode passes through the umask


def create_private_file(path: Path) -> bool:
    """Create ``path`` empty at 0600 if it does not exist; True if this call created it."""
    make_private_dirs(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, FILE_MODE)  # os.open's mode passes through the umask
    finally:
        os.close(fd)
    return True


def open_private_append(path: Path) -> int:
    """A file descriptor appending to ``path``, which is created 0600 if new."""
    create_private_file(path)
    return os.open(path, os.O_WRONLY | os.O_APPEND)
