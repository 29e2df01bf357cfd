"""The path of one request through the gateway, step by step.

``handle`` is the table of contents for LLM calls: each step is a function in the module that
holds its concern, sharing one ``Exchange``. A step that answers early raises a
``GatewayError``, which ``answered`` (the tail every handler shares) answers in the provider's
own error shape. The route table is at the end: ``dispatch`` picks the handler.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from urllib.parse import unquote

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict
from xxhash import xxh3_64_intdigest

from gateway.accounting import begin_turn, end_turn
from gateway.appkeys import (
    AUTH,
    COMPACTOR,
    DRAINING,
    HOSTS,
    HTTP,
    METRICS,
    POLICY,
    REQUEST_LOG,
    SETTINGS,
    STORE,
    TOKENS,
    TRACING,
    UPSTREAMS,
)
from gateway.auth.planes import add_route, listener_port
from gateway.auth.principal import PASSTHROUGH
from gateway.auth.step import (
    Authenticated,
    authenticate,
    check_open_path,
    gateway_not,
    key_notices,
    pool_choice,
)
from gateway.body import read_body as receive_body
from gateway.compaction.step import compact as compact_context
from gateway.credentials import credential
from gateway.dialects import ANTHROPIC_MESSAGES, OPENAI_CHAT, ROUTES, Dialect
from gateway.dialects.envelope import EnvelopeError
from gateway.errors import (
    BadRequest,
    BodyTimeout,
    ContextOverflow,
    CredentialInQuery,
    Forbidden,
    GatewayError,
    HostRefused,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PolicyRejection,
    Unauthenticated,
)
from gateway.exchange import Exchange
from gateway.identity import identify, own_session
from gateway.paths import COUNT_TOKENS, LLM_PATHS, PathRefused, provider_path
from gateway.policy.decide import passthrough_team
from gateway.policy.step import decide_policy
from gateway.redact import REDACTOR, claim
from gateway.relay import relay
from gateway.resilience.admission import admit
from gateway.telemetry import tracing
from gateway.telemetry.logs import log_request
from gateway.telemetry.observe import observe
from gateway.upstream import request_headers, send

log = logging.getLogger("gateway.pipeline")

SESSION_PREFIX = "/s/{gateway_session}"
Steps = Callable[[Exchange], Awaitable[None]]
"""A handler's steps, in order; ``answered`` runs them and answers what they raise."""


async def handle(ex: Exchange) -> None:
    """An LLM call, a turn of its session. Its steps, each in the module of its concern:

    1. ``read_request`` (here): the body, bounded and decoded (``body``), and the dialect's
       ``RequestFacts``.
    2. ``identify_session`` (here): the one credential, and the caller's own session
       (``credentials``, ``identity``), as the store has it at hand (``Store.current``).
    3. ``decide_policy`` (``policy/step.py``): the decision before anything is counted; loops
       noted, and a session paused if the policy says so.
    4. ``admit`` (``resilience/admission.py``): the upstream's breaker (or its fallback) and a
       slot of its concurrency limit; a call answered here (529/503, 429) is no turn.
    5. ``compact_context`` (``compaction/step.py``): near the model's window, the conversation
       rewritten.
    6. ``begin_turn`` (``accounting.py``): the store's atomic check of the counted limits, the
       turn recorded, warnings past ``warn_at``.
    7. ``forward`` (here): the upstream call (``upstream``: retried within the upstream's
       budget) and the answer relayed (``relay``).

    A step that refuses the call does it through ``policy.step.reject``. ``answered`` runs
    these steps, answers what they raise, and then, whatever happened, ends the turn
    (``accounting.end_turn``) and reports the request (metrics, log line).
    """
    await read_request(ex)
    await identify_session(ex)
    await decide_policy(ex)
    if (waiting := admit(ex)) is not None:  # a plain call unless the call must queue
        await waiting
    await compact_context(ex)
    await begin_turn(ex)
    await forward(ex)


async def handle_aux(ex: Exchange) -> None:
    """A call that belongs to a session but is not a turn (``count_tokens``)."""
    await read_request(ex, strict=False)
    await identify_session(ex)
    assert ex.identity is not None
    await ex.app[STORE].record_aux(ex.identity, time.time())
    if (waiting := admit(ex)) is not None:
        await waiting
    await forward(ex)


