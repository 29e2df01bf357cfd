"""The admin API's gateway key routes (``ROUTES``, under ``/gateway``): create, list, show,
rotate and revoke.

The admin guard has already authenticated the caller (``request[ADMIN_CALLER]``), checked the
route's scope, and for writes the JSON content type and the origin. Here: bodies are strict
(unknown or duplicate fields refused, size bounded), a team-bound caller sees only its teams'
keys (another team's answers 404, as if absent), and every change is audited before it is
made (an audit line that cannot be written answers 503, and nothing changes). A key itself is
in one answer only, the one that made it (create, rotate), marked ``no-store``; digests are
in none.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, NoReturn, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.appkeys import AUDIT, KEYRING
from gateway.audit import AuditError
from gateway.auth.config import NAME, duration
from gateway.auth.keyring import MAX_GRACE, Audit, KeyRefused, KeyRing, KeySpec
from gateway.auth.keys import KEY_ID, KeyRecord
from gateway.auth.planes import ADMIN_CALLER
from gateway.auth.principal import AdminCaller

log = logging.getLogger("gateway.auth")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY = 16 * 1024
"""Bytes of an admin body about keys: a spec with 64 model globs fits many times over."""
_TEAM = re.compile(NAME)
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


class RotateSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    grace: float | Annotated[str, Field(max_length=32)] | None = None
    """How long the previous secret keeps working: seconds or ``24h``; default
    ``auth.rotation_grace``; 0 refuses it at once."""

    @field_validator("grace")
    @classmethod
    def _seconds(cls, value: float | str | None) -> float | None:
        if value is None:
            return None
        seconds = duration(value)
        if not 0 <= seconds <= MAX_GRACE:
            raise ValueError(f"grace must be between 0 and {MAX_GRACE / 86400:g} days")
        return seconds


class RevokeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    now: bool = False
    """Ask every replica to drop the key at once (see ``KeyRing.revoke``)."""


def _json(data: Any, status: int = 200, *, secret: bool = False) -> web.Response:
    response = web.Response(body=orjson.dumps(data), status=status, content_type="application/json")
    if secret:  # the one answer holding a key: no cache, proxy or browser may keep it
        response.headers["Cache-Control"] = "no-store"
        response.headers["Pragma"] = "no-cache"
    return response


def _error(message: str, status: int) -> web.Response:
    return _json({"error": message}, status)


class _Refused(Exception):
    def __init__(self, response: web.Response) -> None:
        self.response = response


def _refuse(message: str, status: int) -> NoReturn:
    raise _Refused(_error(message, status))


def _ring(request: web.Request) -> KeyRing:
    ring = request.config_dict.get(KEYRING)
    if ring is None:
        _refuse(
            "this gateway does not use gateway keys (auth.mode is neither keys nor mixed): "
            "set auth.mode to keys or mixed to create them",
            409,
        )
    return ring


def _caller(request: web.Request) -> AdminCaller:
    return request[ADMIN_CALLER]


def _key_id(request: web.Request) -> str:
    key_id = request.match_info["key_id"]
    if not KEY_ID.match(key_id):
        _refuse("no such key", 404)
    return key_id


async def _body(request: web.Request) -> dict[str, Any]:
    """The JSON object sent, read to at most ``MAX_BODY`` bytes; {} for none."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        _refuse(f"the body is larger than {MAX_BODY} bytes", 413)
    raw = bytearray()
    while chunk := await request.content.read(MAX_BODY + 1 - len(raw)):
        raw += chunk
        if len(raw) > MAX_BODY:
            _refuse(f"the body is larger than {MAX_BODY} bytes", 413)
    if not raw.strip():
        return {}
    try:
        body = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant
        )
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are both
        _refuse("the body must be JSON (UTF-8, no duplicate fields, no NaN)", 400)
    if not isinstance(body, dict):
        _refuse("the body must be a JSON object", 400)
    return body


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise ValueError("duplicate field")
    return found


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _spec(model: type[M], body: dict[str, Any], what: str) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        _refuse(f"{what}: {_problems(exc, model)}", 400)


def _problems(exc: ValidationError, model: type[BaseModel]) -> str:
    """What is wrong with a body, in a line: unknown fields by name, else the first error.
    Names and messages are cleaned and capped: they echo what a caller sent."""
    errors = exc.errors(include_url=False, include_input=False)
    unknown = [
        _plain(".".join(map(str, e["loc"])), 40) for e in errors if e["type"] == "extra_forbidden"
    ]
    if unknown:
        shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        return f"unknown field(s) {shown}; it takes {', '.join(model.model_fields)}"
    first = errors[0]
    where = _plain(".".join(map(str, first["loc"])), 60) or "the body"
    return f"{where}: {_plain(first['msg'], 300)}"


def _plain(text: str, limit: int) -> str:
    return "".join(c if c.isprintable() and c.isascii() else "?" for c in text[:limit])


