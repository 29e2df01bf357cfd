"""In-memory store: one process, nothing survives a restart (``--store memory://``)."""

from __future__ import annotations

from gateway.store.base import SessionTable


class MemoryStore(SessionTable):
    """The session table as it is: every rule lives in ``SessionTable``."""
