"""Upstream credential pools: the provider credentials the gateway itself sends in ``keys``,
``jwt`` and ``mixed`` modes, which pool serves a principal, failover, and reload.

``upstreams.<name>.credentials`` names pools of entries whose values are references
(``env:VAR``, ``file:/path``), never literals. ``resolve`` reads one; ``CredentialPools`` holds
every pool with its entries resolved (``Secret``) and their headers built once, so ``choose``
on the request path is a few dictionary lookups. An entry the upstream answers 401
(``failed``) is skipped for the next until it is reloaded or a cool-down passes. ``reload``
reads every reference again (SIGHUP, a watched file changing, ``POST
/gateway/credentials/reload``) and swaps the values in at once, after its audit line is
written; a reference that cannot be read keeps its previous value and is reported.

No value ever appears in a repr, a log line, an exception, the status or the audit log: they
name the entry and its reference only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.admin_bodies import BodyRefused, strict_json
from gateway.audit import AuditError
from gateway.auth.config import REFERENCE
from gateway.auth.planes import ADMIN_CALLER
from gateway.redact import MIN_KNOWN
from gateway.secret import Secret

if TYPE_CHECKING:
    from gateway.audit import AuditLog
    from gateway.auth.config import CredentialEntry
    from gateway.settings import Settings

log = logging.getLogger("gateway.credentials")

MAX_SECRET_BYTES = 16 * 1024
"""A credential file larger than this is refused, not read (a mounted Secret is a few bytes)."""
COOL_DOWN = 300.0
"""Seconds an entry the upstream refused is skipped before it is tried again."""
_SHOWN = 200
"""Characters of a reference shown in a message (a path can be long)."""


class CredentialReferenceError(Exception):
    """A reference that cannot be resolved; the message names the reference, never a value."""

    def __init__(self, reference: str, problem: str) -> None:
        self.reference = reference
        self.problem = problem
        super().__init__(f"{reference}: {problem}")


def _shown(reference: str) -> str:
    """A reference fit for a message: printable (a path may hold a newline), bounded."""
    shown = reference if reference.isprintable() else ascii(reference)
    return shown if len(shown) <= _SHOWN else shown[:_SHOWN] + "..."


def resolve(reference: str, env: Mapping[str, str]) -> Secret:
    """The credential ``reference`` names: ``env:VAR`` from ``env``, ``file:/path`` read (at
    most ``MAX_SECRET_BYTES``, stripped). Raises ``CredentialReferenceError``.

    Blocking (a file read): call it from a thread when a loop runs."""
    if not REFERENCE.match(reference):
        # Not echoed: what was written where a reference belongs may be the key itself.
        raise CredentialReferenceError(
            "(credential value)", "not a reference: write env:VARIABLE or file:/path"
        )
    kind, _, target = reference.partition(":")
    shown = _shown(reference)
    text = _from_env(target, env, shown) if kind == "env" else _from_file(target, shown)
    text = text.strip()
    if not text:
        raise CredentialReferenceError(shown, "is empty")
    if len(text) < MIN_KNOWN:
        raise CredentialReferenceError(
            shown, f"is shorter than {MIN_KNOWN} characters: not a provider credential"
        )
    if not all("!" <= c <= "~" for c in text):
        # It goes into a header: a space, a line break or a non-ASCII character inside would
        # split or garble it (and "Bearer sk-..." is not the bare credential).
        raise CredentialReferenceError(
            shown,
            "holds spaces, control or non-ASCII characters: write the bare credential only",
        )
    return Secret(text)


def _from_env(name: str, env: Mapping[str, str], shown: str) -> str:
    value = env.get(name)
    if value is None:
        raise CredentialReferenceError(shown, f"the environment variable {name} is not set")
    return value


def _from_file(path: str, shown: str) -> str:
    # O_NONBLOCK: a FIFO named here must not hang the reload; it is refused below.
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise CredentialReferenceError(shown, "no such file") from None
    except PermissionError:
        raise CredentialReferenceError(shown, "not readable by the gateway's user") from None
    except OSError as exc:
        raise CredentialReferenceError(shown, f"cannot be opened ({exc.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a directory, a device, a FIFO
            raise CredentialReferenceError(shown, "not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise CredentialReferenceError(shown, f"cannot be read ({exc.strerror})") from None
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET_BYTES:
        raise CredentialReferenceError(
            shown, f"larger than {MAX_SECRET_BYTES // 1024} KiB: not a credential file"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise CredentialReferenceError(shown, "not UTF-8 text") from None


Headers = tuple[tuple[str, str], ...]
_PROVIDER_HEADER = {"anthropic": ("x-api-key", ""), "openai": ("Authorization", "Bearer ")}
_NAMED_HEADER = {"x-api-key": ("x-api-key", ""), "authorization": ("Authorization", "Bearer ")}


def header_for(provider: str | None, header: str | None) -> tuple[str, str]:
    """The header name and value prefix an entry is sent with: the one it names, else its
    provider's own (Anthropic ``x-api-key``, OpenAI ``Authorization: Bearer``)."""
    if header is not None:
        return _NAMED_HEADER[header]
    return _PROVIDER_HEADER.get(provider or "openai", _PROVIDER_HEADER["openai"])


