"""Where the Redis store keeps what, and a session record as a Redis hash and back.

Every key is ``gw:{<prefix>}:<kind>...``. The braces are a Redis Cluster hash tag: all of one
gateway's keys hash to one slot, so every script (a session, its budgets, the leases, the
indexes) touches one slot, as a cluster requires. A cluster then holds one gateway's keys on
one shard: run one prefix per tenant group to spread them.

    gw:{p}:layout        the layout version (``LAYOUT``): a replica of another refuses to start
    gw:{p}:s:<id>        a session (hash: scalar fields by name, ``tokens.<name>``, lists as JSON)
    gw:{p}:si            the session index (sorted set: id by last call)
    gw:{p}:b:<key>       a budget's window (hash), expiring after the window's grace
    gw:{p}:bi            the budget index (sorted set: key by window end)
    gw:{p}:lz, gw:{p}:lv the leases of calls in flight: deadline (sorted set), what each holds
    gw:{p}:keys          gateway key records by public id (hash of JSON: hashes, never secrets)
    gw:{p}:rev           the counter sessions' revisions are drawn from (``SessionRecord.rev``)
    gw:{p}:w:<replica>   the number of the last queued write of a replica Redis ran (a write
                         sent again after a lost connection is skipped), expiring in a week
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.store.records import ModelTotals, SessionRecord, TokenTotals

LAYOUT = "1"
"""The key layout this gateway reads and writes. A change to it is a new number: replicas of
two layouts on one Redis would misread each other, so the second refuses to start, and the
script refuses a call from a replica whose layout is no longer the store's."""

_INTS = frozenset(
    {
        "turns",
        "user_turns",
        "aux_requests",
        "upstream_errors",
        "upstream_retries",
        "rejected",
        "estimated_turns",
        "granted_turns",
        "granted_tokens",
        "loops_allowed_until",
        "restarts",
        "compacted_calls",
        "tokens_saved",
        "summary_calls",
        "last_body_hash",
        "body_repeats",
        "in_flight",
        "reserved_tokens",
        "rev",
    }
)
_FLOATS = frozenset({"first_seen", "last_seen", "cost", "rate_fast", "rate_slow"})
_TEXTS = frozenset(
    {"id", "source", "agent", "name", "key_hash", "team", "principal", "status", "status_reason"}
)
_LISTS = frozenset(
    {"grants", "warnings", "detections", "rejections", "compactions", "context_rewrites"}
)
_TOKENS = tuple(f"tokens.{name}" for name in TokenTotals.__dataclass_fields__)
FIELDS = _INTS | _FLOATS | _TEXTS | _LISTS | {"tokens", "models"}
"""Every field of ``SessionRecord`` (a test checks none is missing)."""


class Keys:
    """The key names of one gateway (``prefix``) on a Redis."""

    __slots__ = (
        "base",
        "budget_index",
        "keys",
        "layout",
        "lease_entries",
        "leases",
        "session_index",
    )

    def __init__(self, prefix: str) -> None:
        self.base = f"gw:{{{prefix}}}:"
        self.layout = self.base + "layout"
        self.session_index = self.base + "si"  # the script finds the layout key from this
        self.leases = self.base + "lz"
        self.lease_entries = self.base + "lv"
        self.budget_index = self.base + "bi"
        self.keys = self.base + "keys"

    def session(self, session_id: str) -> str:
        return f"{self.base}s:{session_id}"

    def budget(self, key: str) -> str:
        return f"{self.base}b:{key}"


def from_hash(raw: dict[bytes, bytes]) -> SessionRecord | None:
    """The record a session's hash holds (None for no hash: expired, or never made)."""
    if not raw:
        return None
    values: dict[str, Any] = {}
    tokens = TokenTotals()
    models: dict[str, ModelTotals] = {}
    for field_bytes, value in raw.items():
        name = field_bytes.decode()
        if name in _INTS:
            values[name] = int(value)
        elif name in _FLOATS:
            values[name] = float(value)
        elif name in _TEXTS:
            values[name] = value.decode()
        elif name in _LISTS:  # a list of JSON texts, as sent (the script never re-encodes)
            decoded = orjson.loads(value)
            values[name] = (
                [orjson.loads(item) if isinstance(item, str) else item for item in decoded]
                if isinstance(decoded, list)
                else []  # Lua's {} is []
            )
        elif name == "models":
            decoded = orjson.loads(value)
            if isinstance(decoded, dict):
                models = {model: ModelTotals(**counts) for model, counts in decoded.items()}
        elif name.startswith("tokens."):
            setattr(tokens, name.removeprefix("tokens."), int(value))
    if "id" not in values:
        return None  # a hash a partial write left (expired between two commands)
    values.setdefault("source", "unknown")
    values.setdefault("agent", "unknown")
    values.setdefault("first_seen", 0.0)
    values.setdefault("last_seen", values["first_seen"])
    return SessionRecord(**values, tokens=tokens, models=models)


def to_hash(record: SessionRecord) -> list[str]:
    """The record as the script's ``merge`` takes it: field, value, ... (None left out)."""
    out: list[str] = []
    data = record.to_json()
    for name in sorted(_INTS | _FLOATS | _TEXTS):
        value = data.get(name)
        if value is not None:
            out += [name, repr(value) if isinstance(value, float) else str(value)]
    for name in sorted(_LISTS):
        out += [name, orjson.dumps([orjson.dumps(item).decode() for item in data[name]]).decode()]
    out += ["models", orjson.dumps(data["models"]).decode()]
    for field in _TOKENS:
        out += [field, str(data["tokens"][field.removeprefix("tokens.")])]
    return out