async def handle_passthrough(ex: Exchange) -> None:
    """Anything else under /v1 (models, files, embeddings, ...): forwarded untouched."""
    await read_body(ex)
    ex.upstream_body = ex.raw
    who = await authenticated(ex)  # keys mode: no call goes upstream unauthenticated
    ex.principal, ex.credential = who.principal, who.choice
    check_open_path(
        ex.app[AUTH], who.principal, ex.request.method, ex.path, ex.raw, ex.upstream.provider
    )
    if (waiting := admit(ex)) is not None:
        await waiting
    await forward(ex)


async def answered(
    ex: Exchange, steps: Steps, route: str, *, turn: bool = False
) -> web.StreamResponse:
    """The tail every handler shares: its ``steps`` run, and whatever they raise is answered
    here (a ``GatewayError`` in the provider's own shape, anything else as a 500). Then,
    whatever happened (cancelled too), a turn that began is ended (``accounting.end_turn``:
    its reservations freed, its usage counted) and the request is reported under ``route``."""
    app, labels = ex.app, (route,)
    in_flight = app[METRICS].in_flight
    if turn:  # an LLM call: its gauge while in flight
        in_flight.inc(labels)
    try:
        await steps(ex)
    except GatewayError as error:
        answer_error(ex, error)
    except Exception:
        failed(ex)
    except asyncio.CancelledError:
        # A stop cut the call at its drain deadline (``server.py``): ended below with what
        # was seen, as the stop's doing, not the upstream's.
        if app[DRAINING].is_set() and ex.outcome == "ok":
            ex.outcome = "drain_cut"
        raise
    finally:
        owner = ex.slot_owner
        if owner is not None:  # the slot ``admit`` took, back (here: it runs for every call)
            ex.upstream.limiter.release(owner)
            if ex.probing:
                ex.upstream.breaker.abandoned()  # no-op once the probe's answer moved it
        if turn:
            await end_turn(ex, app[STORE], app[TOKENS], app[COMPACTOR].calibration)
            in_flight.dec(labels)
        report(ex, route)
    assert ex.response is not None
    return ex.response


def llm_call(ex: Exchange) -> Awaitable[web.StreamResponse]:
    """``handle``, answered: what the route runs inside its SERVER span. A plain function that
    hands back ``answered``'s coroutine, so it costs no frame of its own."""
    assert ex.dialect is not None
    return answered(ex, handle, ex.dialect.name, turn=True)


def aux_call(ex: Exchange) -> Awaitable[web.StreamResponse]:
    """``handle_aux``, answered (as ``llm_call``)."""
    return answered(ex, handle_aux, "anthropic.count_tokens")


# -- steps -------------------------------------------------------------------------------------
def report(ex: Exchange, route: str) -> None:
    """The finished request's metrics and its log line, tied to its trace."""
    trace = tracing.trace_id(ex)
    observe(ex.app[METRICS], ex, route, trace)
    log_request(ex.app[REQUEST_LOG], ex, route, trace)


async def read_body(ex: Exchange) -> None:
    """The body, bounded in time and size and decoded (``body``)."""
    settings = ex.app[SETTINGS]
    ex.raw = await receive_body(ex.request, settings.max_body_bytes, settings.timeouts.client_body)


async def read_request(ex: Exchange, strict: bool = True) -> None:
    """Read and parse the body, and let the dialect pick out the facts the gateway needs."""
    await read_body(ex)
    assert ex.dialect is not None
    try:
        body = ex.dialect.decode(ex.raw)
    except EnvelopeError as exc:
        if not strict:
            ex.upstream_body = ex.raw
            return
        raise BadRequest(f"The request body is not valid JSON for this API: {exc}") from exc
    ex.body = body
    ex.body_hash = xxh3_64_intdigest(ex.raw)
    facts = ex.facts = ex.dialect.read_request(body)
    if facts.model:  # a label, a stored figure, a policy match: never a secret in it
        facts.model = claim(facts.model)
    ex.upstream_body, ex.rewritten = ex.dialect.upstream_body(body, ex.raw)


