"""Cross-cutting concerns only: the admin token, and unexpected errors answered in shape."""

from __future__ import annotations

import hmac
import logging

from aiohttp import web

from gateway.appkeys import SETTINGS, UPSTREAMS
from gateway.dialects import ANTHROPIC_MESSAGES, OPENAI_CHAT, ErrorKind
from gateway.pipeline import Handler

log = logging.getLogger("gateway")

_OPEN_ADMIN_PATHS = frozenset({"/gateway/health"})


@web.middleware
async def admin_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With ``GATEWAY_ADMIN_TOKEN`` set, ``/gateway/*`` (but health) needs it as a bearer."""
    token = request.app[SETTINGS].admin_token
    if (
        token is not None
        and request.path.startswith("/gateway/")
        and request.path not in _OPEN_ADMIN_PATHS
    ):
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
            return web.json_response({"error": "admin token required"}, status=401)
    return await handler(request)


@web.middleware
async def unexpected_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A bug in the gateway answers 500 in the provider's shape, never a bare traceback."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        upstream = request.app[UPSTREAMS].for_headers(request.headers)
        shape = ANTHROPIC_MESSAGES if upstream.provider == "anthropic" else OPENAI_CHAT
        answer = shape.error(ErrorKind.INTERNAL, "The gateway failed on this request.")
        return web.json_response(answer.body, status=answer.status)
