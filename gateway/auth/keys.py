"""Gateway keys: the token format, its checksum, the stored HMAC, and ``KeyRecord`` (what is
kept of a key).

A key reads ``gw_<public id>_<secret><checksum>``: a 12-character base62 public id (safe to
show, log and name in policy), a 43-character base62 secret (256 bits from ``secrets``) and 6
base62 characters of CRC32 over everything before them, so that secret scanners recognise a
key and a typo is refused without a lookup. Only an HMAC-SHA256 of the secret with the
deployment's pepper is ever stored (``digest``).
"""

from __future__ import annotations

import hmac
import re
import secrets
import string
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from gateway.secret import Secret

PREFIX = "gw_"
ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase
ID_LENGTH = 12
SECRET_LENGTH = 43
"""62**43 > 2**256: 256 bits of randomness."""
CHECKSUM_LENGTH = 6
"""62**6 > 2**32: a CRC32 fits."""
KEY_LENGTH = len(PREFIX) + ID_LENGTH + 1 + SECRET_LENGTH + CHECKSUM_LENGTH
_BODY_LENGTH = KEY_LENGTH - CHECKSUM_LENGTH
_SHAPE = re.compile(
    rf"gw_[0-9A-Za-z]{{{ID_LENGTH}}}_[0-9A-Za-z]{{{SECRET_LENGTH + CHECKSUM_LENGTH}}}"
)
KEY_ID = re.compile(r"^[0-9A-Za-z]{6,32}$")
"""A public id as the admin API and config accept it (``DeclaredKey.id``)."""


def _random(length: int) -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(length))


_PAIRS = [first + second for first in ALPHABET for second in ALPHABET]
"""Base62 two digits at a time: the checksum is taken on every call, in three lookups."""


def checksum(body: str) -> str:
    """The last 6 characters of a key: CRC32 of ``gw_<id>_<secret>`` in base62."""
    high, low = divmod(zlib.crc32(body.encode("ascii")), 62 * 62)
    top, middle = divmod(high, 62 * 62)  # top < 62 * 62: a CRC32 is below 62**6
    return _PAIRS[top] + _PAIRS[middle] + _PAIRS[low]


def new_id() -> str:
    return _random(ID_LENGTH)


def new_key(key_id: str | None = None) -> tuple[str, Secret]:
    """A fresh key: its public id and the whole token. Give ``key_id`` to keep an id (a
    rotation); else a new one is drawn."""
    key_id = new_id() if key_id is None else key_id
    body = f"{PREFIX}{key_id}_{_random(SECRET_LENGTH)}"
    return key_id, Secret(body + checksum(body))


def parse(token: str) -> tuple[str, str] | None:
    """``(public id, secret)`` of a well-formed key with a right checksum; None for anything
    else. Never raises: the length is checked before anything looks at the content."""
    if not isinstance(token, str) or len(token) != KEY_LENGTH or not token.isascii():
        return None
    if _SHAPE.fullmatch(token) is None:
        return None
    body = token[:_BODY_LENGTH]
    if checksum(body) != token[_BODY_LENGTH:]:
        return None  # the checksum is public: comparing it leaks nothing about a secret
    return token[len(PREFIX) : len(PREFIX) + ID_LENGTH], token[
        len(PREFIX) + ID_LENGTH + 1 : _BODY_LENGTH
    ]


def looks_like_key(token: str) -> bool:
    """Whether a credential claims to be a gateway key (then it is checked as one, and a
    malformed one is refused as one)."""
    return token.startswith(PREFIX)


def digest(pepper: bytes, secret: str) -> str:
    """HMAC-SHA256 of ``secret`` (the 43 characters between the id and the checksum) with
    the pepper, hex: the one form of a secret that is stored, in the store and in
    ``auth.keys``."""
    return hmac.digest(pepper, secret.encode("ascii"), "sha256").hex()


@dataclass(slots=True, frozen=True)
class KeyRecord:
    """What is kept of a key: who it is for, what it may do, and the HMAC of its secret."""

    id: str
    name: str
    team: str
    scopes: tuple[str, ...]
    models: tuple[str, ...]
    """Model globs it may call; empty: what the policy allows."""
    pool: str | None
    created_at: float | None
    """None for a key declared in config."""
    created_by: str
    """The admin caller that made it (``token:<hash>``, ``oidc:<subject>``) or ``config``."""
    expires_at: float | None
    digest: str
    previous_digest: str | None = None
    """The secret before the last rotation, accepted until ``previous_until``."""
    previous_until: float | None = None
    revoked_at: float | None = None
    rotated_at: float | None = None
    declared: bool = False
    """From ``auth.keys`` in the config: read-only here (changed by changing the config)."""

    def status(self, now: float) -> str:
        if self.revoked_at is not None and self.revoked_at <= now:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def to_json(self) -> dict[str, Any]:
        """The stored form: everything, the HMAC digests included (never a secret)."""
        return {
            "id": self.id,
            "name": self.name,
            "team": self.team,
            "scopes": list(self.scopes),
            "models": list(self.models),
            "pool": self.pool,
            "created_at": self.created_at,
            "created_by": self.created_by,
            "expires_at": self.expires_at,
            "digest": self.digest,
            "previous_digest": self.previous_digest,
            "previous_until": self.previous_until,
            "revoked_at": self.revoked_at,
            "rotated_at": self.rotated_at,
            "declared": self.declared,
        }

    @classmethod
    def from_json(cls, data: Any) -> KeyRecord:
        """A stored record; ``ValueError`` for one that is not (a store's data is checked
        too: a corrupt row must not become a key that verifies)."""
        if not isinstance(data, dict):
            raise ValueError("a key record is a JSON object")
        try:
            record = cls(
                id=_text(data["id"]),
                name=_text(data["name"]),
                team=_text(data["team"]),
                scopes=_texts(data["scopes"]),
                models=_texts(data["models"]),
                pool=_optional(data.get("pool"), _text),
                created_at=_optional(data.get("created_at"), _number),
                created_by=_text(data["created_by"]),
                expires_at=_optional(data.get("expires_at"), _number),
                digest=_hex(data["digest"]),
                previous_digest=_optional(data.get("previous_digest"), _hex),
                previous_until=_optional(data.get("previous_until"), _number),
                revoked_at=_optional(data.get("revoked_at"), _number),
                rotated_at=_optional(data.get("rotated_at"), _number),
                declared=data.get("declared", False) is True,
            )
        except KeyError as exc:
            raise ValueError(f"a key record without {exc.args[0]!r}") from None
        if not KEY_ID.match(record.id):
            raise ValueError("a key record with a malformed id")
        return record

    def public_json(self) -> dict[str, Any]:
        """The record without its digests: what may be shown, logged and audited."""
        data = self.to_json()
        del data["digest"], data["previous_digest"]
        return data

    def public_view(self, now: float) -> dict[str, Any]:
        """What the admin API and the CLI show: ``public_json`` and the status at ``now``."""
        return {**self.public_json(), "status": self.status(now)}


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("a key record field is not text")
    return value


def _texts(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise ValueError("a key record list is not a list")
    return tuple(_text(item) for item in value)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("a key record time is not a number")
    return float(value)


_HEX = re.compile(r"[0-9a-f]{64}")
T = TypeVar("T")


def _hex(value: Any) -> str:
    if not isinstance(value, str) or _HEX.fullmatch(value) is None:
        raise ValueError("a key record digest is not 64 hex digits")
    return value


def _optional(value: Any, convert: Callable[[Any], T]) -> T | None:
    return None if value is None else convert(value)
