"""The path of one request through the gateway, step by step.

``handle`` is the table of contents for LLM calls: each step is a function in the module that
holds its concern, sharing one ``Exchange``. A step that answers early raises a
``GatewayError``, which is answered in the provider's own error shape.
"""

from __future__ import annotations

import logging
import time
from typing import NoReturn

import orjson
from aiohttp import web
from multidict import CIMultiDict
from xxhash import xxh3_64_intdigest

from gateway import accounting
from gateway.appkeys import (
    COMPACTOR,
    HTTP,
    METRICS,
    POLICY,
    SETTINGS,
    STORE,
    TOKENS,
    TRACING,
    UPSTREAMS,
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
    GatewayError,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PolicyRejection,
)
from gateway.exchange import Exchange
from gateway.identity import identify, own_session, qualified
from gateway.paths import COUNT_TOKENS, LLM_PATHS, PathRefused, provider_path
from gateway.policy import decide
from gateway.relay import relay
from gateway.store import LimitExceeded
from gateway.telemetry import tracing
from gateway.telemetry.logs import log_request
from gateway.telemetry.metrics import observe
from gateway.upstream import request_headers, send

log = logging.getLogger("gateway.pipeline")

SESSION_PREFIX = "/s/{gateway_session}"


async def handle(ex: Exchange) -> web.StreamResponse:
    """An LLM call: read, identify, decide, begin the turn, forward, relay, account."""
    app = ex.app
    store, tokens, calibration = app[STORE], app[TOKENS], app[COMPACTOR].calibration
    metrics = app[METRICS]
    assert ex.dialect is not None
    in_flight = metrics.in_flight
    in_flight.inc((ex.dialect.name,))
    try:
        await read_request(ex)
        await identify_session(ex)
        await decide_policy(ex)
        await compact_context(ex)
        await begin_turn(ex)
        await forward(ex)
    except GatewayError as error:
        answer_error(ex, error)
    except Exception:
        failed(ex)
    finally:
        await accounting.end_turn(ex, store, tokens, calibration)
        in_flight.dec((ex.dialect.name,))
        report(ex, ex.dialect.name)
    assert ex.response is not None
    return ex.response


async def handle_aux(ex: Exchange) -> web.StreamResponse:
    """A call that belongs to a session but is not a turn (``count_tokens``)."""
    try:
        await read_request(ex, strict=False)
        await identify_session(ex)
        await ex.app[STORE].record_aux(accounting.turn_start(ex))
        await forward(ex)
    except GatewayError as error:
        answer_error(ex, error)
    except Exception:
        failed(ex)
    report(ex, "anthropic.count_tokens")
    assert ex.response is not None
    return ex.response


async def handle_passthrough(ex: Exchange) -> web.StreamResponse:
    """Anything else under /v1 (models, files, embeddings, ...): forwarded untouched."""
    try:
        await read_body(ex)
        ex.upstream_body = ex.raw
        await forward(ex)
    except GatewayError as error:
        answer_error(ex, error)
    except Exception:
        failed(ex)
    report(ex, "passthrough")
    assert ex.response is not None
    return ex.response


# -- steps -------------------------------------------------------------------------------------
def report(ex: Exchange, route: str) -> None:
    """The finished request's metrics and its log line, tied to its trace."""
    trace = tracing.trace_id(ex)
    observe(ex.app[METRICS], ex, route, trace)
    log_request(ex, route, trace)


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
    ex.facts = ex.dialect.read_request(body)
    ex.upstream_body, ex.rewritten = ex.dialect.upstream_body(body, ex.raw)


async def identify_session(ex: Exchange) -> None:
    """Whose call (the one credential that goes upstream) and which of its sessions: an id
    another key started is the caller's own under a qualified id (``identity``)."""
    headers = ex.request.headers
    who = credential(headers, ex.upstream.provider)
    identity = identify(headers, ex.facts, ex.path_session, who)
    get = ex.app[STORE].get
    record = await get(identity.session_id)
    if record is not None and record.key_hash != identity.key_hash:
        identity, record = await own_session(identity, get)
    ex.identity, ex.record = identity, record