# -- the handlers ------------------------------------------------------------------------------
def _handler(fn: Callable[[web.Request], Awaitable[web.Response]]) -> Handler:
    """A refusal raised anywhere in ``fn`` is its answer."""

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            return await fn(request)
        except _Refused as refused:
            return refused.response
        except KeyRefused as refused:
            return _error(refused.message, refused.status)

    handle.__name__ = handle.__qualname__ = fn.__name__
    handle.__doc__ = fn.__doc__
    return handle


async def _create(request: web.Request) -> web.Response:
    """``{"team": "search", "name": "ci", "models": ["claude-*"], "expires": "30d"}``: a new
    key, printed once in the answer (201)."""
    ring, caller = _ring(request), _caller(request)
    spec = _spec(KeySpec, await _body(request), "the key")
    audit = _auditor(request, "key_create")
    record, key = await _change(request, "key_create", ring.create(spec, caller, audit=audit))
    return _json({"key": key.reveal(), **record.public_view(ring.clock())}, 201, secret=True)


async def _list(request: web.Request) -> web.Response:
    """Every key the caller may see (``?team=T``: of that team), without digests."""
    ring, caller = _ring(request), _caller(request)
    teams = caller.teams
    team = request.rel_url.query.get("team")
    if team is not None:
        if not _TEAM.match(team):
            _refuse("team: not a team name (letters, digits, '.', '_', '-')", 400)
        teams = frozenset({team}) if caller.sees(team) else frozenset()
    now = ring.clock()
    return _json({"keys": [record.public_view(now) for record in await ring.list(teams)]})


async def _show(request: web.Request) -> web.Response:
    ring, caller = _ring(request), _caller(request)
    key_id = _key_id(request)
    record = await ring.get(key_id)
    if record is None or not caller.sees(record.team):
        _refuse(f"no key {key_id}", 404)
    return _json(record.public_view(ring.clock()))


async def _rotate(request: web.Request) -> web.Response:
    """``{"grace": "24h"}``: a new secret for the same id, printed once in the answer; the
    previous one works until the grace ends."""
    ring, caller = _ring(request), _caller(request)
    key_id = _key_id(request)
    spec = _spec(RotateSpec, await _body(request), "the rotation")
    grace = None if spec.grace is None else float(spec.grace)
    audit = _auditor(request, "key_rotate", grace=grace)
    record, key = await _change(
        request, "key_rotate", ring.rotate(key_id, grace, caller, audit=audit)
    )
    return _json({"key": key.reveal(), **record.public_view(ring.clock())}, secret=True)


async def _revoke(request: web.Request) -> web.Response:
    """``{"now": true}``: the key is refused from now on."""
    ring, caller = _ring(request), _caller(request)
    key_id = _key_id(request)
    spec = _spec(RevokeSpec, await _body(request), "the revocation")
    audit = _auditor(request, "key_revoke", now=spec.now)
    record = await _change(
        request, "key_revoke", ring.revoke(key_id, caller, spec.now, audit=audit)
    )
    return _json(record.public_view(ring.clock()))


def _auditor(request: web.Request, event: str, **asked: Any) -> Audit:
    """The audit line of a change, written (and fsync'ed) before the store is: who asked and
    how, what was asked, and the key as it will be (public view: never a secret or a
    digest)."""
    caller = _caller(request)

    async def audit(record: KeyRecord) -> None:
        key = record.public_json()
        del key["id"]
        await request.config_dict[AUDIT].commit(
            event,
            actor=caller.actor,
            auth=caller.method,
            peer=request.remote,
            key_id=record.id,
            **asked,
            **key,
        )

    return audit


async def _change(request: web.Request, event: str, change: Awaitable[T]) -> T:
    try:
        return await change
    except AuditError as exc:
        _refuse(f"not done: {exc}; the change was not made", 503)
    except (KeyRefused, _Refused):
        raise
    except Exception as exc:  # the store could not write: audited, not made
        log.error("key store: %s not written: %s", event, type(exc).__name__)
        request.config_dict[AUDIT].record(
            f"{event}_undone", actor=_caller(request).actor, reason="the key store could not write"
        )
        _refuse("the key store could not write the change; it was not made, retry", 503)


create, list_, show, rotate, revoke = map(_handler, (_create, _list, _show, _rotate, _revoke))
ROUTES: list[tuple[str, str, Handler, str]] = [
    ("POST", "/keys", create, "keys:write"),
    ("GET", "/keys", list_, "keys:read"),
    ("GET", "/keys/{key_id}", show, "keys:read"),
    ("POST", "/keys/{key_id}/rotate", rotate, "keys:write"),
    ("POST", "/keys/{key_id}/revoke", revoke, "keys:write"),
]
"""(method, path under ``/gateway``, handler, the admin scope it needs)."""
