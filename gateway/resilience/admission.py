"""The admission step: may this call go to its upstream now, and to which?

Before a turn begins (a call answered here is no turn): the upstream's breaker (open: its
fallback takes the call, the model renamed as the fallback's map says, or the call is answered
at once with the provider's own overload error), then a slot of the upstream's concurrency
limit for the call's owner (its session, else its key), waiting in the bounded queue if need
be (``Shed`` answers 429 with ``Retry-After``). ``pipeline.answered``'s ``finally`` gives the
slot back when the call ends, however (inline there: it runs for every call).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable

import msgspec

from gateway.appkeys import POLICY
from gateway.credentials import credential
from gateway.errors import BreakerOpen, ClientDisconnected
from gateway.errors import Shed as Overloaded
from gateway.exchange import Exchange
from gateway.resilience.breaker import CLOSED, HALF_OPEN
from gateway.resilience.limiter import Shed
from gateway.upstream import Upstream


def admit(ex: Exchange) -> Awaitable[None] | None:
    """Admitted at once (None: nothing to await, the common case), or the wait for a slot to
    await; raises ``BreakerOpen`` when neither the upstream nor its fallback may be called."""
    identity = ex.identity
    if identity is not None:
        owner = identity.session_id
    else:  # passthrough: the key is the owner (read first: it may refuse two credentials)
        owner = credential(ex.request.headers, ex.upstream.provider).key_hash or "anonymous"
    upstream = ex.upstream
    breaker = upstream.breaker
    if breaker.state is not CLOSED and not breaker.allow():  # closed: allow() says yes
        upstream = fallback(ex, upstream)
        breaker = upstream.breaker
    probe = breaker.state is HALF_OPEN
    if probe:  # this call's ``allow`` took the one probe: given back if it gets no answer
        ex.breaker_moves += (f"{upstream.name}: open -> half_open",)
    if upstream.limiter.try_acquire(owner):
        ex.slot_owner, ex.probing = owner, probe
        return None
    return _queued(ex, upstream, owner, probe)


async def _queued(ex: Exchange, upstream: Upstream, owner: str, probe: bool) -> None:
    """The limit is reached: a place in its queue, then a slot (or ``Shed``: a 429). A
    client that left while it waited is not sent upstream."""
    queued = time.perf_counter()
    try:
        await upstream.limiter.wait(owner)
    except BaseException as exc:  # shed, or cancelled while it waited (a drain's cut)
        if probe:
            upstream.breaker.abandoned()
        if isinstance(exc, Shed):
            ex.shed = exc.reason
            raise Overloaded(upstream.name, exc.reason, exc.retry_after, exc.limit) from None
        raise
    finally:
        ex.queued_seconds = time.perf_counter() - queued
    ex.slot_owner, ex.probing = owner, probe
    if ex.client_gone():  # nobody to answer: no upstream call, no turn (the slot goes back)
        raise ClientDisconnected("The client went away while the call waited for a slot.")


def fallback(ex: Exchange, upstream: Upstream) -> Upstream:
    """The upstream's breaker is open: its fallback takes the call if its own breaker lets
    it, else the call is answered now. A renamed model is priced as the fallback's."""
    spare = upstream.fallback
    if spare is None or not spare.breaker.allow():
        ex.shed = "breaker_open"
        raise BreakerOpen(upstream.name, upstream.breaker.retry_after())
    model = ex.facts.model if ex.facts is not None else None
    renamed = upstream.fallback_model(model) if model else None
    if renamed is not None and renamed != model:
        ex.upstream_body = with_model(ex.upstream_body, renamed)
        policy = ex.app[POLICY].current
        if ex.decision is not None and policy is not None:  # cost counts what it bills
            ex.decision.price = policy.price(renamed, time.time())
    ex.fallback_from, ex.upstream = upstream.name, spare
    return spare


_FIELDS = msgspec.json.Decoder(dict[str, msgspec.Raw])


def with_model(body: bytes, model: str) -> bytes:
    """The body with another model name (a fallback's map). Every other field keeps its raw
    bytes: the body passed the envelope's decode, so this decode cannot fail on it."""
    fields = _FIELDS.decode(body)
    fields["model"] = msgspec.Raw(msgspec.json.encode(model))
    return msgspec.json.encode(fields)
