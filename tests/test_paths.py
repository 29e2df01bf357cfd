"""One path decides routing and the upstream URL: no spelling walks around the policy or out
of the upstream's base path (``gateway.paths``)."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from gateway.app import create_app
from gateway.paths import LLM_PATHS, PathRefused, provider_path
from gateway.settings import Settings, UpstreamSettings
from gateway.upstream import Upstream
from tests.conftest import received

LLM_ROUTES = sorted(LLM_PATHS)


def spellings(route: str) -> list[str]:
    """Ways to write ``route`` that a normalising server reads as ``route``."""
    head, _, last = route.rpartition("/")
    inner = route.removeprefix("/v1/")
    nested = [f"/s/session/v1/{inner.replace('/', '%2F')}"] if "/" in inner else []
    return [
        *nested,
        f"{head}%2F{last}",
        f"{head}%2f{last}",
        f"{head}%5C{last}",
        f"/v1%2F{inner}",
        f"/v1/./{inner}",
        f"/v1/../v1/{inner}",
        f"/v1/x/../{inner}",
        f"/v1/%2e/{inner}",
        f"/v1/%2E%2E/v1/{inner}",
        f"/v1//{inner}",
        f"{route}/",
        f"{route}/.",
        f"{route};x=1",
        f"{head}/%{ord(last[0]):02x}{last[1:]}",
        route.upper(),
        f"/v1/{inner.capitalize()}",
        f"{route}%00",
        f"{route}%20",
        f"{route}%3Fx",
        f"{route}%23x",
        f"/s/session/v1/./{inner}",
        f"/s/%2e%2e/v1/{inner}",
        f"{route}.",
        f"{route}..",
        f"{head}%252F{last}",
        route.replace("i", "%C4%B1", 1) if "i" in route[4:] else f"{route}%2e",  # dotless i
        route.replace("s", "%C5%BF", 1) if "s" in route[4:] else f"{route}%2e",  # long s
        # full-width first letter (NFKC folds it to ASCII)
        "/v1/" + quote(chr(0xFF41 + ord(inner[0]) - ord("a"))) + inner[1:],
    ]


@pytest.mark.parametrize("route", LLM_ROUTES)
def test_every_spelling_of_a_route_is_refused(route: str) -> None:
    for spelling in spellings(route):
        with pytest.raises(PathRefused):
            provider_path(spelling)


@pytest.mark.parametrize("route", LLM_ROUTES)
def test_the_route_itself_is_accepted(route: str) -> None:
    assert provider_path(route).path == route
    session_path = provider_path(f"/s/my-session_1/{route.removeprefix('/')}")
    assert (session_path.path, session_path.session) == (route, "my-session_1")


def test_session_prefix_is_decoded() -> None:
    where = provider_path("/s/ab%C3%A9c/v1/chat/completions")
    assert (where.path, where.session) == ("/v1/chat/completions", "abéc")


@pytest.mark.parametrize(
    "raw",
    ["/v1/files/file-abc%C3%A9", "/v1/models/gpt-4o", "/v1/files/a.b", "/v1/models"],
)
def test_ordinary_paths_pass_as_sent(raw: str) -> None:
    assert provider_path(raw).path == raw


@pytest.mark.parametrize(
    "raw", ["/v1/x%zz", "/v1/x%4", "/v1/%ff", "/v1/a%5c", "/s//v1/models", "/s/x", "/v2/x"]
)
def test_malformed_paths_are_refused(raw: str) -> None:
    with pytest.raises(PathRefused):
        provider_path(raw)


_PIECES = [*"abcmsgeot./%2FfE5C3;\\~-_", "%2F", "%2E", "%25", "..", "%63", "%C3%A9", "messages"]
_SEGMENT = st.lists(st.sampled_from(_PIECES), max_size=6).map("".join)


@settings(max_examples=400, deadline=None)
@given(st.lists(_SEGMENT, min_size=1, max_size=6), st.sampled_from(["", "/s/x"]))
def test_an_accepted_path_stays_below_the_base_and_is_no_llm_route_in_disguise(
    segments: list[str], prefix: str
) -> None:
    raw = prefix + "/v1/" + "/".join(segments)
    try:
        where = provider_path(raw)
    except PathRefused:
        return
    base = "http://upstream.test/tenant-a/openai/v1"
    url = URL(Upstream.build("openai", UpstreamSettings(url=base)).url(where.path, ""))
    # However a server decodes and normalises it, the path stays below the base path...
    resolved = URL(str(url)).path  # yarl resolves dot segments and decodes, as servers do
    assert resolved.startswith("/tenant-a/openai/v1/")
    assert ".." not in resolved.split("/")
    # ...and it names an LLM route only when it is that route, spelled as the route.
    decoded = where.path.replace("%2F", "/").replace("%2f", "/").lower()
    if decoded in LLM_PATHS:
        assert where.path in LLM_PATHS


# -- through a running gateway ------------------------------------------------------------------
async def send_raw(server: TestServer, method: str, raw_path: str, body: bytes) -> tuple[int, Any]:
    """The request line exactly as given: no client library normalises it first."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    head = (
        f"{method} {raw_path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer sk-test\r\n"
        f"x-api-key: sk-test\r\nanthropic-version: 2023-06-01\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    payload = rest.partition(b"\r\n\r\n")[2]
    try:
        return int(status_line.split()[1]), orjson.loads(payload)
    except orjson.JSONDecodeError:  # empty, or a chunked answer passed through
        return int(status_line.split()[1]), None


