"""Fault mode: app-wide rules that break the next API requests, whoever sends them.

The ``x-fake-scenario`` header changes one request the test sends itself; fault rules reach
the requests it does not control (the gateway's retries, fallbacks and probes). The rules live
in ``app[FAULTS]`` and are tried in order for every API request: the first live rule whose
``path`` prefix matches takes the request and spends one of its ``count`` (``None``: until
cleared), so a list reads as a queue ("two 503s, then one reset, then normal"). Kinds:

- ``status``: that 4xx/5xx with the API's real error body; ``retry_after`` (seconds) sets
  ``Retry-After``, ``retry_after_ms`` sets ``retry-after-ms``;
- ``reset``: a TCP reset before any response byte;
- ``delay``: wait ``seconds``, then answer normally;
- ``hang``: answer nothing until the rules are cleared;
- ``cut_stream``: send ``events`` SSE events, then close the connection (streaming requests
  only: a request without ``"stream": true`` passes the rule by).

Clearing (or replacing) the rules lets held requests (``delay``, ``hang``) go on at once and
answer normally; at shutdown they are reset instead, so none keeps the app from stopping.

In-process tests use ``app[FAULTS].add(Fault("status", status=503, count=2))``; a fake in
another process is driven over HTTP: ``POST /_fake/faults`` with ``{"faults": [{"kind":
"status", "status": 503, "count": 3}], "replace": false}`` (``replace`` clears first),
``GET /_fake/faults`` for the rules and counters, ``DELETE /_fake/faults`` to clear. The
``--fault SPEC`` option reads ``parse_spec``'s syntax.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Final, Literal, NoReturn, get_args

import orjson
from aiohttp import web

from .errors import FakeError, error_response, invalid_request

FaultKind = Literal["status", "reset", "delay", "hang", "cut_stream"]
KINDS: Final[tuple[str, ...]] = get_args(FaultKind)

# The fields each kind takes besides kind, count and path; the first one is required.
_TAKES: Final[dict[str, tuple[str, ...]]] = {
    "status": ("status", "retry_after", "retry_after_ms"),
    "reset": (),
    "delay": ("seconds",),
    "hang": (),
    "cut_stream": ("events",),
}

MAX_RULES = 100
CONTROL_BODY_LIMIT = 64 * 1024
CONTROL_PATH = "/_fake/faults"

# name -> (lowest, highest, integer only); wide enough for any test, small enough to be sane.
_BOUNDS: Final[dict[str, tuple[float, float, bool]]] = {
    "count": (1, 1_000_000_000, True),
    "status": (400, 599, True),
    "retry_after": (0, 86_400, False),
    "retry_after_ms": (0, 86_400_000, True),
    "seconds": (0, 3_600, False),
    "events": (0, 100_000, True),
}
_PATH_LIMIT = 200


class FaultError(ValueError):
    """A fault rule, a control body or a ``--fault`` spec that cannot be accepted."""


@dataclass(frozen=True, slots=True)
class Fault:
    """One rule; checked when built, so a rule that exists can be applied."""

    kind: FaultKind
    count: int | None = None
    path: str | None = None
    status: int | None = None
    retry_after: float | None = None
    retry_after_ms: int | None = None
    seconds: float | None = None
    events: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise FaultError(f"kind must be one of {', '.join(KINDS)}; got {_show(self.kind)}")
        takes = _TAKES[self.kind]
        for name in ("status", "retry_after", "retry_after_ms", "seconds", "events"):
            if getattr(self, name) is not None and name not in takes:
                raise FaultError(f"{self.kind!r} takes no {name!r}")
        if takes and getattr(self, takes[0]) is None:
            raise FaultError(f"{self.kind!r} needs {takes[0]!r}")
        for name in _BOUNDS:
            _check_number(name, getattr(self, name))
        if self.path is not None and not (
            isinstance(self.path, str)
            and self.path.startswith("/")
            and len(self.path) <= _PATH_LIMIT
        ):
            raise FaultError(f"path must be a string starting with '/', got {_show(self.path)}")

    def matches(self, path: str) -> bool:
        return self.path is None or path.startswith(self.path)

    def to_json(self) -> dict[str, object]:
        """The fields that are set (``count`` always: ``null`` means until cleared)."""
        return {
            field.name: getattr(self, field.name)
            for field in fields(self)
            if field.name == "count" or getattr(self, field.name) is not None
        }


@dataclass(slots=True)
class FaultRule:
    """A fault with its progress: requests it may still take (``None``: no end) and took."""

    fault: Fault
    remaining: int | None
    hits: int = 0

    def to_json(self) -> dict[str, object]:
        return {**self.fault.to_json(), "remaining": self.remaining, "hits": self.hits}


class Faults:
    """The app's fault rules, in order, and the counters tests read.

    ``seen`` counts every API request since the app started or the rules were last cleared or
    replaced, matched or not: with a test's own request count it gives the upstream attempts
    per client request. ``waiting`` is the number of requests a ``delay`` or ``hang`` holds.
    """

    def __init__(self) -> None:
        self._rules: list[FaultRule] = []
        self.seen = 0
        self.waiting = 0
        self._release = asyncio.Event()
        self._closed = False

    @property
    def rules(self) -> tuple[FaultRule, ...]:
        """Every rule added since the last clear, spent ones included (their hits stay readable)."""
        return tuple(self._rules)

    def add(self, *faults: Fault) -> None:
        """Append rules; refused whole when the list would pass ``MAX_RULES``."""
        if len(self._rules) + len(faults) > MAX_RULES:
            raise FaultError(f"at most {MAX_RULES} fault rules; clear or replace them")
        self._rules.extend(FaultRule(fault, fault.count) for fault in faults)

    def replace(self, *faults: Fault) -> None:
        """Clear, then add (refused before anything is cleared when too many)."""
        if len(faults) > MAX_RULES:
            raise FaultError(f"at most {MAX_RULES} fault rules")
        self.clear()
        self.add(*faults)

    def clear(self) -> None:
        """Drop every rule, zero ``seen``, and let held requests go on."""
        self._rules.clear()
        self.seen = 0
        self._release.set()
        self._release = asyncio.Event()

    def close(self) -> None:
        """At shutdown: held requests are reset now, and new ones are not held."""
        self._closed = True
        self._release.set()

    def take(self, path: str, streaming: Callable[[], bool]) -> Fault | None:
        """Count the request and spend the first live rule that matches it, if any.

        ``streaming`` is asked only when a ``cut_stream`` rule could apply (it parses the body).
        """
        self.seen += 1
        is_stream: bool | None = None
        for rule in self._rules:
            if rule.remaining == 0 or not rule.fault.matches(path):
                continue
            if rule.fault.kind == "cut_stream":
                if is_stream is None:
                    is_stream = streaming()
                if not is_stream:
                    continue
            rule.hits += 1
            if rule.remaining is not None:
                rule.remaining -= 1
            return rule.fault
        return None

    async def hold(self, seconds: float | None) -> bool:
        """Wait ``seconds`` (``None``: until released); ``False`` when the app is shutting down."""
        if self._closed:
            return False
        release = self._release
        self.waiting += 1
        try:
            if seconds is None:
                await release.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(release.wait(), seconds)
        finally:
            self.waiting -= 1
        return not self._closed

    def to_json(self) -> dict[str, object]:
        return {
            "seen": self.seen,
            "waiting": self.waiting,
            "faults": [rule.to_json() for rule in self._rules],
        }


FAULTS: Final = web.AppKey("fake_provider_faults", Faults)


# --- applying a rule to a request -----------------------------------------------------------


async def inject(request: web.Request, streaming: Callable[[], bool]) -> int | None:
    """Apply this request's fault, if any; returns the event count of a ``cut_stream``.

    A ``status`` raises ``FakeError``; a ``reset`` (or a held request at shutdown) resets the
    connection and raises ``ConnectionDropped``.
    """
    faults = request.app[FAULTS]
    fault = faults.take(request.path, streaming)
    if fault is None:
        return None
    if fault.kind == "status":
        assert fault.status is not None  # checked when the rule was built
        raise FakeError(
            fault.status, retry_after=fault.retry_after, retry_after_ms=fault.retry_after_ms
        )
    if fault.kind == "cut_stream":
        return fault.events
    if fault.kind in ("delay", "hang") and await faults.hold(fault.seconds):
        return None
    reset(request)


class ConnectionDropped(web.HTTPServiceUnavailable):
    """Raised once the connection is gone. aiohttp then tries to send this answer, finds the
    transport closed and drops it quietly: the client reads no byte, and nothing is logged."""


def reset(request: web.Request) -> NoReturn:
    """Drop the connection with a TCP reset before any response byte.

    With ``SO_LINGER`` at zero the close sends RST rather than FIN: the client reads
    ``ECONNRESET``, as from an upstream that crashed or a balancer that gave up.
    """
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    raise ConnectionDropped()


# --- the control endpoint -------------------------------------------------------------------


async def show_faults(request: web.Request) -> web.Response:
    """``GET /_fake/faults``: the rules with their remaining counts and hits, and ``seen``."""
    return web.json_response(request.app[FAULTS].to_json(), dumps=_dumps)


async def set_faults(request: web.Request) -> web.Response:
    """``POST /_fake/faults``: add the body's rules, or replace the list with them."""
    if (request.content_length or 0) > CONTROL_BODY_LIMIT:
        return _refuse(f"the body is over {CONTROL_BODY_LIMIT} bytes", status=413)
    raw = await request.read()
    if len(raw) > CONTROL_BODY_LIMIT:
        return _refuse(f"the body is over {CONTROL_BODY_LIMIT} bytes", status=413)
    faults = request.app[FAULTS]
    try:
        rules, replace = read_control_body(raw)
        if replace:
            faults.replace(*rules)
        else:
            faults.add(*rules)
    except FaultError as exc:
        return _refuse(str(exc))
    return web.json_response(faults.to_json(), dumps=_dumps)


