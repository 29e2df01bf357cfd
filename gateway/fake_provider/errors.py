"""Error bodies exactly as each provider family sends them.

Hierarchy: ``FakeError`` is the one exception; handlers turn it into the body of the API's
flavor with ``error_response``:

- OpenAI: ``{"error": {"message", "type", "param", "code"}}``
- Anthropic: ``{"type": "error", "error": {"type", "message"}, "request_id": "req_…"}``

A status with no entry below takes ``server_error``/``api_error`` (5xx, e.g. 502, 503) or
``invalid_request_error`` (4xx) and the message ``HTTP <status>``.
"""

from __future__ import annotations

from typing import Literal

import orjson
from aiohttp import web

from .ids import new_id

Flavor = Literal["openai", "anthropic"]

# status -> (type, code, message) of OpenAI's real answers
_OPENAI: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: (
        "invalid_request_error",
        "unsupported_country_region_territory",
        "Country, region, or territory not supported",
    ),
    404: (
        "invalid_request_error",
        "model_not_found",
        "The model does not exist or you do not have access to it.",
    ),
    429: (
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for requests per min (RPM): Limit 500, Used 500, Requested 1. "
        "Please try again in 1s.",
    ),
    500: (
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The server is overloaded or not ready yet."),
}

# status -> (type, message) of Anthropic's real answers
_ANTHROPIC: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Your credit balance is too low to access the Anthropic API."),
    403: (
        "permission_error",
        "Your API key does not have permission to use the specified resource.",
    ),
    404: ("not_found_error", "The requested resource could not be found."),
    # Not in Anthropic's documented list (a proxy's answer); typed like its 504.
    408: ("timeout_error", "Request timed out"),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: (
        "rate_limit_error",
        "This request would exceed the rate limit for your organization of 50 requests per "
        "minute. Please try again later.",
    ),
    500: ("api_error", "Internal server error"),
    504: ("timeout_error", "Request timed out"),
    529: ("overloaded_error", "Overloaded"),
}

RETRY_AFTER_SECONDS = "1"


class FakeError(Exception):
    """An answer the fake refuses with; fields left ``None`` take the status's real values."""

    def __init__(
        self,
        status: int,
        message: str | None = None,
        *,
        type_: str | None = None,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(message or f"HTTP {status}")
        self.status = status
        self.message = message
        self.type_ = type_
        self.param = param
        self.code = code
        self.retry_after = retry_after
        self.retry_after_ms = retry_after_ms


def invalid_request(
    message: str, *, param: str | None = None, code: str | None = None
) -> FakeError:
    """A 400 ``invalid_request_error`` (the type both families use for validation)."""
    return FakeError(400, message, type_="invalid_request_error", param=param, code=code)


def anthropic_prompt_too_long(tokens: int, window: int) -> FakeError:
    """Anthropic Messages' answer to a prompt over the model's context window."""
    return invalid_request(f"prompt is too long: {tokens} tokens > {window} maximum")


def chat_context_length_exceeded(tokens: int, window: int) -> FakeError:
    """Chat Completions' answer to messages over the model's context window."""
    return invalid_request(
        f"This model's maximum context length is {window} tokens. However, your messages "
        f"resulted in {tokens} tokens. Please reduce the length of the messages.",
        param="messages",
        code="context_length_exceeded",
    )


def responses_context_length_exceeded(tokens: int, window: int) -> FakeError:
    """Responses' answer to input over the context window (it names no numbers)."""
    return invalid_request(
        "Your input exceeds the context window of this model. Please adjust your input and "
        "try again.",
        param="input",
        code="context_length_exceeded",
    )


def openai_body(error: FakeError) -> dict[str, object]:
    fallback = "server_error" if error.status >= 500 else "invalid_request_error"
    type_, code, message = _OPENAI.get(error.status, (fallback, None, f"HTTP {error.status}"))
    explicit = error.message is not None
    return {
        "error": {
            "message": error.message if explicit else message,
            "type": error.type_ or type_,
            "param": error.param,
            "code": error.code if explicit or error.type_ else code,
        }
    }


def anthropic_body(error: FakeError, request_id: str) -> dict[str, object]:
    fallback = "api_error" if error.status >= 500 else "invalid_request_error"
    type_, message = _ANTHROPIC.get(error.status, (fallback, f"HTTP {error.status}"))
    return {
        "type": "error",
        "error": {"type": error.type_ or type_, "message": error.message or message},
        "request_id": request_id,
    }


def error_response(error: FakeError, flavor: Flavor) -> web.Response:
    """The whole HTTP answer: status, JSON body, request id and retry hints.

    ``retry-after`` is the error's own when set, else one second for 429 and 529 (what the real
    APIs send); ``retry-after-ms`` (read by both official SDKs) only when the error sets it.
    """
    headers: dict[str, str] = {}
    if flavor == "anthropic":
        request_id = new_id("req_011C", 20)
        body = anthropic_body(error, request_id)
        headers["request-id"] = request_id
    else:
        body = openai_body(error)
        headers["x-request-id"] = new_id("req_", 32)
    if error.retry_after is not None:
        headers["retry-after"] = _seconds(error.retry_after)
    elif error.status in (429, 529):
        headers["retry-after"] = RETRY_AFTER_SECONDS
    if error.retry_after_ms is not None:
        headers["retry-after-ms"] = str(error.retry_after_ms)
    return web.Response(
        status=error.status,
        body=orjson.dumps(body),
        content_type="application/json",
        headers=headers,
    )


def _seconds(value: float) -> str:
    """HTTP's delta-seconds is an integer; a fractional value is kept (the SDKs parse floats)."""
    return str(int(value)) if float(value).is_integer() else str(value)


UNKNOWN_MODEL_PREFIX = "no-such-"
"""Model ids the fake does not serve (the real APIs answer 404 for a model they lack)."""


def unknown_model(model: str, flavor: Flavor) -> FakeError:
    if flavor == "anthropic":
        return FakeError(404, f"model: {model}", type_="not_found_error")
    return FakeError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        type_="invalid_request_error",
        code="model_not_found",
    )