@dataclass(slots=True, frozen=True, eq=False, repr=False)
class Entry:
    """One resolved credential of a pool, with the header it goes upstream in."""

    name: str
    secret: Secret
    header_name: str
    header_value_prefix: str
    reference: str = ""
    """Where it was read from (``env:VAR``, ``file:/path``): shown, the value never is."""
    _headers: Headers = field(init=False)

    def __post_init__(self) -> None:
        # Built once: the request path adds the tuple as it is.
        value = self.header_value_prefix + self.secret.reveal()
        object.__setattr__(self, "_headers", ((self.header_name, value),))

    def headers(self) -> Headers:
        """The header(s) to add to the upstream call (the value in clear: send, never log)."""
        return self._headers

    def __repr__(self) -> str:
        return (
            f"Entry(name={self.name!r}, header={self.header_name!r}, reference={self.reference!r})"
        )

    def __getstate__(self) -> NoReturn:
        raise TypeError("a credential entry cannot be serialised")

    def __reduce__(self) -> NoReturn:
        raise TypeError("a credential entry cannot be pickled")


@dataclass(slots=True, frozen=True, eq=False, repr=False)
class Choice:
    """The credential chosen for a call: its upstream, pool and entry."""

    upstream: str
    pool: str
    entry: Entry

    def headers(self) -> Headers:
        return self.entry._headers

    def __repr__(self) -> str:
        return f"Choice(upstream={self.upstream!r}, pool={self.pool!r}, entry={self.entry.name!r})"


@dataclass(slots=True)
class _Mark:
    """An entry the upstream refused: skipped until ``until`` (monotonic) or a reload."""

    entry: Entry
    until: float
    at: float
    """Wall time, for the status."""
    status: int


@dataclass(slots=True, eq=False)
class _Pool:
    upstream: str
    name: str
    configured: tuple[CredentialEntry, ...]
    header: tuple[tuple[str, str], ...]
    """Per configured entry: header name and value prefix."""
    choices: tuple[Choice, ...] = ()
    """The resolved entries, in configured order (one left out is unresolved)."""
    marks: dict[str, _Mark] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    """Entry name -> why its reference could not be read at the last load or reload."""

    def pick(self, clock: Callable[[], float]) -> Choice | None:
        """The first healthy entry; when every one was refused, the one refused longest ago
        (its call then carries the upstream's own answer); None with no entry resolved."""
        if not self.marks:  # the usual case: no clock read, no loop
            return self.choices[0] if self.choices else None
        now = clock()
        for choice in self.choices:
            mark = self.marks.get(choice.entry.name)
            if mark is None:
                return choice
            if mark.until <= now:  # cooled down: tried again
                del self.marks[choice.entry.name]
                return choice
        return min(self.choices, key=lambda c: self.marks[c.entry.name].until, default=None)

    def healthy(self, now: float) -> int:
        return sum(
            1
            for c in self.choices
            if (mark := self.marks.get(c.entry.name)) is None or mark.until <= now
        )


FailureHook = Callable[[str, str, Entry, int], None]
"""``(upstream, pool, entry, status)``: called for each 401/403 an entry is answered."""


