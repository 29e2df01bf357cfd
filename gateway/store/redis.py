"""Redis store (``--store redis://host:6379/0``): one state for every replica of the gateway.

What Redis holds is the truth: each change to a session or a budget is one call of one Lua
script (``redis.lua``), so a check and its reservation happen together on the server and no
number of replicas, nor any concurrency, overshoots a limit. The hot path makes one round
trip before a call goes upstream, the check-and-reserve: the policy decides on this replica's
copy of the session (``current``: what its last turn's settle brought back), and the script
checks that copy is current (the session's ``rev``); when another replica changed the
session since, it answers with the session as it is and nothing counted
(``SessionChanged``), and the call is decided again. A session this replica has no copy of
is read first. What comes after the answer (the turn's usage, notes, compactions) is queued
and written by a background task, pipelined; reads of this replica wait for its own queue
first, so it always reads its own writes.

A reservation is a lease: its replica renews it while the call runs (every ``lease / 4``
seconds); a replica that dies mid-call stops renewing, and the next check frees what the
lease held once it is ``lease`` seconds old.

When Redis cannot be reached the store is degraded (``trouble``) and calls go on from this
replica's own view, as ``SessionTable`` does for SQLite (``store_outage: open``; ``closed``
refuses them): sessions begun in memory, budgets counted here. A background task reconnects
with backoff and jitter; once Redis answers, what was counted here is folded into what it
holds (the script's ``merge``: counts added, so no turn or token is lost), and the queue is
written. Writes that fail stay queued in memory until they land; each carries its number in
this replica's order, so one sent again after a lost connection is not counted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import secrets
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, replace
from importlib.resources import files
from typing import Any, cast
from urllib.parse import unquote_plus

import orjson
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.driver_info import DriverInfo
from redis.retry import Retry

from gateway.dialects.base import Usage
from gateway.errors import SessionTaken
from gateway.identity import Identity, qualified
from gateway.secret import Secret
from gateway.store.base import (
    BUDGET_GRACE,
    RETENTION_SWEEP_EVERY,
    LimitExceeded,
    LoadFailed,
    SessionChanged,
    SessionEnded,
    SessionTable,
    StoreRefused,
    matches,
)
from gateway.store.keys import KeyTable
from gateway.store.records import (
    Backlog,
    BudgetCounter,
    BudgetLimit,
    CompactionNote,
    Grant,
    LimitHit,
    Limits,
    SessionQuery,
    SessionRecord,
    TurnEnd,
    TurnStart,
    TurnTicket,
)
from gateway.store.redis_layout import LAYOUT, Keys, from_hash, to_hash

log = logging.getLogger("gateway.store")

DRIVER = DriverInfo()
"""Named to Redis (CLIENT SETINFO) with redis-py's version, read here at import: left to each
new connection, it is a file read on the event loop."""
SCRIPT = files("gateway.store").joinpath("redis.lua").read_text()
FAILURES: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    redis_errors.ReadOnlyError,
    redis_errors.MasterDownError,
    redis_errors.TryAgainError,
    redis_errors.OutOfMemoryError,
    OSError,
    TimeoutError,
)
"""What says Redis is away (down, restarting, failed over, too slow, out of memory), not that
a call is bad: the replica goes on with its own view, and what it could not write is kept."""
BATCH = 256
"""Queued writes sent in one pipeline."""
FIND_SCAN = 5_000
"""Index entries one ``find`` looks at, at most (filters that match little stop there)."""
COPIES_KEPT, COPIES_BYTES = 10_000, 64 * 1024 * 1024
"""Sessions whose copy a replica keeps for its calls' decisions (``current``), at most, and
the bytes of their fields (a session holds up to 20 events of each kind, and with
``store_summaries`` its saved rewrites)."""
REWRITES_HELD = 10_000
"""Sessions whose saved rewrites a replica holds in memory when summaries are not stored."""
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 5.0
"""Seconds between reconnect attempts: doubling from the first to the most, with jitter."""


class LayoutMismatch(StoreRefused):
    """The Redis holds another layout version than this gateway's: it must not write there."""

    def __init__(self, found: str, url: str) -> None:
        super().__init__(
            f"the Redis store at {url} holds layout {found or 'none'}, this gateway writes layout"
            f" {LAYOUT}: run every replica on one version (finish the upgrade or roll it back),"
            " or give this one another prefix (?prefix=name)"
        )
        self.found = found


_AWAY: tuple[type[BaseException], ...] = (*FAILURES, LayoutMismatch)
"""Redis away, or holding another layout: either way this replica goes on without it."""
_REFUSED: tuple[type[BaseException], ...] = (*_AWAY, redis_errors.RedisError)
"""Anything Redis answers instead of a reply, on the hot path: the call goes on without it."""