async def identify_session(ex: Exchange) -> None:
    """Whose call (``auth.step``: the credential's principal, and the one credential that
    goes upstream) and which of its sessions: an id another principal started is the caller's
    own under a qualified id (``identity``)."""
    headers = ex.request.headers
    app = ex.app
    who = await authenticated(ex)
    principal = ex.principal = who.principal
    ex.credential = who.choice
    if principal.kind == PASSTHROUGH:
        proxies = app[SETTINGS].trusted_proxies
        peer = ex.request.remote if proxies else None  # only a trusted proxy's peer matters
        team = passthrough_team(app[POLICY].policy, principal.owner, headers, peer, proxies)
    else:
        team = principal.team
    identity = identify(headers, ex.facts, ex.path_session, who.credential, team, principal.id)
    current = app[STORE].current  # Redis: this replica's copy, checked when the turn begins
    record = await current(identity.session_id)
    if record is not None and record.key_hash != identity.key_hash:
        identity, record = await own_session(identity, current)
    ex.identity, ex.record = identity, record


async def authenticated(ex: Exchange) -> Authenticated:
    """``authenticate``, counted by method and outcome (``gateway_auth_attempts``)."""
    attempts = ex.app[METRICS].auth_attempts
    started = time.time_ns() if ex.trace is not None else 0
    try:
        who = await authenticate(ex, ex.app[AUTH])
    except (Unauthenticated, Forbidden) as refused:
        attempts.inc(("llm", refused.method, refused.reason))
        if started:
            tracing.auth_span(ex, started, refused.method, refused.reason)
        raise
    attempts.inc(("llm", who.method, who.outcome))
    if started:
        ex.principal = who.principal
        tracing.auth_span(ex, started, who.method, who.outcome)
    return who


async def forward(ex: Exchange) -> None:
    """The call upstream (``upstream.send``: pooled, retried within the upstream's budget)
    inside its CLIENT span, and its answer relayed to the client (``relay``). With a pool
    credential, an upstream 401 or 403 moves the pool to its next entry and the call is made
    again with it, while nothing has reached the client."""
    app = ex.app
    upstream = ex.upstream
    choice = ex.credential
    if choice is not None:  # the gateway's own credential, no client one
        if choice.upstream != upstream.name:  # a fallback's: its own pool
            assert ex.principal is not None
            choice = ex.credential = pool_choice(
                app[AUTH], upstream.name, ex.principal, upstream.provider
            )
        headers = request_headers(ex.request.headers, choice.headers(), strip_credentials=True)
    else:
        if ex.identity is not None:
            drop = ex.identity.drop_header
        else:  # passthrough: the credential of the upstream it goes to
            drop = credential(ex.request.headers, upstream.provider).drop
        headers = request_headers(ex.request.headers, drop=drop)
    url = upstream.url(ex.path, ex.request.rel_url.raw_query_string)
    ex.upstream_at = time.perf_counter()
    with tracing.upstream_call(ex, url, headers):
        response = await send(
            app[HTTP],
            ex.request.method,
            url,
            headers,
            ex.upstream_body,
            app[SETTINGS].timeouts,
            upstream,
            ex,
            ex.facts is not None and ex.facts.stream,
        )
        if response.status == 401 and ex.credential is not None:
            response = await _next_credential(ex, response, headers, url)
        await relay(ex, response, gateway_headers(ex))
    if ex.outcome == "upstream_cut":
        upstream.breaker.failure("cut")


async def _next_credential(
    ex: Exchange, response: aiohttp.ClientResponse, headers: CIMultiDict[str], url: str
) -> aiohttp.ClientResponse:
    """The upstream refused the pool's credential (401: the key itself; a 403 may be the
    request's own doing, a model the account lacks, and moves nothing): the pool moves on
    (counted, logged, audited by ``pools``), and while it has another entry the call goes
    again with it."""
    app, upstream = ex.app, ex.upstream
    pools = app[AUTH].pools
    assert pools is not None
    tried = 0
    while (
        response.status == 401
        and (used := ex.credential) is not None
        and tried < MAX_CREDENTIAL_FAILOVERS
    ):
        choice = pools.failed(used.upstream, used.pool, used.entry, response.status)
        if choice is None:
            return response  # no entry left: the upstream's own answer, as it came
        response.release()
        for name, _value in used.headers():  # the refused entry's header goes, whatever it is
            headers.popall(name, None)
        for name, value in choice.headers():
            headers[name] = value
        ex.credential = choice
        tried += 1
        response = await send(
            app[HTTP], ex.request.method, url, headers, ex.upstream_body,
            app[SETTINGS].timeouts, upstream, ex, ex.facts is not None and ex.facts.stream,
        )  # fmt: skip
    return response


MAX_CREDENTIAL_FAILOVERS = 4
"""Entries a call tries after the first is refused: a pool of dead entries answers fast."""