async def decide_policy(ex: Exchange) -> None:
    """The policy's verdict before anything is counted: size, model, loops."""
    assert ex.identity is not None and ex.facts is not None and ex.dialect is not None
    app, session = ex.app, ex.identity.session_id
    policy = app[POLICY].policy
    proxies = app[SETTINGS].trusted_proxies
    who = decide.caller(
        policy,
        ex.identity,
        ex.facts.model,
        ex.request.headers,
        ex.request.remote if proxies else None,  # only a trusted proxy's peer matters
        proxies,
    )
    ex.team = who.team
    record = ex.record
    try:
        ex.decision = decide.decide(
            policy,
            who,
            ex.identity,
            ex.dialect,
            ex.facts,
            len(ex.raw),
            record,
            app[TOKENS],
            ex.helper_call,
            time.time(),
            ex.body_hash,
        )
    except decide.PolicyStop as stop:
        await reject(ex, stop.verdict)
    if ex.decision.detections:
        for detection in ex.decision.detections:
            event = {
                "key": f"{detection.detector}:{detection.tool}",
                "at": time.time(),
                **detection.evidence(),
            }
            await app[STORE].note(accounting.turn_start(ex), "detections", event)
        verdict = decide.loop_verdict(ex.decision, session, record)
        if verdict is not None:
            if ex.decision.effective.settings.loops.action == "pause":
                detection = ex.decision.detections[0]
                reason = f"paused by the loop rule: {detection.describe()}"
                await app[STORE].set_status(session, "paused", reason)
            await reject(ex, verdict)


async def begin_turn(ex: Exchange) -> None:
    """The store's atomic check of the counted limits, and the turn recorded."""
    assert ex.identity is not None and ex.decision is not None
    store = ex.app[STORE]
    try:
        await accounting.begin_turn(ex, store)
    except LimitExceeded as exc:
        await reject(
            ex,
            decide.limit_verdict(
                exc.limit,
                exc.allowed,
                exc.used,
                ex.identity.session_id,
                ex.decision.effective,
                exc.retry_after,
                exc.budget,
                exc.reason,
            ),
        )
    assert ex.ticket is not None
    if ex.ticket.session_id != ex.identity.session_id:
        ex.identity = qualified(ex.identity)  # another key started the id since it was looked up
    ex.turn = ex.ticket.turn
    ex.decision.warnings = decide.warnings(ex.decision, ex.ticket)
    if ex.decision.warnings:
        kinds = ",".join(w.split(" ", 1)[0] for w in ex.decision.warnings)
        event = {"key": kinds, "at": time.time(), "warnings": ex.decision.warnings}
        await store.note(accounting.turn_start(ex), "warnings", event)


async def reject(ex: Exchange, verdict: decide.Verdict) -> NoReturn:
    event = {"key": verdict.limit, "at": time.time(), "limit": verdict.limit, "rule": verdict.rule}
    await ex.app[STORE].note(accounting.turn_start(ex), "rejections", event, rejected=True)
    raise PolicyRejection(
        verdict.message, limit=verdict.limit, rule=verdict.rule, retry_after=verdict.retry_after
    )


async def forward(ex: Exchange) -> None:
    app = ex.app
    settings = app[SETTINGS]
    if ex.identity is not None:
        drop = ex.identity.drop_header
    else:  # passthrough: the credential of the upstream it goes to
        drop = credential(ex.request.headers, ex.upstream.provider).drop
    headers = request_headers(ex.request.headers, drop=drop)
    url = ex.upstream.url(ex.path, ex.request.rel_url.raw_query_string)
    ex.upstream_at = time.perf_counter()
    with tracing.upstream_call(ex, url, headers):
        upstream = await send(
            app[HTTP],
            ex.request.method,
            url,
            headers,
            ex.upstream_body,
            settings,
            app[METRICS].retried(ex.upstream.provider),
        )
        await relay(ex, upstream, gateway_headers(ex))


def gateway_headers(ex: Exchange) -> CIMultiDict[str]:
    """What the gateway tells the client about the call (its own headers only)."""
    extra: CIMultiDict[str] = CIMultiDict()
    if ex.identity is not None:
        extra["X-Gateway-Session-Id"] = ex.identity.session_id
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
    answer = shape.error(error.kind, error.message, error.code)
    ex.status = error.status or answer.status
    headers = gateway_headers(ex)
    headers.update(error.headers)
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
    if dialect is not None:
        ex = _exchange(request, dialect, path, where.session)
        if request.method != "POST":
            return refuse(ex, _post_only(request.method, path), dialect.name)
        return await ex.app[TRACING].serve(ex, handle)
    if path == COUNT_TOKENS:
        ex = _exchange(request, ANTHROPIC_MESSAGES, path, where.session)
        if request.method != "POST":
            return refuse(ex, _post_only(request.method, path), "anthropic.count_tokens")
        return await ex.app[TRACING].serve(ex, handle_aux, "count_tokens")
    return await handle_passthrough(_exchange(request, None, path, where.session))


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
    # The LLM paths as plain routes first: aiohttp finds those by a dictionary lookup, before
    # trying the patterns. All of them go to ``dispatch``, which checks the raw path itself.
    for path in sorted(LLM_PATHS):
        app.router.add_route("*", path, dispatch)
    for prefix in ("/v1/", SESSION_PREFIX + "/v1/"):
        app.router.add_route("*", prefix + "{tail:.*}", dispatch)
    app.router.add_route("*", "/{tail:.*}", not_found)