BODY = orjson.dumps(
    {
        "model": "gpt-4o",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "hi"}],
        "input": "hi",
    }
)


@pytest.mark.parametrize("route", LLM_ROUTES)
async def test_no_spelling_reaches_the_provider(
    gateway: TestServer, fake_provider: TestServer, route: str
) -> None:
    for spelling in spellings(route):
        status, payload = await send_raw(gateway, "POST", spelling, BODY)
        # 404 for spellings that are not below /v1/ at all (/v1%2Fchat/...).
        assert status in (400, 404), spelling
        error = payload["error"]
        assert error["type"] in ("invalid_request_error", "not_found_error"), spelling
        assert "path" in error["message"]
    assert received(fake_provider) == []


async def test_the_real_route_still_works(gateway: TestServer, fake_provider: TestServer) -> None:
    status, payload = await send_raw(gateway, "POST", "/v1/chat/completions", BODY)
    assert status == 200, payload
    assert [r.path for r in received(fake_provider)] == ["/v1/chat/completions"]


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/messages", "/v1/responses"])
async def test_other_methods_on_an_llm_route_get_the_providers_405(
    gateway: TestServer, fake_provider: TestServer, route: str
) -> None:
    status, payload = await send_raw(gateway, "GET", route, b"")
    assert status == 405
    assert payload["error"]["type"] == "invalid_request_error"
    assert "POST" in payload["error"]["message"]
    assert received(fake_provider) == []


async def test_unknown_paths_get_a_json_404(gateway: TestServer) -> None:
    status, payload = await send_raw(gateway, "GET", "/nothing/here", b"")
    assert status == 404
    message = payload["error"]["message"]
    assert message.startswith("gateway (not ") and message.endswith("No such path: /nothing/here")


@pytest.fixture
async def recorder(aiohttp_server: Any) -> TestServer:
    """An upstream that answers any path and records it, as a multi-tenant server would."""

    async def record(request: web.Request) -> web.Response:
        request.app[SEEN].append(request.path)
        return web.json_response({"object": "list", "data": []})

    app = web.Application()
    app[SEEN] = []
    app.router.add_route("*", "/{tail:.*}", record)
    server: TestServer = await aiohttp_server(app)
    return server


SEEN = web.AppKey("seen", list[str])


async def test_a_path_cannot_climb_out_of_the_upstream_base(
    aiohttp_server: Any, recorder: TestServer
) -> None:
    openai_base = str(recorder.make_url("/tenant-a/openai/v1"))
    anthropic_base = str(recorder.make_url("/tenant-a/anthropic"))
    upstreams = dict(openai=openai_base, anthropic=anthropic_base)
    app = create_app(Settings(store="memory://", upstreams=upstreams))
    gateway = await aiohttp_server(app)
    for climb in (
        "/v1/../../../tenant-b/secret",
        "/v1/%2e%2e/%2e%2e/tenant-b/secret",
        "/v1/..%2F..%2Ftenant-b/secret",
        "/v1/models/..%5C..%5Ctenant-b",
    ):
        status, _ = await send_raw(gateway, "GET", climb, b"")
        assert status == 400, climb
    status, _ = await send_raw(gateway, "GET", "/v1/models?limit=%2F", b"")
    assert status == 200
    # (send_raw's headers say Anthropic: /v1/models goes to the Anthropic base.)
    assert recorder.app[SEEN] == ["/tenant-a/anthropic/v1/models"]


_PATH_PIECES = st.sampled_from(
    [
        "chat", "completions", "messages", "responses", "count_tokens", "models", "v1", "s",
        "x", ".", "..", "%2F", "%2f", "%5C", "%2E", "%2e%2e", "%00", "%20", "%3F", "%23",
        ";", "\\", "C", "%63", "%C3%A9", "%ZZ", "~", "-",
    ]
)  # fmt: skip
_FUZZ_PATH = st.lists(
    st.lists(_PATH_PIECES, min_size=0, max_size=3).map("".join), min_size=1, max_size=5
).map(lambda segments: "/" + "/".join(segments))


async def test_fuzzed_paths_never_5xx_and_never_skip_the_policy(
    gateway: TestServer, fake_provider: TestServer
) -> None:
    """Random spellings, sent as raw request lines through a running gateway: every answer
    is below 500, and whatever reached the provider was either an LLM route spelled as the
    route (and so went through the policy) or no LLM route in any spelling."""
    loop = asyncio.get_running_loop()
    sent: list[tuple[str, int]] = []

    @settings(max_examples=150, deadline=None)
    @given(_FUZZ_PATH, st.sampled_from(["", "/v1", "/s/sess/v1"]))
    def probe(path: str, prefix: str) -> None:
        raw = prefix + path
        future = asyncio.run_coroutine_threadsafe(send_raw(gateway, "POST", raw, BODY), loop)
        status, _ = future.result(timeout=20)
        assert status < 500, raw
        sent.append((raw, status))

    await asyncio.to_thread(probe)
    assert sent
    for request in received(fake_provider):
        path = request.path.split("?", 1)[0]
        folded = path.lower().replace("%2f", "/").replace("/./", "/")
        if any(route in folded for route in LLM_PATHS):
            assert path in LLM_PATHS, path