def gateway_headers(ex: Exchange) -> CIMultiDict[str]:
    """What the gateway tells the client about the call (its own headers only)."""
    extra: CIMultiDict[str] = CIMultiDict()
    extra["X-Gateway-Upstream"] = ex.upstream.name
    if ex.identity is not None:
        extra["X-Gateway-Session-Id"] = ex.identity.session_id
    principal = ex.principal
    if principal is not None and principal.kind != PASSTHROUGH:
        key_notices(principal, extra)
    if ex.decision is not None:
        effective = ex.decision.effective
        rules = ",".join(effective.rules) or "defaults"
        extra["X-Gateway-Policy"] = f"{effective.version}; rules={rules}"
        for warning in ex.decision.warnings:
            extra.add("X-Gateway-Warning", warning)
    if ex.compaction is not None:
        extra["X-Gateway-Compacted"] = ex.compaction.header()
    if ex.ticket is not None:
        extra["X-Gateway-Turn"] = str(ex.ticket.turn)
        if ex.ticket.turns_left is not None:
            extra["X-Gateway-Turns-Remaining"] = str(ex.ticket.turns_left)
        if ex.ticket.tokens_left is not None:
            extra["X-Gateway-Tokens-Remaining"] = str(ex.ticket.tokens_left)
    return extra


def answer_error(ex: Exchange, error: GatewayError) -> None:
    ex.outcome = error.outcome
    if isinstance(error, PolicyRejection | ContextOverflow):
        ex.rejection = (error.headers["X-Gateway-Policy-Limit"], error.rule)
    if ex.response is not None and ex.response.prepared:
        return  # too late to change the status: the relay already cut the stream cleanly
    shape = ex.dialect or _ERRORS_BY_PROVIDER[ex.upstream.provider]
    message = error.message
    if not isinstance(error, ContextOverflow):  # the provider's own words, so agents compact
        message = _ours(message, ex.upstream.provider)
    answer = shape.error(error.kind, REDACTOR.redact(message, "error"), error.code)
    ex.status = error.status or answer.status
    headers = gateway_headers(ex)
    headers.update(error.headers)
    headers["X-Gateway-Error"] = error.code or error.outcome
    request_id = headers["X-Request-Id"] = "gwreq_" + secrets.token_hex(12)
    if shape.provider == "anthropic":
        headers["request-id"] = request_id
    if error.in_stream and ex.facts is not None and ex.facts.stream:
        events = shape.stream_failure(answer)
        if events is not None:
            headers["Content-Type"] = "text/event-stream"
            ex.status = 200
            ex.response = web.Response(body=events, status=200, headers=headers)
            return
    ex.response = web.json_response(answer.body, status=ex.status, headers=headers, dumps=_dumps)
    if isinstance(error, BodyTimeout):
        ex.response.force_close()  # the rest of a slow body must not be read as a request


def _ours(message: str, provider: str) -> str:
    """The message as the gateway's own: "gateway (not Anthropic): ..." (Claude Code shows a
    401 after "Failed to authenticate": the reader must see who refused)."""
    if message.startswith("gateway"):
        return message
    return f"{gateway_not(provider)}: {message}"


def failed(ex: Exchange) -> None:
    """A bug in the gateway: a provider-shaped 500 and a traceback in the log, never a crash
    or a bare aiohttp error page."""
    log.exception("unexpected error on %s %s", ex.request.method, ex.request.path)
    answer_error(ex, InternalError("The gateway failed on this request."))


def _dumps(value: object) -> str:
    return orjson.dumps(value).decode()


_ERRORS_BY_PROVIDER: dict[str, Dialect] = {
    "anthropic": ANTHROPIC_MESSAGES,
    "openai": OPENAI_CHAT,
}


