"""The fake provider's web app: routes, the request path, ``create_app`` and ``serve``.

Every API request follows the same steps, in order: record it, apply the app's fault rules
(``faults.py``: an error, a reset, a delay, a hang, or a stream to cut), check the key, read the
``x-fake-scenario`` header, wait (``slow``), fail on purpose (``error``), parse the JSON once,
validate strictly, count the prompt against the context window, decide the ``Turn``, then
answer as JSON or as SSE.

Faults come before the key check so that an outage looks like one whatever the client sends,
and after recording so that tests still see every attempt that arrived. ``/_fake/faults`` is
the fault rules' control endpoint; it is not an API route and goes through none of the steps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import orjson
from aiohttp import web

from .api import JsonObject, ProviderApi, Turn
from .catalog import anthropic_models, embedding_inputs, embeddings, openai_models
from .chat import CHAT
from .config import FakeProviderConfig
from .errors import (
    UNKNOWN_MODEL_PREFIX,
    FakeError,
    Flavor,
    error_response,
    invalid_request,
    unknown_model,
)
from .faults import CONTROL_PATH, FAULTS, Faults, clear_faults, inject, set_faults, show_faults
from .ids import new_id
from .messages import MESSAGES, validate_count_tokens
from .messages import prompt_parts as anthropic_prompt_parts
from .responses import RESPONSES
from .scenario import HEADER, Scenario, ScenarioError, parse_scenario
from .streaming import send_events
from .usage import Usage, input_tokens, load_encoding, output_tokens

RECEIVED_LIMIT = 1000

_OPENAI_NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header "
    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with "
    "blank username) if you're accessing the API from your browser and are prompted for a "
    "username. You can obtain an API key from https://platform.openai.com/account/api-keys."
)
_OPENAI_BAD_JSON = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
    "your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was "
    "not valid JSON. If you have trouble figuring out how to fix this, please contact us through "
    "our help center at help.openai.com.)"
)
_ANTHROPIC_BAD_JSON = (
    "There was an error parsing the body of your request. Make sure it's valid JSON."
)


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """One request exactly as it reached the fake: path with query, headers, raw body."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


CONFIG: Final = web.AppKey("fake_provider_config", FakeProviderConfig)
RECEIVED: Final[web.AppKey[deque[ReceivedRequest]]] = web.AppKey("fake_provider_received")


# --- the steps every request goes through ---------------------------------------------------


async def _admit(request: web.Request, flavor: Flavor) -> tuple[bytes, Scenario]:
    """Record, apply the fault rules, authenticate, read the scenario, then apply ``slow`` and
    ``error``. A fault rule's ``cut_stream`` overrides the header's."""
    body = await request.read()
    if request.app[CONFIG].record:
        request.app[RECEIVED].append(
            ReceivedRequest(request.method, request.path_qs, dict(request.headers), body)
        )
    cut_after = await inject(request, lambda: _asks_for_stream(body))
    _authenticate(request.headers, flavor)
    try:
        scenario = parse_scenario(request.headers.getall(HEADER, []))
    except ScenarioError as exc:
        raise invalid_request(f"{HEADER}: {exc}") from exc
    if cut_after is not None:
        scenario = dataclasses.replace(scenario, cut_after=cut_after)
    if scenario.delay:
        await asyncio.sleep(scenario.delay)
    if scenario.error_status is not None:
        raise FakeError(scenario.error_status)
    if request.app[CONFIG].usage_mode == "tiktoken":
        await load_encoding()
    return body, scenario


