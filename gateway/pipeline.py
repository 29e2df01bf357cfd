"""The path of one request through the gateway, step by step.

``handle`` is the table of contents for LLM calls: each step is a function in the module that
holds its concern, sharing one ``Exchange``. A step that answers early raises a
``GatewayError``, which is answered in the provider's own error shape.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from multidict import CIMultiDict

from gateway import accounting
from gateway.appkeys import HTTP, SETTINGS, STORE, TOKENS, UPSTREAMS
from gateway.dialects import ANTHROPIC_MESSAGES, OPENAI_CHAT, ROUTES, Dialect
from gateway.errors import BadRequest, BodyTooLarge, GatewayError, LimitReached
from gateway.exchange import Exchange
from gateway.identity import identify
from gateway.relay import relay
from gateway.store import LimitExceeded, Limits
from gateway.upstream import request_headers, send

log = logging.getLogger("gateway.pipeline")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SESSION_PREFIX = "/s/{gateway_session}"


async def handle(ex: Exchange) -> web.StreamResponse:
    """An LLM call: read, identify, begin the turn, forward, relay, account."""
    store, tokens = ex.request.app[STORE], ex.request.app[TOKENS]
    try:
        await read_request(ex)
        identify_session(ex)
        await begin_turn(ex)
        await forward(ex)
    except GatewayError as error:
        answer_error(ex, error)
    finally:
        await accounting.end_turn(ex, store, tokens)
    assert ex.response is not None
    return ex.response


async def handle_aux(ex: Exchange) -> web.StreamResponse:
    """A call that belongs to a session but is not a turn (``count_tokens``)."""
    try:
        await read_request(ex, strict=False)
        identify_session(ex)
        await ex.request.app[STORE].record_aux(accounting.turn_start(ex))
        await forward(ex)
    except GatewayError as error:
        answer_error(ex, error)
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
    assert ex.response is not None
    return ex.response


# -- steps -------------------------------------------------------------------------------------
async def read_body(ex: Exchange) -> None:
    try:
        ex.raw = await ex.request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        limit = ex.request.app[SETTINGS].max_body_bytes
        raise BodyTooLarge(
            f"Request body exceeds the gateway's limit of {limit} bytes"
            " (setting max_body_bytes in the gateway's config file)."
        ) from exc


async def read_request(ex: Exchange, strict: bool = True) -> None:
    """Read and parse the body, and let the dialect pick out the facts the gateway needs."""
    await read_body(ex)
    assert ex.dialect is not None
    try:
        body = orjson.loads(ex.raw)
    except orjson.JSONDecodeError as exc:
        if not strict:
            ex.upstream_body = ex.raw
            return
        raise BadRequest(f"The request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        if not strict:
            ex.upstream_body = ex.raw
            return
        raise BadRequest("The request body must be a JSON object.")
    ex.body = body
    ex.facts = ex.dialect.read_request(body)
    ex.upstream_body, ex.rewritten = ex.dialect.upstream_body(body, ex.raw)


def identify_session(ex: Exchange) -> None:
    ex.identity = identify(ex.request.headers, ex.facts, ex.path_session)


async def begin_turn(ex: Exchange) -> None:
    try:
        await accounting.begin_turn(ex, ex.request.app[STORE], Limits())
    except LimitExceeded as exc:
        raise LimitReached(str(exc), rule=exc.limit) from exc


async def forward(ex: Exchange) -> None:
    app = ex.request.app
    settings = app[SETTINGS]
    headers = request_headers(ex.request.headers)
    url = ex.upstream.url(ex.path, ex.request.query_string)
    upstream = await send(app[HTTP], ex.request.method, url, headers, ex.upstream_body, settings)
    await relay(ex, upstream, gateway_headers(ex))


def gateway_headers(ex: Exchange) -> CIMultiDict[str]:
    """What the gateway tells the client about the call (its own headers only)."""
    extra: CIMultiDict[str] = CIMultiDict()
    if ex.identity is not None:
        extra["X-Gateway-Session-Id"] = ex.identity.session_id
    if ex.ticket is not None:
        extra["X-Gateway-Turn"] = str(ex.ticket.turn)
    return extra


def answer_error(ex: Exchange, error: GatewayError) -> None:
    ex.outcome = error.outcome
    if ex.response is not None and ex.response.prepared:
        return  # too late to change the status: the relay already cut the stream cleanly
    shape = ex.dialect or _ERRORS_BY_PROVIDER[ex.upstream.provider]
    answer = shape.error(error.kind, error.message, error.code)
    ex.status = error.status or answer.status
    headers = gateway_headers(ex)
    headers.update(error.headers)
    ex.response = web.json_response(answer.body, status=ex.status, headers=headers, dumps=_dumps)


def _dumps(value: object) -> str:
    return orjson.dumps(value).decode()


_ERRORS_BY_PROVIDER: dict[str, Dialect] = {
    "anthropic": ANTHROPIC_MESSAGES,
    "openai": OPENAI_CHAT,
}


# -- routes ------------------------------------------------------------------------------------
def _exchange(request: web.Request, dialect: Dialect | None) -> Exchange:
    upstreams = request.app[UPSTREAMS]
    path_session = request.match_info.get("gateway_session")
    path = request.path
    if path_session is not None:
        path = path[path.index("/v1/") :]
    if dialect is not None:
        upstream = upstreams.for_provider(dialect.provider)
    elif path.startswith("/v1/messages"):
        upstream = upstreams.anthropic
    else:
        upstream = upstreams.for_headers(request.headers)
    return Exchange(request, upstream, path, dialect, path_session)


def llm_handler(dialect: Dialect) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await handle(_exchange(request, dialect))

    return handler


async def count_tokens_handler(request: web.Request) -> web.StreamResponse:
    return await handle_aux(_exchange(request, ANTHROPIC_MESSAGES))


async def passthrough_handler(request: web.Request) -> web.StreamResponse:
    return await handle_passthrough(_exchange(request, None))


def add_routes(app: web.Application) -> None:
    for prefix in ("", SESSION_PREFIX):
        for path, dialect in ROUTES.items():
            app.router.add_post(prefix + path, llm_handler(dialect))
        app.router.add_post(prefix + "/v1/messages/count_tokens", count_tokens_handler)
        app.router.add_route("*", prefix + "/v1/{tail:.*}", passthrough_handler)