@dataclass(slots=True, frozen=True)
class _Op:
    """A queued write: the script's keys and arguments."""

    keys: list[str]
    args: list[str]
    at: float
    """When it was queued (time.monotonic): the backlog's age."""
    number: int
    """Its place in this replica's writes: Redis skips one it has run (``_write_queue``)."""


def display_url(url: str) -> str:
    """The store URL without its password, in the authority or the query (for logs and the
    startup line). The query from its first secret on is hidden first (a value holding ``@``
    or ``&`` included), then all before the last ``@`` left, as with a password holding ``@``,
    ``/`` or ``?`` unescaped: a misread URL hides more than its password, never less."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    head, mark, query = rest.partition("?")
    if mark:  # from a secret on, all hidden: its value may hold '&' unescaped
        parts = query.split("&")
        for i, part in enumerate(parts):
            if _secret_param(part):
                query = "&".join([*parts[:i], f"{part.partition('=')[0]}=***"])
                break
    hidden = f"{head}{mark}{query}"
    if "@" not in rest:
        return f"{scheme}://{hidden}"
    auth, at, tail = hidden.rpartition("@")
    if not at:  # every '@' was in a secret's value
        return f"{scheme}://***"
    user, colon, _ = auth.partition(":")
    shown = f"{user}:***@" if colon and not set("/?#&=") & set(user) else "***@"
    return f"{scheme}://{shown}{tail}"


def _secret_param(part: str) -> bool:
    return unquote_plus(part.partition("=")[0]).strip().lower() in SECRET_PARAMS


SECRET_PARAMS = frozenset({"password", "ssl_password"})
"""URL query parameters redis-py reads that are credentials (``unix://...?password=``)."""


def _opt(value: float | int | None) -> str:
    return "" if value is None else repr(value)


def _number(text: bytes) -> float | int:
    value = float(text)
    return int(value) if value.is_integer() else value


def _describe(exc: BaseException) -> str:
    """An error for the log and the degraded detail: its type and Redis's few words, capped."""
    text = str(exc)
    return (f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:200]


class RedisStore(KeyTable, SessionTable):
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "gateway",
        password: Secret | None = None,
        lease: float = 60.0,
        timeout: float = 1.0,
        close_timeout: float = 5.0,
        store_summaries: bool = False,
    ) -> None:
        super().__init__()
        self.url = url
        self.shown_url = display_url(url)
        self.keys = Keys(prefix)
        self._password = password
        self.lease = lease
        """Seconds a reservation outlives a replica that stopped renewing it."""
        self.timeout = timeout
        """Seconds a Redis call may take before Redis counts as away."""
        self.close_timeout = close_timeout
        self.store_summaries = store_summaries
        """Whether compaction's saved rewrites (summaries: prompt content) go to Redis, where
        every replica reuses them; off, each replica keeps its own in memory."""
        self.replica = secrets.token_hex(6)
        self.keys_known = False
        """False until Redis was read once: an unknown key may be one it holds (a 503, not 401)."""
        self._leases: dict[str, float] = {}
        """Leases of this replica's calls in flight, renewed while they run."""
        self._lease_numbers = itertools.count(1)
        self._write_numbers = itertools.count(1)
        self._queue: deque[_Op] = deque()
        self._pending: Counter[str] = Counter()
        """Queued writes by the session key they change (a read waits for its own)."""
        self._write_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._down = False
        self._client: Redis | None = None
        self._sha = ""
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._rewrites: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self._copies: OrderedDict[str, dict[bytes, bytes]] = OrderedDict()
        """Sessions as their last settle or read left them, by key (``current``)."""
        self._copies_size = 0
        self.merged = 0
        """Sessions counted here while Redis was away and folded into it since."""

    @property
    def client(self) -> Any:  # redis-py's replies are typed loosely: checked where read
        assert self._client is not None, "the store is not open"
        return self._client

    # -- lifecycle -------------------------------------------------------------------------------
    async def open(self) -> None:
        password = self._password.reveal() if self._password is not None else None
        self._client = Redis.from_url(
            self.url,
            password=password,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0),  # the store decides: degraded at once, reconnect later
            health_check_interval=30,
            max_connections=128,
            decode_responses=False,
            driver_info=DRIVER,
        )
        try:
            await self._connect()
        except FAILURES as exc:
            # Requests flow from the start, on this replica's view; the keeper reconnects.
            log.warning("store: Redis at %s unreachable at start: %s", self.shown_url, exc)
            self._failed(exc)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._write_forever()),
            loop.create_task(self._keep_forever()),
            loop.create_task(self._renew_forever()),
        ]

    async def _connect(self) -> None:
        """Check the layout, load the script, read the keys: raises what Redis raised, or
        ``LayoutMismatch``."""
        client = self.client
        await client.set(self.keys.layout, LAYOUT, nx=True)
        found = await client.get(self.keys.layout)
        found_text = found.decode() if found is not None else ""
        if found_text != LAYOUT:
            raise LayoutMismatch(found_text, self.shown_url)
        self._sha = await client.script_load(SCRIPT)
        stored = await client.hgetall(self.keys.keys)
        self._loaded_keys([(k.decode(), v) for k, v in stored.items()])
        self.keys_known = True
        await self._check_eviction()

    async def _check_eviction(self) -> None:
        """Said once per connect: under any policy but ``noeviction`` a full Redis may drop a
        live session or budget window (they carry expiries), and its counts with it."""
        try:
            memory = await self.client.info("memory")
        except redis_errors.ResponseError:  # INFO renamed or refused by a managed Redis
            return
        policy = memory.get("maxmemory_policy", "noeviction")
        policy = policy.decode() if isinstance(policy, bytes) else str(policy)
        if policy != "noeviction":
            log.warning(
                "store: Redis at %s evicts keys when full (maxmemory-policy %s): a session or"
                " budget it evicts loses its counts; set maxmemory-policy noeviction",
                self.shown_url,
                policy[:40],
            )

    async def close(self) -> None:
        # Flagged as well as cancelled: redis-py may turn a cancellation inside a call into a
        # connection error, which the loops catch and would go on from.
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        deadline = time.monotonic() + self.close_timeout
        while self._queue or self.sessions or self.budget_counters:
            if not self._down:
                with contextlib.suppress(*_REFUSED):  # what is left is said below
                    await asyncio.wait_for(self._catch_up(), max(deadline - time.monotonic(), 0))
            if time.monotonic() >= deadline or not (self._queue or self.sessions):
                break
            await asyncio.sleep(0.1)
            with contextlib.suppress(*_REFUSED):
                await self._connect()
                self._down = False
        if self._queue or self.sessions:
            log.error(
                "store: %d writes and %d sessions counted while Redis was away could not be"
                " written before shutdown: their changes are lost",
                len(self._queue),
                len(self.sessions),
            )
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()

    # -- Redis away and back ---------------------------------------------------------------------
    def _failed(self, exc: BaseException, operation: str = "write") -> None:
        self.errors[operation] += 1
        self._drop_copies()  # what changes while Redis is away is merged back: read again
        if not self._down:
            self._down = True
            log.warning("store: Redis at %s away: %s", self.shown_url, _describe(exc))
        self._set_trouble("redis", f"Redis unreachable ({_describe(exc)})")

    async def _fetch(self, session_id: str) -> SessionRecord | None:
        # Reached only while Redis is away: the session table then begins it in memory.
        raise LoadFailed(session_id, ConnectionError("Redis is away"))

    async def _keep_forever(self) -> None:
        """Reconnect while Redis is away (backoff with jitter); while it is here, fold in what
        was counted without it, and sweep the indexes. Nothing Redis answers ends it."""
        attempt = 0
        swept = time.monotonic()
        while not self._closing:
            try:
                if self._down:
                    delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2**attempt)
                    await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                    attempt += 1
                    await self._reconnect()
                    attempt = 0
                    continue
                await asyncio.sleep(min(1.0, self.lease / 4))
                if self.sessions or self.budget_counters:
                    await self._catch_up()
                if time.monotonic() - swept >= RETENTION_SWEEP_EVERY:
                    swept = time.monotonic()
                    await self._sweep_indexes()
            except LayoutMismatch as exc:  # said in full: the operator has a rollout to finish
                self._down = True
                self._set_trouble("redis", str(exc))
            except FAILURES as exc:
                self._failed(exc)
            except Exception as exc:  # a reply never seen, or a bug: said, and it goes on
                self._failed(exc)
                log.exception("store: keeping up with Redis failed")
            self._check_lag()

    async def _reconnect(self) -> None:
        await self._connect()
        self._drop_copies()
        self._down = False
        log.warning("store: Redis at %s is back", self.shown_url)
        await self._catch_up()
        self._set_trouble("redis", None)

    async def _renew_forever(self) -> None:
        """Renew the leases of this replica's calls in flight, on its own: a long catch-up
        never lets them lapse."""
        while not self._closing:
            await asyncio.sleep(self.lease / 4)
            if self._down or not self._leases:
                continue
            try:
                await self._renew()
            except _AWAY as exc:
                self._failed(exc)
            except Exception as exc:
                self._failed(exc)
                log.exception("store: renewing the leases failed")

    async def _catch_up(self) -> None:
        """Fold what was counted here into Redis (sessions with no call in flight here), then
        write the queue."""
        for session_id in [i for i, r in self.sessions.items() if r.in_flight == 0]:
            record = self.sessions[session_id]
            await self._merge(record)
            del self.sessions[session_id]
            self.unloaded.discard(session_id)
            self.merged += 1
        for key in list(self.budget_counters):
            counter = self.budget_counters[key]
            if counter.reserved_tokens or counter.reserved_cost:
                continue  # calls in flight here: merged once they end
            await self._merge_budget(counter)
            del self.budget_counters[key]
        await self._write_queue()

    async def _merge(self, record: SessionRecord) -> None:
        keys = self._keys_for(record.id, record.id, [])
        reply = await self._script(keys, ["merge", *self._common(), *to_hash(record)])
        if reply[0] == b"taken":
            # Its id is another key's in Redis: the figures go to the caller's qualified id.
            owner = record.key_hash or "nokey"
            if record.id.endswith(f"~{owner}"):
                log.error("store: %d turns counted while Redis was away: id taken", record.turns)
                return
            record.id = qualified(Identity(record.id, "", "", key_hash=record.key_hash)).session_id
            await self._merge(record)

    async def _merge_budget(self, counter: BudgetCounter) -> None:
        key = self.keys.budget(counter.key)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hsetnx(key, "key", counter.key)
            pipe.hsetnx(key, "window_end", repr(counter.window_end))
            pipe.hincrby(key, "requests", counter.requests)
            pipe.hincrby(key, "tokens", counter.tokens)
            pipe.hincrbyfloat(key, "cost", counter.cost)
            pipe.expireat(key, math.ceil(counter.window_end + BUDGET_GRACE))
            pipe.zadd(self.keys.budget_index, {counter.key: counter.window_end})
            await pipe.execute()

    async def _renew(self) -> None:
        keys = self._keys_for("", "", [])
        leases = list(self._leases)
        for at in range(0, len(leases), 1000):  # a script's arguments: a thousand at a time
            renew = ["renew", *self._common(), repr(self.lease), *leases[at : at + 1000]]
            await self._script(keys, renew)

    async def _sweep_indexes(self) -> None:
        """Sessions expire by themselves (their TTL is the retention); their index entries and
        ended budget windows are trimmed here."""
        now = time.time()
        async with self.client.pipeline(transaction=False) as pipe:
            if self.retention.idle is not None:
                pipe.zremrangebyscore(self.keys.session_index, "-inf", now - self.retention.idle)
            pipe.zremrangebyscore(self.keys.budget_index, "-inf", now - BUDGET_GRACE)
            await pipe.execute()
        await self._script(self._keys_for("", "", []), ["reclaim", *self._common()])

    def _check_lag(self) -> None:
        age = time.monotonic() - self._queue[0].at if self._queue else 0.0
        if age > self.lag_bound:
            self._set_trouble("lag", f"changes waiting {age:.0f}s to be written")
        else:
            self._set_trouble("lag", None)

    def backlog(self) -> Backlog:
        age = time.monotonic() - self._queue[0].at if self._queue else 0.0
        return Backlog(
            sessions=len(self.sessions) + len({op.keys[0] for op in self._queue}),
            budgets=len(self.budget_counters),
            age=age,
            unloaded=len(self.unloaded),
        )

    # -- calling the script ----------------------------------------------------------------------
    def _common(self) -> list[str]:
        retention = self.retention
        return [repr(time.time()), _opt(retention.idle), _opt(retention.ended), LAYOUT]

    def _keys_for(self, session: str, other: str, budgets: list[str]) -> list[str]:
        k = self.keys
        return [
            k.session(session),
            k.session(other),
            k.session_index,
            k.leases,
            k.lease_entries,
            k.budget_index,
            *(k.budget(b) for b in budgets),
        ]

    async def _script(self, keys: list[str], args: list[str]) -> list[Any]:
        """One call of the script (loaded again if Redis lost it)."""
        try:
            reply = await self.client.evalsha(self._sha, len(keys), *keys, *args)
        except redis_errors.NoScriptError:  # Redis restarted without it: loaded again
            self._sha = await self.client.script_load(SCRIPT)
            reply = await self.client.evalsha(self._sha, len(keys), *keys, *args)
        return self._checked(reply)

    def _checked(self, reply: Any) -> list[Any]:
        if isinstance(reply, list) and reply and reply[0] == b"layout":
            found = reply[1].decode() if len(reply) > 1 else ""
            raise LayoutMismatch(found, self.shown_url)
        assert isinstance(reply, list)
        return reply

    # -- queued writes ---------------------------------------------------------------------------
    def _enqueue(self, keys: list[str], args: list[str]) -> None:
        self._queue.append(_Op(keys, args, time.monotonic(), next(self._write_numbers)))
        self._pending[keys[0]] += 1
        self._wake.set()

    async def _write_forever(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            if self._down:
                continue  # written once Redis is back (the keeper's catch-up)
            try:
                await self._write_queue()
            except _AWAY as exc:
                self._failed(exc)
            except Exception as exc:  # a bug or a reply never seen: said, and the writer lives
                self._failed(exc)
                log.exception("store: writing to Redis failed")

    async def _write_queue(self) -> None:
        """Send what is queued, in order, in pipelines of ``BATCH``; what fails stays queued.

        Each write carries its number, and Redis skips one whose number it has seen from this
        replica: a batch cut off by a lost connection (some of it may have run) is sent again
        as it was. A write Redis answered without running it (out of memory, its script
        gone) is numbered again with what follows it, as never sent."""
        async with self._write_lock:
            while self._queue and not self._down:
                batch = list(itertools.islice(self._queue, BATCH))
                replies = await self._pipeline(batch)
                kept: list[_Op] = []
                away: BaseException | None = None
                for op, reply in zip(batch, replies, strict=True):
                    self._queue.popleft()
                    if _not_run(reply):
                        kept.append(op)
                        away = away or cast(BaseException, reply)
                    elif self._landed(op, reply):
                        self._written(op)
                        if op.args[0] == "settle" and isinstance(reply, list) and len(reply) > 1:
                            self._keep_copy(op.keys[0], _hash_of(reply))  # the session after it
                    else:
                        kept.append(op)
                if not kept:
                    continue
                self._queue.extendleft(reversed(kept))
                numbers = self._write_numbers
                self._queue = deque(replace(op, number=next(numbers)) for op in self._queue)
                if isinstance(away, redis_errors.NoScriptError):  # Redis lost it: again
                    self._sha = await self.client.script_load(SCRIPT)
                elif away is not None:  # what landed is done with; the rest waits for Redis
                    raise away
                else:
                    return  # another layout's Redis: kept until the keeper says otherwise

    def _written(self, op: _Op) -> None:
        left = self._pending[op.keys[0]] - 1
        if left:
            self._pending[op.keys[0]] = left
        else:
            del self._pending[op.keys[0]]

    async def _pipeline(self, batch: list[_Op]) -> list[Any]:
        replica = self.replica
        async with self.client.pipeline(transaction=False) as pipe:
            for op in batch:
                numbered = f"{op.args[0]}:{replica}:{op.number}"
                pipe.evalsha(self._sha, len(op.keys), *op.keys, numbered, *op.args[1:])
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    def _landed(self, op: _Op, reply: Any) -> bool:
        """Whether the write is done with (landed, or refused for good); False: kept."""
        if isinstance(reply, Exception):
            # Refused by Redis itself (out of memory, a script error): kept would loop for ever.
            self.errors["write"] += 1
            log.error("store: a %s write was refused by Redis: %s", op.args[0], _describe(reply))
            return True
        if isinstance(reply, list) and reply and reply[0] == b"layout":
            self._failed(LayoutMismatch(reply[1].decode(), self.shown_url))
            return False
        return True

    async def _read_own_writes(self, session_id: str | None = None) -> None:
        """Before a read: this replica's queued writes (of that session, or all) sent."""
        if session_id is not None and self.keys.session(session_id) not in self._pending:
            return
        if self._queue and not self._down:
            try:
                await self._write_queue()
            except _AWAY as exc:
                self._failed(exc)

    # -- the store interface ---------------------------------------------------------------------
    async def get(self, session_id: str) -> SessionRecord | None:
        await self._read_own_writes(session_id)
        if self._down:
            return await super().get(session_id)
        key = self.keys.session(session_id)
        try:
            raw = await self.client.hgetall(key)
        except _REFUSED as exc:
            self._failed(exc, "load")
            return await super().get(session_id)
        self._keep_copy(key, raw)
        return self._with_rewrites(from_hash(raw))

    async def current(self, session_id: str) -> SessionRecord | None:
        """This replica's copy of the session when it has one (no round trip): the copy its
        last turn's settle or read brought back. The turn's ``begin`` checks it is current
        (``TurnStart.seen``); another replica's change since is a ``SessionChanged``."""
        key = self.keys.session(session_id)
        if key in self._pending:  # its settle queued: once written, the copy is the reply
            await self._read_own_writes(session_id)
        raw = self._copies.get(key)
        if raw is None or self._down:
            return await self.get(session_id)
        self._copies.move_to_end(key)
        return self._with_rewrites(from_hash(raw))

    def _keep_copy(self, key: str, raw: dict[bytes, bytes]) -> None:
        copies = self._copies
        self._drop_copy(key)
        if not raw:
            return
        copies[key] = raw
        self._copies_size += _size(raw)
        while len(copies) > COPIES_KEPT or self._copies_size > COPIES_BYTES:
            _, dropped = copies.popitem(last=False)
            self._copies_size -= _size(dropped)

    def _drop_copy(self, key: str) -> None:
        dropped = self._copies.pop(key, None)
        if dropped is not None:
            self._copies_size -= _size(dropped)

    def _drop_copies(self) -> None:
        self._copies.clear()
        self._copies_size = 0

    def _with_rewrites(self, record: SessionRecord | None) -> SessionRecord | None:
        if record is not None and not self.store_summaries:
            record.context_rewrites = list(self._rewrites.get(record.id, ()))
        return record

    async def begin_turn(self, start: TurnStart, limits: Limits) -> TurnTicket:
        if self._down:
            return await super().begin_turn(start, limits)
        ident = start.identity
        other = qualified(ident).session_id
        budgets = [limit.key for limit in limits.budgets]
        lease = f"{self.replica}:{next(self._lease_numbers)}"
        args = [
            "begin",
            *self._common(),
            *_ident_args(ident),
            ident.session_id,
            other,
            "1" if start.user_turn else "0",
            str(start.reserve_tokens),
            repr(start.reserve_cost),
            _opt(limits.max_turns),
            _opt(limits.max_session_tokens),
            _opt(limits.idle_timeout),
            lease,
            repr(self.lease),  # the deadline is Redis's clock plus this
            "" if start.seen is None else str(start.seen),
        ]
        for limit in limits.budgets:
            args += [
                repr(limit.window_end),
                _opt(limit.max_tokens),
                _opt(limit.max_cost),
                _opt(limit.max_requests),
                limit.key,
            ]
        args[1] = repr(start.at)
        try:
            reply = await self._script(self._keys_for(ident.session_id, other, budgets), args)
        except _REFUSED as exc:  # any refusal: counted here instead
            self._failed(exc)
            return await super().begin_turn(start, limits)
        kind = reply[0]
        if kind == b"changed":
            raw = _hash_of(reply)
            self._keep_copy(self.keys.session(ident.session_id), raw)
            raise SessionChanged(self._with_rewrites(from_hash(raw)))
        if kind == b"taken":
            raise SessionTaken(reply[1].decode())
        if kind == b"limit":
            raise LimitExceeded(_limit_hit(reply, start, limits))
        self._leases[lease] = time.monotonic()
        return TurnTicket(
            reply[1].decode(),
            int(reply[2]),
            start.reserve_tokens,
            turns_left=int(reply[3]) if reply[3] else None,
            tokens_left=int(reply[4]) if reply[4] else None,
            tokens_allowed=int(reply[5]) if reply[5] else None,
            budgets=tuple(dict.fromkeys(budgets)),
            reserved_cost=start.reserve_cost,
            lease=lease,
        )

    async def end_turn(self, ticket: TurnTicket, end: TurnEnd) -> None:
        if ticket.lease is None:  # begun here while Redis was away
            await super().end_turn(ticket, end)
            return
        self._leases.pop(ticket.lease, None)
        usage = end.usage
        counts = _usage_counts(usage)
        args = [
            "settle",
            *self._common(),
            ticket.lease,
            str(ticket.reserved_tokens),
            repr(ticket.reserved_cost),
            str(end.status),
            "" if end.body_hash is None else str(end.body_hash),
            end.model or "unknown",
            repr(end.cost),
            "1" if usage is not None else "0",
            *map(str, counts),
            "1" if usage is not None and usage.estimated else "0",
            str(end.retries),
            repr(end.at),
        ]
        keys = self._keys_for(ticket.session_id, ticket.session_id, list(ticket.budgets))
        self._enqueue(keys, args)

    async def _record(self, identity: Identity, at: float, op: str, extra: list[str]) -> None:
        args = [op, *self._common(), *_ident_args(identity), identity.session_id]
        args += [qualified(identity).session_id, *extra]
        args[1] = repr(at)
        self._enqueue(self._keys_for(identity.session_id, qualified(identity).session_id, []), args)

    async def record_aux(self, identity: Identity, at: float) -> None:
        if self._down:
            await super().record_aux(identity, at)
            return
        await self._record(identity, at, "aux", [])

    async def note(
        self,
        identity: Identity,
        at: float,
        kind: str,
        event: dict[str, Any],
        *,
        rejected: bool = False,
    ) -> None:
        if self._down:
            await super().note(identity, at, kind, event, rejected=rejected)
            return
        await self._record(
            identity, at, "note", [kind, orjson.dumps(event).decode(), "1" if rejected else "0"]
        )

    async def record_compaction(self, identity: Identity, at: float, note: CompactionNote) -> None:
        if note.rewrite is not None and not self.store_summaries:
            self._hold_rewrite(identity.session_id, note.rewrite)
            note = replace(note, rewrite=None)
        if self._down:
            await super().record_compaction(identity, at, note)
            return
        usage = note.summary_usage
        counts = _usage_counts(usage)
        extra = [
            str(note.saved_tokens),
            orjson.dumps(note.event).decode() if note.event is not None else "",
            orjson.dumps(note.rewrite).decode() if note.rewrite is not None else "",
            "1" if usage is not None else "0",
            *map(str, counts),
            repr(note.summary_cost),
        ]
        await self._record(identity, at, "compaction", extra)

    def _hold_rewrite(self, session_id: str, rewrite: dict[str, Any]) -> None:
        held = self._rewrites.pop(session_id, [])
        self._rewrites[session_id] = [*held, rewrite][-3:]
        while len(self._rewrites) > REWRITES_HELD:
            self._rewrites.popitem(last=False)

    async def grant(self, session_id: str, grant: Grant) -> SessionRecord | None:
        if self._down:
            return await super().grant(session_id, grant)
        await self._read_own_writes()
        event = {
            "turns": grant.turns,
            "tokens": grant.tokens,
            "by": grant.by,
            "reason": grant.reason,
            "at": grant.at,
        }
        args = [
            "grant",
            *self._common(),
            str(grant.turns),
            str(grant.tokens),
            grant.by,
            orjson.dumps(event).decode(),
        ]
        reply = await self._admin_call(session_id, args)
        if reply is None:
            return None
        if reply[0] == b"ended":
            record = _record_of(reply[1])
            assert record is not None
            raise SessionEnded(record)
        return self._with_rewrites(_record_of(reply[1]))

    async def set_status(self, session_id: str, status: str, reason: str) -> SessionRecord | None:
        if self._down:
            return await super().set_status(session_id, status, reason)
        await self._read_own_writes()
        reply = await self._admin_call(session_id, ["status", *self._common(), status, reason])
        return None if reply is None else self._with_rewrites(_record_of(reply[1]))

    async def _admin_call(self, session_id: str, args: list[str]) -> list[Any] | None:
        try:
            reply = await self._script(self._keys_for(session_id, session_id, []), args)
        except _AWAY as exc:
            self._failed(exc)
            raise LoadFailed(session_id, exc) from exc
        return None if reply[0] == b"none" else reply

    async def find(self, query: SessionQuery) -> list[SessionRecord]:
        await self._read_own_writes()
        if self._down:
            return await super().find(query)
        try:
            return await self._find(query)
        except FAILURES as exc:
            self._failed(exc, "load")
            return await super().find(query)

    async def _find(self, query: SessionQuery) -> list[SessionRecord]:
        newest = f"({query.before!r}" if query.before is not None else "+inf"
        oldest = repr(query.since) if query.since is not None else "-inf"
        found: list[SessionRecord] = []
        offset, size = 0, max(query.limit, 50)
        client = self.client
        while len(found) < query.limit and offset < FIND_SCAN:
            ids = await client.zrevrangebyscore(
                self.keys.session_index, newest, oldest, start=offset, num=size
            )
            if not ids:
                break
            offset += len(ids)
            async with client.pipeline(transaction=False) as pipe:
                for session_id in ids:
                    pipe.hgetall(self.keys.session(session_id.decode()))
                hashes = await pipe.execute()
            gone = []
            for session_id, raw in zip(ids, hashes, strict=True):
                record = from_hash(raw)
                if record is None:
                    gone.append(session_id)  # expired by its retention: the index follows
                elif matches(record, query):
                    found.append(record)
            if gone:
                await client.zrem(self.keys.session_index, *gone)
                offset -= len(gone)
        for record in found[: query.limit]:
            self._with_rewrites(record)
        return found[: query.limit]

    async def budgets(self) -> list[BudgetCounter]:
        await self._read_own_writes()
        if self._down:
            return await super().budgets()
        now = time.time()
        client = self.client
        try:
            names = await client.zrangebyscore(self.keys.budget_index, f"({now!r}", "+inf")
            async with client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(self.keys.budget(name.decode()))
                hashes = await pipe.execute()
        except FAILURES as exc:
            self._failed(exc, "load")
            return await super().budgets()
        return [_budget_of(raw) for raw in hashes if raw]

    # -- gateway keys: written at once, read from Redis (a revocation elsewhere is seen within
    # the key ring's cache), from memory while Redis is away ------------------------------------
    async def _persist_key(self, key_id: str, data: bytes) -> None:
        if self._down:
            raise LoadFailed(key_id, ConnectionError("Redis is away"))
        try:
            await self.client.hset(self.keys.keys, key_id, data)
        except FAILURES as exc:
            self._failed(exc)
            raise

    async def get_key(self, key_id: str) -> dict[str, Any] | None:
        if not self._down:
            try:
                data = await self.client.hget(self.keys.keys, key_id)
            except FAILURES as exc:
                self._failed(exc, "load")
            else:
                if data is None:
                    self._keys.pop(key_id, None)
                    return None
                self._keys[key_id] = data
        return await super().get_key(key_id)

    async def list_keys(self) -> list[dict[str, Any]]:
        if not self._down:
            try:
                stored = await self.client.hgetall(self.keys.keys)
            except FAILURES as exc:
                self._failed(exc, "load")
            else:
                self._keys = {k.decode(): v for k, v in stored.items()}
        return await super().list_keys()


NOT_RUN = ("NOREPLICAS", "MISCONF", "BUSY", "LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN")
"""Error replies of a Redis that refused a write without running it (no replica to write to,
a failed snapshot, a script running long, a failover): kept, not dropped."""


def _not_run(reply: Any) -> bool:
    """Whether a pipelined write's reply says Redis did not run it (away, out of memory, its
    script gone, or one of ``NOT_RUN``): the write is kept for later."""
    if isinstance(reply, (*FAILURES, redis_errors.NoScriptError)):
        return True
    return isinstance(reply, redis_errors.ResponseError) and str(reply).startswith(NOT_RUN)


def _usage_counts(usage: Usage | None) -> list[int]:
    """The five counts the script takes, in its order (zeros for no usage)."""
    if usage is None:
        return [0, 0, 0, 0, 0]
    return [
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_read_tokens,
        usage.cache_creation_tokens,
        usage.reasoning_tokens,
    ]


def _size(raw: dict[bytes, bytes]) -> int:
    return sum(len(name) + len(value) for name, value in raw.items())


def _hash_of(reply: list[Any]) -> dict[bytes, bytes]:
    """A session's hash from a script's reply: its kind, then field, value, ..."""
    return dict(zip(reply[1::2], reply[2::2], strict=True))


def _ident_args(ident: Identity) -> list[str]:
    return [
        ident.key_hash or "",
        ident.source,
        ident.agent,
        ident.name or "",
        ident.team or "",
        ident.principal or "",
    ]


def _limit_hit(reply: list[Any], start: TurnStart, limits: Limits) -> LimitHit:
    _, limit, allowed, used, reason, index, session = reply
    budget: BudgetLimit | None = None
    retry_after = None
    number = int(index)
    if number:
        budget = limits.budgets[number - 1]
        retry_after = float(max(1, math.ceil(budget.window_end - start.at)))
    return LimitHit(
        limit.decode(),
        _number(allowed),
        _number(used),
        session.decode(),
        retry_after=retry_after,
        budget=budget,
        reason=reason.decode(),
    )


def _record_of(flat: list[bytes]) -> SessionRecord | None:
    return from_hash(dict(zip(flat[::2], flat[1::2], strict=True)))


def _budget_of(raw: dict[bytes, bytes]) -> BudgetCounter:
    def optional(name: bytes) -> int | None:
        value = raw.get(name)
        return None if value is None else int(float(value))

    max_cost = raw.get(b"max_cost")
    return BudgetCounter(
        raw[b"key"].decode(),
        float(raw[b"window_end"]),
        tokens=int(raw.get(b"tokens", b"0")),
        cost=float(raw.get(b"cost", b"0")),
        requests=int(raw.get(b"requests", b"0")),
        reserved_tokens=int(raw.get(b"reserved_tokens", b"0")),
        reserved_cost=float(raw.get(b"reserved_cost", b"0")),
        max_tokens=optional(b"max_tokens"),
        max_cost=None if max_cost is None else float(max_cost),
        max_requests=optional(b"max_requests"),
    )
