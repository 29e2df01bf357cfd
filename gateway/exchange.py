"""``Exchange``: everything one request through the gateway has gathered so far.

The pipeline's steps share it, as mitmproxy's addons share a flow; each step reads what
earlier steps set and adds its own part.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.auth.pools import Choice
from gateway.auth.principal import Principal
from gateway.compaction import Outcome
from gateway.dialects import Dialect, RequestFacts, ResponseFacts
from gateway.dialects.base import Body
from gateway.identity import Identity
from gateway.policy.decide import Decision
from gateway.store import SessionRecord, TurnTicket
from gateway.upstream import Upstream

if TYPE_CHECKING:
    from gateway.telemetry.tracing import RequestTrace


@dataclass(slots=True)
class Exchange:
    request: web.Request
    app: web.Application
    """``request.app``, read once: every step reads it (aiohttp's is a property)."""
    upstream: Upstream
    path: str
    """The provider path (``/v1/...``), without a ``/s/<session>`` prefix."""
    dialect: Dialect | None = None
    """None for calls passed through without reading them (models, files, ...)."""
    path_session: str | None = None
    started: float = field(default_factory=time.perf_counter)
    raw: bytes = b""
    body: Body | None = None
    body_hash: int | None = None
    """XXH3 of the raw body: retry storms are the same bytes again. Not ``hash()``, which
    differs between processes: the figure is kept in the store, shared by replicas."""
    facts: RequestFacts | None = None
    principal: Principal | None = None
    """Who the credential proves the caller is (``auth.step.authenticate``)."""
    credential: Choice | None = None
    """The pool credential sent upstream in place of every client credential (None: the
    client's own credential goes, in passthrough and bring-your-own-key)."""
    identity: Identity | None = None
    record: SessionRecord | None = None
    """The session as it was when the call arrived (None for a new session)."""
    decision: Decision | None = None
    ticket: TurnTicket | None = None
    compaction: Outcome | None = None
    input_estimate: int | None = None
    """The input tokens of what was sent, when the gateway counted them (for calibration)."""
    upstream_body: bytes = b""
    rewritten: bool = False
    """The gateway changed the body it sent upstream (and so may change the answer back)."""
    status: int = 0
    response_facts: ResponseFacts | None = None
    response: web.StreamResponse | None = None
    outcome: str = "ok"
    """ok, bad_request, rejected, upstream_unavailable, upstream_cut, client_gone, drain_cut
    (a stop's deadline), ..."""
    first_byte_at: float | None = None
    upstream_at: float | None = None
    """``perf_counter()`` when the call to the upstream began; ``upstream_done_at`` when its
    answer had been read (telemetry splits the gateway's own time from the upstream's)."""
    upstream_done_at: float | None = None
    summary_seconds: float = 0.0
    """Time spent in compaction's summary call: upstream work, not the gateway's overhead."""
    compaction_seconds: float = 0.0
    """Wall time of the compaction step, summary call and waiting for the session's lock
    included (``gateway_compaction_duration_seconds``)."""
    rejection: tuple[str, str] | None = None
    """The limit and the rule of a policy stop (or a context overflow)."""
    turn: int | None = None
    team: str | None = None
    cost: float = 0.0
    unpriced: bool = False
    """The call used tokens of a model with no price: its cost is not in ``cost``."""
    window: int | None = None
    """The model's context window, once compaction has looked it up."""
    trace: RequestTrace | None = None
    retries: int = 0
    """Upstream attempts after the first (``upstream.send``): counted, never as turns."""
    retry_reasons: tuple[str, ...] = ()
    """What failed before each retry (``connect_error``, ``reset``, ``timeout``, ``http_...``)."""
    budget_spent: bool = False
    """A retry was wanted, but the upstream's retry budget was spent."""
    breaker_moves: tuple[str, ...] = ()
    """Breaker transitions this call caused (``openai: closed -> open``): span events."""
    shed: str | None = None
    """Why the call got no upstream attempt: ``breaker_open``, ``queue_full``, ..."""
    slot_owner: str | None = None
    """Whose slot of the upstream's concurrency limit the call holds (``admission``)."""
    probing: bool = False
    """The call is its upstream's half-open breaker's probe."""
    queued_seconds: float | None = None
    """How long the call waited for a slot of the upstream's limit (None: it did not wait)."""
    fallback_from: str | None = None
    """The upstream whose open breaker sent this call to ``upstream``, its fallback."""
    """The request's spans, when tracing is on."""

    # -- facts derived from the above, computed here only (steps and telemetry read them) --
    @property
    def final_status(self) -> int:
        """The status the client got: 499 when it went away before an answer, 503 when a
        stop cut the call before one, 502 when no answer could be made (the upstream failed
        before one began)."""
        return self.status or _UNANSWERED.get(self.outcome, 502)

    def client_gone(self) -> bool:
        """The client's connection is closed or closing: nothing more is worth doing for it."""
        transport = self.request.transport
        return transport is None or transport.is_closing()

    @property
    def cut(self) -> bool:
        """The exchange ended mid-way: the upstream broke its stream, the client left, or a
        stop's drain deadline cut it."""
        return self.outcome in _CUT

    @property
    def decision_label(self) -> str:
        """What the gateway did with the call: allowed, compacted, rejected (none: not an
        LLM call)."""
        if self.rejection is not None:
            return "rejected"
        if self.compaction is not None and self.compaction.items is not None:
            return "compacted"
        return "allowed" if self.decision is not None else "none"

    @property
    def helper_call(self) -> bool:
        """An agent's own side call (a title, its compaction, a review): it carries no tools,
        so it is not a loop turn. ``x-openai-subagent`` alone is only a claim: a call with
        tools is checked."""
        return not (self.facts and self.facts.tools)


_CUT = frozenset({"upstream_cut", "client_gone", "drain_cut"})
_UNANSWERED = {"client_gone": 499, "drain_cut": 503}