@dataclass(slots=True, frozen=True)
class ReloadResult:
    reason: str
    at: float
    changed: tuple[str, ...]
    """``upstream/pool/entry`` of each entry whose value changed (its failure mark cleared)."""
    unchanged: int
    failed: dict[str, str]
    """``upstream/pool/entry`` -> why its reference could not be read (the previous value, if
    any, is kept)."""

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "reason": self.reason,
            "at": self.at,
            "changed": list(self.changed),
            "unchanged": self.unchanged,
            "failed": dict(self.failed),
        }


_Resolved = dict[tuple[str, str, str], Secret | str]
"""(upstream, pool, entry) -> its value, or why it could not be read."""
_Stamps = dict[str, tuple[int, int, int] | None]


class CredentialPools:
    """Every upstream's pools. ``choose`` and ``failed`` run on the request path; ``reload``
    and ``watch`` on the event loop, their file reads on a thread."""

    def __init__(
        self,
        pools: dict[str, dict[str, _Pool]],
        env: Mapping[str, str],
        *,
        audit: AuditLog | None = None,
        cool_down: float = COOL_DOWN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pools = pools
        self._env = env
        self.audit = audit
        """Where reloads (``commit``, before they take effect) and refused entries
        (``record``) are written; None: logs only."""
        self.cool_down = cool_down
        self._clock = clock
        self.on_failure: list[FailureHook] = []
        """Called for every 401/403 an entry is answered (metrics: ``Metrics.watch_pools``)."""
        self.reloaded_at: float | None = None
        self.reload_reason: str | None = None
        self.reloads = 0
        self._stamps: _Stamps = {}
        self._lock = asyncio.Lock()

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        env: Mapping[str, str] = os.environ,
        *,
        audit: AuditLog | None = None,
        cool_down: float = COOL_DOWN,
        clock: Callable[[], float] = time.monotonic,
    ) -> CredentialPools:
        """Every pool of ``settings.upstreams``, each reference resolved. Outside passthrough
        mode a reference that cannot be read refuses the start (``CredentialReferenceError``
        naming every one); in passthrough the pools are unused and such an entry is left out
        and reported by ``status``. Blocking: from a thread when a loop runs (``load``)."""
        pools: dict[str, dict[str, _Pool]] = {}
        for upstream_name, upstream in settings.upstreams.items():
            for pool_name, entries in upstream.credentials.items():
                headers = tuple(header_for(upstream.provider, e.header) for e in entries)
                pool = _Pool(upstream_name, pool_name, tuple(entries), headers)
                pools.setdefault(upstream_name, {})[pool_name] = pool
        self = cls(pools, env, audit=audit, cool_down=cool_down, clock=clock)
        resolved, self._stamps = self._resolve_all()
        problems = {where: v for where, v in resolved.items() if isinstance(v, str)}
        if problems and settings.auth.mode != "passthrough":
            listed = "; ".join(f"upstreams.{'.'.join(k)}: {v}" for k, v in problems.items())
            raise CredentialReferenceError("upstream credentials", f"cannot be read: {listed}")
        self._apply(resolved)
        self.reloaded_at, self.reload_reason = time.time(), "start"
        return self

    @classmethod
    async def load(
        cls, settings: Settings, env: Mapping[str, str] = os.environ, **options: Any
    ) -> CredentialPools:
        """``from_settings`` with its file reads on a thread (from the app's start-up)."""
        return await asyncio.to_thread(cls.from_settings, settings, env, **options)

    def _entries(self) -> Iterator[tuple[_Pool, CredentialEntry]]:
        for pools in self._pools.values():
            for pool in pools.values():
                for entry in pool.configured:
                    yield pool, entry

    def _resolve_all(self) -> tuple[_Resolved, _Stamps]:
        """Every reference read (blocking). Files are stamped before they are read: one
        that changes meanwhile is read again at the watcher's next look."""
        stamps = self._stat_files()
        resolved: _Resolved = {}
        for pool, entry in self._entries():
            try:
                value: Secret | str = resolve(entry.value, self._env)
            except CredentialReferenceError as exc:
                value = str(exc)
            resolved[(pool.upstream, pool.name, entry.name)] = value
        return resolved, stamps

    def _stat_files(self) -> _Stamps:
        stamps: _Stamps = {}
        for _, entry in self._entries():
            if entry.value.startswith("file:"):
                path = entry.value.removeprefix("file:")
                try:
                    st = os.stat(path)
                except OSError:
                    stamps[path] = None
                else:
                    stamps[path] = (st.st_mtime_ns, st.st_size, st.st_ino)
        return stamps

    def _plan(self, resolved: _Resolved) -> tuple[dict[_Pool, tuple[Choice, ...]], list[str], int]:
        """The new choices of each pool (a failed reference keeps its previous entry), the
        entries that changed, and how many stayed the same."""
        plan: dict[_Pool, tuple[Choice, ...]] = {}
        changed: list[str] = []
        unchanged = 0
        for pools in self._pools.values():
            for pool in pools.values():
                current = {c.entry.name: c for c in pool.choices}
                choices: list[Choice] = []
                for entry, (header, prefix) in zip(pool.configured, pool.header, strict=True):
                    value = resolved[(pool.upstream, pool.name, entry.name)]
                    before = current.get(entry.name)
                    if isinstance(value, str):  # unreadable now: the previous value stays
                        if before is not None:
                            choices.append(before)
                        continue
                    if before is not None and before.entry.secret == value:
                        choices.append(before)  # the same object: its failure mark stays
                        unchanged += 1
                        continue
                    made = Entry(entry.name, value, header, prefix, _shown(entry.value))
                    choices.append(Choice(pool.upstream, pool.name, made))
                    changed.append(f"{pool.upstream}/{pool.name}/{entry.name}")
                plan[pool] = tuple(choices)
        return plan, changed, unchanged

    def _apply(self, resolved: _Resolved) -> tuple[list[str], int]:
        """Swap the new values in: synchronous, so no request sees a pool half reloaded."""
        plan, changed, unchanged = self._plan(resolved)
        for pool, choices in plan.items():
            pool.choices = choices
            kept = {c.entry.name: c.entry for c in choices}
            # A mark stands for the value that was refused: a new value is tried at once.
            for name in [n for n, m in pool.marks.items() if kept.get(n) is not m.entry]:
                del pool.marks[name]
            pool.errors = {
                name: value
                for (upstream, pool_name, name), value in resolved.items()
                if upstream == pool.upstream and pool_name == pool.name and isinstance(value, str)
            }
        return changed, unchanged

    # -- the request path ----------------------------------------------------------------------
    def choose(
        self, upstream_name: str, pool: str | None, team: str | None, team_pools: Mapping[str, str]
    ) -> Choice | None:
        """The credential for a principal's call to ``upstream_name``: its own ``pool`` if the
        upstream has it, else its team's (``team_pools``), else the upstream's only pool.
        None when none applies: no credential is configured for this principal here."""
        pools = self._pools.get(upstream_name)
        if not pools:
            return None
        chosen = pools.get(pool) if pool is not None else None
        if chosen is None and team is not None and (named := team_pools.get(team)) is not None:
            chosen = pools.get(named)
        if chosen is None:
            if len(pools) != 1:
                return None
            (chosen,) = pools.values()
        return chosen.pick(self._clock)

    def failed(self, upstream: str, pool: str, entry: str | Entry, status: int) -> Choice | None:
        """The upstream answered ``status`` (401/403) to ``entry``: skip it until a reload or
        the cool-down, and the next healthy entry of the pool to try, or None when there is
        none. ``entry`` may be the ``Choice.entry`` that was sent: if the pool was reloaded
        since with a new value, that value is not marked for the old one's failure."""
        held = self._pools.get(upstream, {}).get(pool)
        if held is None:
            return None
        name = entry if isinstance(entry, str) else entry.name
        current = next((c for c in held.choices if c.entry.name == name), None)
        if current is None:
            return None
        now = self._clock()
        stale = isinstance(entry, Entry) and entry is not current.entry
        if not stale:
            mark = held.marks.get(name)
            if mark is None or mark.until <= now:
                self._refused(held, current, status, now)
            held.marks[name] = _Mark(current.entry, now + self.cool_down, time.time(), status)
        for hook in self.on_failure:
            try:
                hook(upstream, pool, current.entry, status)
            except Exception:  # a hook's bug never fails the call it reports
                log.exception("credential failure hook failed")
        following = held.pick(self._clock)
        if following is None or following.entry.name in held.marks:
            return None
        return following

    def _refused(self, pool: _Pool, choice: Choice, status: int, now: float) -> None:
        """An entry newly marked: logged and audited once, not at every call it is answered."""
        following = pool.choices[pool.choices.index(choice) + 1 :]
        spare = [
            c.entry.name
            for c in following
            if (mark := pool.marks.get(c.entry.name)) is None or mark.until <= now
        ]
        log.warning(
            "upstream %s answered %d to credential %s of pool %s: skipped for %ds or until"
            " reloaded; %s",
            pool.upstream,
            status,
            choice.entry.name,
            pool.name,
            int(self.cool_down),
            f"next: {spare[0]}" if spare else "no healthy entry left in the pool",
        )
        if self.audit is not None:
            self.audit.record(
                "credential_failed",
                upstream=pool.upstream,
                pool=pool.name,
                entry=choice.entry.name,
                status=status,
                healthy_left=pool.healthy(now) - 1,
            )

    # -- reload --------------------------------------------------------------------------------
    async def reload(
        self, reason: str, *, actor: str = "system", audit: AuditLog | None = None
    ) -> ReloadResult:
        """Read every reference again (``env:`` from the environment as it is now, files from
        disk) and swap the values in at once, once the ``credentials_reload`` audit line is
        written: ``AuditError`` (nothing changed) when it cannot be. A reference that cannot
        be read keeps the entry's previous value and is reported in the result."""
        async with self._lock:
            resolved, stamps = await asyncio.to_thread(self._resolve_all)
            _, changed, unchanged = self._plan(resolved)
            failed = {"/".join(k): v for k, v in resolved.items() if isinstance(v, str)}
            result = ReloadResult(reason, time.time(), tuple(changed), unchanged, failed)
            writer = audit if audit is not None else self.audit
            if writer is not None:
                await writer.commit(
                    "credentials_reload",
                    actor=actor,
                    reason=reason,
                    changed=list(changed),
                    unchanged=unchanged,
                    failed=failed,
                )
            # Planned again after the await: a failure marked meanwhile is kept or cleared
            # by what is current now (the values read do not change).
            self._apply(resolved)
            self._stamps = stamps
            self.reloaded_at, self.reload_reason = result.at, reason
            self.reloads += 1
        if failed:
            log.error(
                "credentials reloaded (%s): %d changed, %d kept their previous value: %s",
                reason,
                len(changed),
                len(failed),
                "; ".join(failed.values()),
            )
        else:
            log.info("credentials reloaded (%s): %d changed", reason, len(changed))
        return result

    async def watch(self, interval: float = 1.0) -> None:
        """Poll the ``file:`` references' status (on a thread) and reload when one changes.
        Nothing a file holds ends this loop; without file references it returns."""
        if not self._stamps:
            return
        failing: str | None = None
        while True:
            await asyncio.sleep(interval)
            try:
                stamps = await asyncio.to_thread(self._stat_files)
                if stamps == self._stamps:
                    continue
                moved = sorted(p for p in stamps if stamps[p] != self._stamps.get(p))
                await self.reload("file changed: " + ", ".join(_shown(p) for p in moved))
                failing = None
            except AuditError as exc:
                # Not applied: tried again at the next look, said once per distinct error.
                if str(exc) != failing:
                    log.error("credentials not reloaded, the audit log refused: %s", exc)
                failing = str(exc)
            except Exception:  # pragma: no cover - reload catches what a file can cause
                log.exception("credential watcher: unexpected error, still watching")

    # -- what operators and metrics read --------------------------------------------------------
    def counts(self) -> Iterable[tuple[str, str, int, int]]:
        """``(upstream, pool, healthy, entries)`` of each pool (the scrape-time gauges)."""
        now = self._clock()
        for upstream, pools in self._pools.items():
            for name, pool in pools.items():
                yield upstream, name, pool.healthy(now), len(pool.configured)

    def entry_names(self) -> Iterable[tuple[str, str, str]]:
        for pool, entry in self._entries():
            yield pool.upstream, pool.name, entry.name

    def status(self) -> dict[str, Any]:
        """Upstreams, pools and entries, healthy or not, and the last reload: never a value."""
        now = self._clock()
        upstreams: dict[str, Any] = {}
        for upstream, pools in self._pools.items():
            listed: dict[str, Any] = {}
            for name, pool in pools.items():
                resolved = {c.entry.name for c in pool.choices}
                entries = []
                for entry, (header, _) in zip(pool.configured, pool.header, strict=True):
                    mark = pool.marks.get(entry.name)
                    down = mark is not None and mark.until > now
                    entries.append(
                        {
                            "name": entry.name,
                            "reference": _shown(entry.value),
                            "header": header,
                            "resolved": entry.name in resolved,
                            "healthy": entry.name in resolved and not down,
                            "failed_at": mark.at if down and mark else None,
                            "failed_status": mark.status if down and mark else None,
                            "retry_in": round(mark.until - now, 1) if down and mark else None,
                            "error": pool.errors.get(entry.name),
                        }
                    )
                listed[name] = {"entries": entries}
            upstreams[upstream] = listed
        return {
            "reloaded_at": self.reloaded_at,
            "reload_reason": self.reload_reason,
            "reloads": self.reloads,
            "upstreams": upstreams,
        }

    def __repr__(self) -> str:
        shape = {u: sorted(p) for u, p in self._pools.items()}
        return f"CredentialPools({shape})"