# -- routes ------------------------------------------------------------------------------------
async def dispatch(request: web.Request) -> web.StreamResponse:
    """Every call below ``/v1`` (and ``/s/<session>/v1``): its one checked path picks the
    handler and is the path sent upstream (``paths``), so no spelling reaches the provider's
    LLM endpoints around the policy."""
    try:
        where = provider_path(request.rel_url.raw_path)
    except PathRefused as exc:
        ex = _exchange(request, None, request.path[:_LOGGED_PATH])
        return refuse(ex, BadRequest(f"The request path is refused: {exc}."), "passthrough")
    path = where.path
    dialect = ROUTES.get(path)
    app = request.app
    if app[SETTINGS].admin_host is not None and listener_port(request) == app[SETTINGS].admin_port:
        ex = _exchange(request, dialect, path)  # the admin listener serves no model route
        return refuse(ex, NotFound(f"No such path: {path}"), "unknown")
    if (query := request.rel_url.raw_query_string) and _credential_in(query):
        ex = _exchange(request, dialect, path)
        return refuse(ex, CredentialInQuery(), dialect.name if dialect else "passthrough")
    if not app[HOSTS].allows(request.host):  # answered in the route's own shape
        ex = _exchange(request, dialect, path)
        return refuse(ex, HostRefused(request.host), dialect.name if dialect else "passthrough")
    if dialect is not None:
        ex = _exchange(request, dialect, path, where.session)
        if request.method != "POST":
            return refuse(ex, _post_only(request.method, path), dialect.name)
        # Tracing wraps the answered handler in the call's SERVER span (``Tracing.serve``; off,
        # it calls straight through): the steps themselves are ``handle``'s.
        return await ex.app[TRACING].serve(ex, llm_call)
    if path == COUNT_TOKENS:
        ex = _exchange(request, ANTHROPIC_MESSAGES, path, where.session)
        if request.method != "POST":
            return refuse(ex, _post_only(request.method, path), "anthropic.count_tokens")
        return await ex.app[TRACING].serve(ex, aux_call, "count_tokens")  # as above: handle_aux
    # No SERVER span: not an LLM call, and nothing here is read or decided.
    ex = _exchange(request, None, path, where.session)
    return await answered(ex, handle_passthrough, "passthrough")


QUERY_CREDENTIALS = frozenset({"api_key", "api-key", "apikey", "key", "access_token", "token",
                               "auth", "authorization", "x-api-key", "bearer", "password",
                               "secret", "client_secret", "x-gateway-key"})  # fmt: skip
"""Query parameters that carry a credential: refused, since a URL ends up in proxy logs,
browser history and span attributes. Credentials go in headers."""


def _credential_in(query: str) -> bool:
    names = (part.partition("=")[0] for part in query.split("&"))
    return any(unquote(name).strip().lower() in QUERY_CREDENTIALS for name in names)


def refuse(ex: Exchange, error: GatewayError, route: str) -> web.StreamResponse:
    """A request answered before any step ran (its path or method), counted and logged."""
    answer_error(ex, error)
    report(ex, route)
    assert ex.response is not None
    return ex.response


_LOGGED_PATH = 256
"""A refused path is logged and answered only this far (the parser allows 32 KB)."""


def _post_only(method: str, path: str) -> GatewayError:
    return MethodNotAllowed(f"{method} is not allowed on {path}: this API takes POST.")


def _exchange(
    request: web.Request, dialect: Dialect | None, path: str, session: str | None = None
) -> Exchange:
    app = request.app
    upstreams = app[UPSTREAMS]
    if dialect is not None:
        upstream = upstreams.for_provider(dialect.provider)
    elif path.startswith("/v1/messages"):
        upstream = upstreams.anthropic
    else:
        upstream = upstreams.for_headers(request.headers)
    return Exchange(request, app, upstream, path, dialect, session)


async def not_found(request: web.Request) -> web.StreamResponse:
    """Any path outside ``/v1``, ``/gateway`` and ``/metrics``: a JSON 404 both SDKs read."""
    path = request.path[:_LOGGED_PATH]
    return refuse(_exchange(request, None, path), NotFound(f"No such path: {path}"), "unknown")


def add_routes(app: web.Application) -> None:
    """The route table. Every path below ``/v1`` goes to ``dispatch``, which checks the raw
    path itself and picks the handler: an LLM call runs ``llm_call`` (``handle``'s steps in
    ``answered``) inside its SERVER span, ``Tracing.serve`` being the only wrapper between
    the route and the pipeline; ``count_tokens`` likewise (``aux_call``); anything else
    ``handle_passthrough``."""
    # The LLM paths as plain routes first: aiohttp finds those by a dictionary lookup, before
    # trying the patterns.
    for path in sorted(LLM_PATHS):
        add_route(app, "*", path, dispatch, plane="llm", scope="llm")
    for prefix in ("/v1/", SESSION_PREFIX + "/v1/"):
        add_route(app, "*", prefix + "{tail:.*}", dispatch, plane="llm", scope="llm")
    add_route(app, "*", "/{tail:.*}", not_found, plane="llm", scope="none")
