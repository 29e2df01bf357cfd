"""The deployment's key pepper: the HMAC key gateway key digests are made with.

Every replica and worker must hold the same one, or a key made on one is refused by the
others. So it comes from ``GATEWAY_KEY_PEPPER``, else ``auth.pepper_file`` (a mounted
Secret), else it is generated into the state directory on first start, which only a single
process on a store of its own may do: with more workers, or a store shared by replicas, the
gateway refuses to start until one is configured (``PepperMissing``).

Blocking (files): call before the event loop runs, or from a thread.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from gateway.secret import Secret
from gateway.settings import Settings
from gateway.state import MAX_STATE_FILE, PEPPER_FILE, read_or_create, state_dir

PEPPER_VARIABLE = "GATEWAY_KEY_PEPPER"
MIN_PEPPER = 32
"""Characters at least: a short pepper could be guessed, and with it every stored digest
tested offline against guessed secrets."""
SHARED_SCHEMES = ("redis",)
"""Stores shared by replicas (the scale-out issue brings Redis): each replica would generate
a pepper of its own."""
_HOW = (
    f"set {PEPPER_VARIABLE} (at least {MIN_PEPPER} characters, the same for every replica and "
    "worker; e.g. from `openssl rand -base64 48`) or auth.pepper_file (a file holding it, such "
    "as a mounted Secret)"
)


class PepperMissing(Exception):
    """No usable pepper: none configured where one must be, or the one configured is too
    short or unreadable. The message says what to set (and never holds a pepper)."""


def load_pepper(
    settings: Settings,
    *,
    workers: int = 1,
    shared_store: bool = False,
    env: Mapping[str, str] | None = None,
) -> Secret:
    """The pepper, from the environment, the configured file, or the state directory."""
    env = os.environ if env is None else env
    given = env.get(PEPPER_VARIABLE)
    if given:
        return _checked(given.strip(), PEPPER_VARIABLE)
    configured = settings.auth.pepper_file
    if configured is not None:
        return _checked(_read(configured), f"auth.pepper_file {configured}")
    shared = shared_store or settings.store.startswith(SHARED_SCHEMES)
    if workers > 1 or shared:
        who = f"{workers} worker processes" if workers > 1 else "a store shared by replicas"
        raise PepperMissing(
            f"gateway keys need one pepper for {who}, and none is configured: {_HOW}"
        )
    directory = state_dir(settings.state_dir, settings.store)
    try:
        value = read_or_create(directory, PEPPER_FILE)
    except (OSError, ValueError) as exc:
        raise PepperMissing(
            f"cannot keep a generated pepper in {directory / PEPPER_FILE} "
            f"({type(exc).__name__}): fix the state directory (state_dir) or {_HOW}"
        ) from None
    return _checked(value, str(directory / PEPPER_FILE))


def _read(path: Path) -> str:
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_STATE_FILE + 1)
    except OSError as exc:
        raise PepperMissing(
            f"auth.pepper_file {path} cannot be read ({exc.strerror or type(exc).__name__})"
        ) from None
    if len(raw) > MAX_STATE_FILE:
        raise PepperMissing(f"auth.pepper_file {path} is larger than {MAX_STATE_FILE} bytes")
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise PepperMissing(f"auth.pepper_file {path} is not text (UTF-8)") from None


def _checked(value: str, source: str) -> Secret:
    if len(value) < MIN_PEPPER:
        # The length says little; the value nothing, so it is not shown.
        raise PepperMissing(
            f"the pepper in {source} is shorter than {MIN_PEPPER} characters: {_HOW}"
        )
    return Secret(value)