# -- the admin API ----------------------------------------------------------------------------
MAX_BODY = 4096
"""Bytes of a reload request's body read at most (it holds a reason)."""
MAX_REASON = 500


class ReloadBody(BaseModel):
    """``POST /gateway/credentials/reload``."""

    model_config = ConfigDict(extra="forbid", strict=True, hide_input_in_errors=True)

    reason: str = Field("", max_length=MAX_REASON)
    """Why, for the audit log."""


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def _read_body(request: web.Request) -> bytes | None:
    """The body, or None past ``MAX_BODY`` (not read further)."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        return None
    data = bytearray()
    async for chunk in request.content.iter_chunked(MAX_BODY + 1):
        data += chunk
        if len(data) > MAX_BODY:
            return None
    return bytes(data)


async def reload_handler(request: web.Request) -> web.Response:
    """Read every credential reference again; audited before the values are swapped in."""
    from gateway.appkeys import AUDIT, POOLS  # appkeys imports this module

    caller = request.get(ADMIN_CALLER)
    if caller is None:  # the admin guard sets it; without it nobody is let in
        return _json({"error": "admin credentials required"}, 401)
    raw = await _read_body(request)
    if raw is None:
        return _json({"error": f"the body is larger than {MAX_BODY} bytes"}, 413)
    try:
        # Strict JSON: a duplicate field, NaN or bad UTF-8 is refused, never half read.
        body = ReloadBody.model_validate(strict_json(raw))
    except BodyRefused as refused:
        return _json({"error": f"{refused.message} (reload takes only a reason)"}, refused.status)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)
        )
        return _json({"error": f"{problems[:500]} (reload takes only a reason)"}, 400)
    reason = "".join(c if c.isprintable() else " " for c in body.reason).strip() or "admin"
    try:
        result = await request.config_dict[POOLS].reload(
            reason, actor=caller.actor, audit=request.config_dict[AUDIT]
        )
    except AuditError as exc:
        return _json({"error": f"not done: {exc}; the credentials were not reloaded"}, 503)
    return _json(result.to_json())


async def status_handler(request: web.Request) -> web.Response:
    from gateway.appkeys import POOLS

    return _json(request.config_dict[POOLS].status())


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ROUTES: list[tuple[str, str, Handler, str]] = [
    ("POST", "/credentials/reload", reload_handler, "credentials:write"),
    ("GET", "/credentials", status_handler, "credentials:write"),
]
"""Admin routes (under ``/gateway``): method, path, handler, scope."""