async def clear_faults(request: web.Request) -> web.Response:
    """``DELETE /_fake/faults``: clear; answers with the state just before, final counts."""
    faults = request.app[FAULTS]
    before = faults.to_json()
    faults.clear()
    return web.json_response(before, dumps=_dumps)


def read_control_body(raw: bytes) -> tuple[list[Fault], bool]:
    """``{"faults": [...], "replace": bool}`` -> the rules and whether to replace."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise FaultError("the body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise FaultError("the body must be a JSON object")
    unknown = sorted(set(body) - {"faults", "replace"})
    if unknown:
        raise FaultError(f"unknown field {_show(unknown[0])}; expected 'faults' and 'replace'")
    rules = body.get("faults")
    replace = body.get("replace", False)
    if not isinstance(rules, list):
        raise FaultError("'faults' must be a list of rules")
    if len(rules) > MAX_RULES:
        raise FaultError(f"at most {MAX_RULES} fault rules")
    if not isinstance(replace, bool):
        raise FaultError("'replace' must be true or false")
    faults: list[Fault] = []
    for index, rule in enumerate(rules):
        try:
            faults.append(fault_from_json(rule))
        except FaultError as exc:
            raise FaultError(f"faults[{index}]: {exc}") from exc
    return faults, replace


def fault_from_json(value: object) -> Fault:
    """One rule from JSON; a field the kind does not take is refused, as a wrong type is."""
    if not isinstance(value, dict):
        raise FaultError("a rule must be a JSON object")
    kind = value.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise FaultError(f"kind must be one of {', '.join(KINDS)}; got {_show(kind)}")
    unknown = sorted(set(value) - {"kind", "count", "path", *_TAKES[kind]})
    if unknown:
        raise FaultError(f"{kind!r} takes no {_show(unknown[0])}")
    return Fault(**value)


def parse_spec(spec: str) -> Fault:
    """A rule from the command line: ``KIND[:VALUE][:NAME=VALUE...]``, VALUE being the kind's
    first field, e.g. ``status:503:count=3:retry_after=1``, ``delay:2``, ``cut_stream:2``,
    ``hang:path=/v1/messages``, ``reset:count=1``."""
    kind, *parts = spec.split(":")
    if kind not in KINDS:
        raise FaultError(f"kind must be one of {', '.join(KINDS)}; got {_show(kind)}")
    value: dict[str, object] = {"kind": kind}
    for index, part in enumerate(parts):
        name, equals, raw = part.partition("=")
        if not equals:
            if index or not _TAKES[kind]:
                raise FaultError(f"expected NAME=VALUE, got {_show(part)}")
            name, raw = _TAKES[kind][0], part
        value[name] = raw if name == "path" else _number(raw)
    return fault_from_json(value)


# --- helpers --------------------------------------------------------------------------------


def _check_number(name: str, value: object) -> None:
    if value is None:
        return
    low, high, integer = _BOUNDS[name]
    # bool is an int to Python, not a number to JSON
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (integer and isinstance(value, float))
    ):
        wanted = "an integer" if integer else "a number"
        raise FaultError(f"{name!r} must be {wanted}, got {_show(value)}")
    if not (math.isfinite(value) and low <= value <= high):
        raise FaultError(f"{name!r} must be between {low:g} and {high:g}, got {_show(value)}")


def _number(raw: str) -> int | float:
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        return float(raw)
    except ValueError:
        raise FaultError(f"expected a number, got {_show(raw)}") from None


def _show(value: object) -> str:
    """A value for an error message, cut short: hostile bodies are not echoed whole."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _refuse(message: str, *, status: int = 400) -> web.Response:
    if status == 400:
        return error_response(invalid_request(message), "openai")
    return error_response(FakeError(status, message, type_="invalid_request_error"), "openai")