def _asks_for_stream(body: bytes) -> bool:
    """Whether the body asks for a stream; parsed only when a ``cut_stream`` rule could apply."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(payload, dict) and payload.get("stream") is True


def _authenticate(headers: Mapping[str, str], flavor: Flavor) -> None:
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    if (scheme.lower() == "bearer" and token.strip()) or headers.get("x-api-key", "").strip():
        return
    if flavor == "anthropic":
        raise FakeError(401, "x-api-key header is required", type_="authentication_error")
    raise FakeError(401, _OPENAI_NO_KEY, type_="invalid_request_error")


def _parse(body: bytes, flavor: Flavor) -> JsonObject:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise invalid_request(
            _ANTHROPIC_BAD_JSON if flavor == "anthropic" else _OPENAI_BAD_JSON
        ) from exc
    if not isinstance(payload, dict):
        raise invalid_request(
            f"Invalid type for body: expected an object, but got {type(payload).__name__}."
        )
    return payload


def _prompt_tokens(
    payload: JsonObject, scenario: Scenario, config: FakeProviderConfig, api: ProviderApi
) -> int | None:
    """The input tokens to report (``None`` for ``no_usage``); refuses a prompt over the window.

    One count serves both, so the usage a test sees is the number the window was checked with.
    """
    window = config.context_window if scenario.context_window is None else scenario.context_window
    if scenario.no_usage and window is None:
        return None
    tokens = input_tokens(api.prompt_parts(payload), config.usage_mode, _factor(config, scenario))
    if window is not None and tokens > window:
        raise api.context_overflow(tokens, window)
    return None if scenario.no_usage else tokens


def _turn(
    payload: JsonObject, scenario: Scenario, config: FakeProviderConfig, prompt_tokens: int | None
) -> Turn:
    """Decide the answer: the scenario's or config's tool call, else the reply text."""
    tool_call = scenario.tool_call or config.tool_loop
    usage: Usage | None = None
    if prompt_tokens is not None:
        said = (
            tool_call.name + orjson.dumps(tool_call.arguments).decode()
            if tool_call
            else config.reply_text
        )
        usage = Usage(prompt_tokens, output_tokens(said, config.usage_mode))
    return Turn(
        body=payload,
        model=str(payload.get("model", "")),
        text=config.reply_text,
        tool_call=tool_call,
        usage=usage,
        created=int(time.time()),
    )


def _factor(config: FakeProviderConfig, scenario: Scenario) -> float:
    return config.token_factor if scenario.token_factor is None else scenario.token_factor


def _json(data: object, flavor: Flavor) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), content_type="application/json", headers=_request_id(flavor)
    )


def _request_id(flavor: Flavor) -> dict[str, str]:
    if flavor == "anthropic":
        return {"request-id": new_id("req_011C", 20)}
    return {"x-request-id": new_id("req_", 32)}


# --- handlers -------------------------------------------------------------------------------


async def _answer(request: web.Request, api: ProviderApi) -> web.StreamResponse:
    config = request.app[CONFIG]
    try:
        body, scenario = await _admit(request, api.flavor)
        payload = _parse(body, api.flavor)
        api.validate(payload, request.headers)
        model = payload.get("model")
        if isinstance(model, str) and model.startswith(UNKNOWN_MODEL_PREFIX):
            raise unknown_model(model, api.flavor)
        prompt_tokens = _prompt_tokens(payload, scenario, config, api)
        turn = _turn(payload, scenario, config, prompt_tokens)
    except FakeError as error:
        return error_response(error, api.flavor)
    if payload.get("stream") is not True:
        return _json(api.json_answer(turn), api.flavor)
    return await send_events(
        request,
        api.sse_events(turn),
        delay=config.chunk_delay,
        cut_after=scenario.cut_after,
        headers=_request_id(api.flavor),
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _answer(request, CHAT)


async def responses(request: web.Request) -> web.StreamResponse:
    return await _answer(request, RESPONSES)


async def messages(request: web.Request) -> web.StreamResponse:
    return await _answer(request, MESSAGES)


async def count_tokens(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    try:
        body, scenario = await _admit(request, "anthropic")
        payload = _parse(body, "anthropic")
        validate_count_tokens(payload, request.headers)
    except FakeError as error:
        return error_response(error, "anthropic")
    tokens = input_tokens(
        anthropic_prompt_parts(payload), config.usage_mode, _factor(config, scenario)
    )
    return _json({"input_tokens": tokens}, "anthropic")


async def models(request: web.Request) -> web.Response:
    flavor: Flavor = "anthropic" if "anthropic-version" in request.headers else "openai"
    try:
        await _admit(request, flavor)
    except FakeError as error:
        return error_response(error, flavor)
    return _json(anthropic_models() if flavor == "anthropic" else openai_models(), flavor)


async def create_embeddings(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    try:
        body, scenario = await _admit(request, "openai")
        payload = _parse(body, "openai")
        texts = embedding_inputs(payload)
        tokens = input_tokens([texts], config.usage_mode, _factor(config, scenario))
        answer = embeddings(payload, texts, tokens)
    except FakeError as error:
        return error_response(error, "openai")
    if scenario.no_usage:
        del answer["usage"]
    return _json(answer, "openai")


# --- wiring ---------------------------------------------------------------------------------


async def _warm_up(app: web.Application) -> None:
    """Load the tokenizer off the event loop before the first request needs it."""
    if app[CONFIG].usage_mode == "tiktoken":
        await load_encoding()


async def _release_held(app: web.Application) -> None:
    """Requests a ``hang`` holds would otherwise keep the server from stopping."""
    app[FAULTS].close()


def create_app(config: FakeProviderConfig | None = None) -> web.Application:
    """A fresh fake provider; ``app[CONFIG]``, ``app[RECEIVED]`` and ``app[FAULTS]`` are read
    per request."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[CONFIG] = config or FakeProviderConfig()
    app[RECEIVED] = deque(maxlen=RECEIVED_LIMIT)
    app[FAULTS] = Faults()
    app[FAULTS].add(*app[CONFIG].faults)
    app.on_startup.append(_warm_up)
    app.on_shutdown.append(_release_held)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/embeddings", create_embeddings)
    app.router.add_get(CONTROL_PATH, show_faults)
    app.router.add_post(CONTROL_PATH, set_faults)
    app.router.add_delete(CONTROL_PATH, clear_faults)
    return app


async def serve(host: str, port: int, config: FakeProviderConfig) -> None:
    """Run the fake provider on ``host:port`` until cancelled (no access log)."""
    runner = web.AppRunner(create_app(config), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
