"""Upstream faults injected with the fake provider's fault mode: retries, the retry budget,
the circuit breaker, fallback, and the concurrency limit's queue and shares."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import anthropic
import openai
import pytest
from aiohttp.test_utils import TestServer

from gateway.appkeys import METRICS, STORE, UPSTREAMS
from gateway.fake_provider import FAULTS, RECEIVED, Fault
from gateway.fake_provider import create_app as create_fake_app
from tests.conftest import ANTHROPIC_MODEL
from tests.harness import Gateway, MakeGateway, read_audit, session_headers, wait_until

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}
MESSAGES = {
    "model": ANTHROPIC_MODEL,
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "hi"}],
}
QUICK = {"backoff_base": 0.01, "backoff_max": 0.05}
ANTHROPIC_HEADERS = {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"}
OPENAI_HEADERS = {"Authorization": "Bearer sk-test-openai"}


def upstreams(fake: TestServer, **openai_settings: Any) -> dict[str, Any]:
    return {
        "openai": {"url": str(fake.make_url("/v1")), **openai_settings},
        "anthropic": {"url": str(fake.make_url("")).rstrip("/"), **openai_settings},
    }


async def gateway(make_gateway: MakeGateway, fake: TestServer, **upstream: Any) -> Gateway:
    upstream.setdefault("retry", QUICK)
    gw = await make_gateway(None, upstreams=upstreams(fake, **upstream))
    for each in gw.server.app[UPSTREAMS].by_name.values():
        # A few calls in a fresh gateway: the budget's reserve (one retry per 10 s) would
        # decide; these tests are about the retries themselves (the budget has its own).
        each.budget.reserve = 10.0
    return gw


async def with_backup(
    make_gateway: MakeGateway, fake: TestServer, aiohttp_server: Any, **primary: Any
) -> tuple[Gateway, TestServer]:
    """A gateway whose openai upstream (``primary`` settings) falls back to a second fake
    provider, ``backup``, renaming gpt-4o-mini to gpt-4o."""
    backup: TestServer = await aiohttp_server(create_fake_app())
    gw = await make_gateway(
        None,
        upstreams={
            "openai": {
                "url": str(fake.make_url("/v1")),
                **primary,
                "fallback": {"upstream": "backup", "models": {"gpt-4o-mini": "gpt-4o"}},
            },
            "anthropic": str(fake.make_url("")).rstrip("/"),
            "backup": {
                "url": str(backup.make_url("/v1")),
                "provider": "openai",
                "pass_client_credentials": True,
            },
        },
    )
    return gw, backup


def faults(gw: Gateway, *rules: Fault) -> None:
    gw.fake.app[FAULTS].replace(*rules)


def attempts(gw: Gateway) -> int:
    return len(gw.fake.app[RECEIVED])


async def chat(gw: Gateway, session: str, body: dict[str, Any] | None = None) -> Any:
    return await gw.post("/v1/chat/completions", body or CHAT, {**OPENAI_HEADERS,
                         **session_headers(session)})  # fmt: skip


def metric(gw: Gateway, name: str, **labels: str) -> float:
    value = gw.server.app[METRICS].registry.get_sample_value(name, labels)
    return value or 0.0


# -- retries ------------------------------------------------------------------------------------
@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
async def test_a_retryable_status_is_retried_then_succeeds(
    make_gateway: MakeGateway, fake_provider: TestServer, status: int
) -> None:
    gw = await gateway(make_gateway, fake_provider)
    faults(gw, Fault("status", status=status, count=2))
    result = await gw.openai.chat.completions.create(
        **CHAT, extra_headers=session_headers("retried")
    )  # type: ignore[call-overload]
    assert result.choices[0].message.content
    assert attempts(gw) == 3
    record = await gw.record("retried")
    assert record.upstream_retries == 2
    assert record.turns == 1  # retries are no turns
    reason = {429: "http_429", 408: "http_408"}.get(status, "http_5xx")
    labels = {"provider": "openai", "upstream": "openai", "reason": reason}
    assert metric(gw, "gateway_upstream_retries_total", **labels) == 2


async def test_anthropic_529_and_a_reset_are_retried(
    make_gateway: MakeGateway, fake_provider: TestServer
) -> None:
    gw = await gateway(make_gateway, fake_provider, retry={**QUICK, "attempts": 4})
    faults(gw, Fault("status", status=529, count=1), Fault("reset", count=2))
    message = await gw.anthropic.messages.create(**MESSAGES, extra_headers=session_headers("a529"))  # type: ignore[call-overload]
    assert message.content
    assert attempts(gw) == 4
    labels = {"provider": "anthropic", "upstream": "anthropic"}
    assert metric(gw, "gateway_upstream_retries_total", **labels, reason="http_529") == 1
    assert metric(gw, "gateway_upstream_retries_total", **labels, reason="reset") == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
async def test_other_client_errors_are_never_retried(
    make_gateway: MakeGateway, fake_provider: TestServer, status: int
) -> None:
    gw = await gateway(make_gateway, fake_provider)
    faults(gw, Fault("status", status=status, count=1))
    got, _headers, body = await chat(gw, "no-retry")
    assert got == status
    assert attempts(gw) == 1
    assert body["error"]  # the upstream's own answer, passed on


async def test_attempts_run_out_and_the_last_answer_is_passed_on(
    make_gateway: MakeGateway, fake_provider: TestServer
) -> None:
    gw = await gateway(make_gateway, fake_provider, retry={**QUICK, "attempts": 3})
    faults(gw, Fault("status", status=503))
    got, headers, _body = await chat(gw, "out")
    assert got == 503
    assert attempts(gw) == 3
    assert headers["X-Gateway-Upstream"] == "openai"


async def test_retry_after_is_honoured_when_it_fits_in_the_deadline(
    make_gateway: MakeGateway, fake_provider: TestServer
) -> None:
    gw = await gateway(make_gateway, fake_provider, retry={"backoff_base": 5, "backoff_max": 5})
    faults(gw, Fault("status", status=429, count=1, retry_after_ms=300))
    started = time.monotonic()
    got, _, _ = await chat(gw, "ra")
    waited = time.monotonic() - started
    assert got == 200
    assert 0.3 <= waited < 4  # the upstream's 300 ms, not the 5 s backoff


async def test_a_retry_after_past_the_deadline_passes_the_answer_on(
    make_gateway: MakeGateway, fake_provider: TestServer
) -> None:
    gw = await gateway(make_gateway, fake_provider)
    faults(gw, Fault("status", status=429, count=1, retry_after=3600))
    got, headers, _ = await chat(gw, "later")
    assert got == 429
    assert headers["Retry-After"] == "3600"
    assert attempts(gw) == 1


async def test_a_stream_cut_mid_way_is_not_retried_and_its_turn_is_estimated(
    make_gateway: MakeGateway, fake_provider: TestServer
) -> None:
    gw = await gateway(make_gateway, fake_provider)
    faults(gw, Fault("cut_stream", events=2, count=1))
    with pytest.raises(openai.APIError):
        stream = await gw.openai.chat.completions.create(
            **STREAM, extra_headers=session_headers("cut")
        )  # type: ignore[call-overload]
        async for _ in stream:
            pass
    assert attempts(gw) == 1
    record = await gw.record("cut")
    assert record.turns == 1
    assert record.estimated_turns == 1
    assert record.upstream_retries == 0


async def test_the_retry_budget_bounds_amplification_in_an_outage(
    make_gateway: MakeGateway, fake_provider: TestServer
) -> None:
    gw = await gateway(
        make_gateway,
        fake_provider,
        retry={**QUICK, "attempts": 5, "budget_ratio": 0.2},
        breaker={"enabled": False},
    )
    budget = gw.server.app[UPSTREAMS].openai.budget
    budget.reserve = 0.0  # the quiet-gateway reserve aside, the ratio alone
    faults(gw, Fault("status", status=500))
    calls = 50
    for i in range(calls):
        got, _, _ = await chat(gw, f"outage-{i}")
        assert got == 500
    assert attempts(gw) <= calls * 1.2 + 1
    assert metric(gw, "gateway_upstream_retry_budget_exhausted_total", upstream="openai") > 0


async def test_a_client_gone_is_not_retried(
    make_gateway: MakeGateway, fake_provider: TestServer
) -> None:
    gw = await gateway(
        make_gateway,
        fake_provider,
        retry={"backoff_base": 0.5, "backoff_max": 0.5, "attempts": 10},
        breaker={"enabled": False},
    )
    faults(gw, Fault("status", status=503))
    client = openai.AsyncOpenAI(
        base_url=gw.url("/v1"), api_key="sk-test-openai", max_retries=0, timeout=0.2
    )
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    await client.close()
    when_gone = attempts(gw)
    await asyncio.sleep(2.5)  # ten attempts' worth of backoff, had it gone on
    assert attempts(gw) <= when_gone + 1  # at most the retry already under way


# -- breaker ------------------------------------------------------------------------------------
async def test_the_breaker_opens_answers_at_once_half_opens_and_closes(
    make_gateway: MakeGateway, fake_provider: TestServer
) -> None:
    gw = await gateway(
        make_gateway,
        fake_provider,
        retry={**QUICK, "attempts": 1},
        breaker={"failures": 3, "open": 0.5},
    )
    faults(gw, Fault("status", status=529, count=3))
    for _ in range(3):
        got, _, _ = await gw.post("/v1/messages", MESSAGES, ANTHROPIC_HEADERS)
        assert got == 529
    breaker = gw.server.app[UPSTREAMS].anthropic.breaker
    assert breaker.state == "open"
    before = attempts(gw)
    started = time.monotonic()
    got, headers, body = await gw.post("/v1/messages", MESSAGES, ANTHROPIC_HEADERS)
    assert time.monotonic() - started < 0.5
    assert got == 529
    assert body["type"] == "error"
    assert body["error"]["type"] == "overloaded_error"
    assert "breaker" in body["error"]["message"]
    assert int(headers["Retry-After"]) >= 1
    assert attempts(gw) == before  # no upstream attempt
    assert headers["X-Gateway-Upstream"] == "anthropic"
    # The SDK reads it as the provider's overload.
    with pytest.raises(anthropic.InternalServerError) as raised:
        await gw.anthropic.messages.create(**MESSAGES)  # type: ignore[call-overload]
    assert raised.value.status_code == 529
    # OpenAI's shape for the same: a 503.
    gw.server.app[UPSTREAMS].openai.breaker.force("open", "test")
    got, _, body = await chat(gw, "o")
    assert got == 503
    assert body["error"]["type"] == "server_error"
    await asyncio.sleep(0.6)  # the open period ends: one probe, which succeeds
    got, _, _ = await gw.post("/v1/messages", MESSAGES, ANTHROPIC_HEADERS)
    assert got == 200
    assert breaker.state == "closed"
    assert (
        metric(gw, "gateway_shed_requests_total", upstream="anthropic", reason="breaker_open") == 2
    )
    await wait_until(lambda: len(read_audit(gw.audit_path)) >= 3)  # written on a thread
    audit = await gw.audit_events("breaker", lambda e: e.get("upstream") == "anthropic")
    assert [(e["old"], e["new"]) for e in audit] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    health = await gw.admin_get("/gateway/health")
    assert health["upstreams"]["anthropic"]["breaker"] == "closed"


async def test_a_429_does_not_open_the_breaker(
    make_gateway: MakeGateway, fake_provider: TestServer
) -> None:
    gw = await gateway(make_gateway, fake_provider, retry={"attempts": 1}, breaker={"failures": 2})
    faults(gw, Fault("status", status=429, count=5))
    for _ in range(5):
        assert (await chat(gw, "rate"))[0] == 429
    assert gw.server.app[UPSTREAMS].openai.breaker.state == "closed"


async def test_client_retries_during_an_outage_keep_upstream_attempts_below_one_each(
    make_gateway: MakeGateway, fake_provider: TestServer
) -> None:
    gw = await gateway(
        make_gateway,
        fake_provider,
        retry={**QUICK, "attempts": 3},
        breaker={"failures": 5, "open": 1},
    )
    faults(gw, Fault("status", status=503))
    # The SDK retries a 503 itself (max_retries): every one of its attempts reaches the gateway.
    client = openai.AsyncOpenAI(base_url=gw.url("/v1"), api_key="sk-test-openai", max_retries=3)
    for _ in range(3):
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    await client.close()
    registry = gw.server.app[METRICS].registry
    client_requests = sum(
        sample.value
        for family in registry.collect()
        if family.name == "gateway_requests"
        for sample in family.samples
        if sample.name == "gateway_requests_total"
    )
    assert client_requests == 12
    assert attempts(gw) < client_requests  # below one upstream attempt per client request


# -- fallback -----------------------------------------------------------------------------------
async def test_a_fallback_takes_over_while_the_breaker_is_open_and_gives_back(
    make_gateway: MakeGateway, fake_provider: TestServer, aiohttp_server: Any
) -> None:
    gw, backup = await with_backup(
        make_gateway, fake_provider, aiohttp_server,
        retry={"attempts": 1}, breaker={"failures": 2, "open": 0.5},
    )  # fmt: skip
    faults(gw, Fault("status", status=502, count=2))
    for _ in range(2):
        assert (await chat(gw, "fb"))[0] == 502
    got, headers, _body = await chat(gw, "fb")
    assert got == 200
    assert headers["X-Gateway-Upstream"] == "backup"
    [sent] = list(backup.app[RECEIVED])
    assert b'"gpt-4o"' in sent.body  # renamed by the fallback's model map
    assert sent.headers["Authorization"] == "Bearer sk-test-openai"
    assert metric(gw, "gateway_upstream_fallbacks_total", upstream="openai", fallback="backup") == 1
    await asyncio.sleep(0.6)  # the primary's probe goes to the primary again
    got, headers, _ = await chat(gw, "fb")
    assert got == 200
    assert headers["X-Gateway-Upstream"] == "openai"
    assert len(backup.app[RECEIVED]) == 1


# -- concurrency --------------------------------------------------------------------------------
async def test_a_full_queue_is_answered_429_with_retry_after_at_once(
    make_gateway: MakeGateway, fake_provider: TestServer
) -> None:
    gw = await gateway(
        make_gateway,
        fake_provider,
        concurrency={"max": 2, "min": 1, "queue": 2, "queue_timeout": 5, "session_share": 1},
    )
    faults(gw, Fault("hang", count=4))
    held = [asyncio.ensure_future(chat(gw, f"held-{i}")) for i in range(4)]
    limiter = gw.server.app[UPSTREAMS].openai.limiter
    for _ in range(100):
        if limiter.in_flight == 2 and limiter.queued == 2:
            break
        await asyncio.sleep(0.01)
    started = time.monotonic()
    got, headers, body = await chat(gw, "one-more")
    assert time.monotonic() - started < 0.5
    assert got == 429
    assert headers["Retry-After"]
    assert headers["X-Gateway-Shed"] == "queue_full"
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert "try again in" in body["error"]["message"]
    # Answered before its turn began: no turn counted (its session not even begun).
    assert await gw.server.app[STORE].get("one-more") is None
    with pytest.raises(openai.RateLimitError):
        await gw.openai.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    gw.fake.app[FAULTS].clear()  # the hung calls answer
    assert [r[0] for r in await asyncio.gather(*held)] == [200] * 4
    assert metric(gw, "gateway_shed_requests_total", upstream="openai", reason="queue_full") == 2


async def test_one_session_cannot_take_all_slots(
    make_gateway: MakeGateway, fake_provider: TestServer
) -> None:
    gw = await gateway(
        make_gateway,
        fake_provider,
        concurrency={"max": 4, "min": 1, "adaptive": False, "queue": 10, "queue_timeout": 0.3,
                     "session_share": 0.5},
    )  # fmt: skip
    faults(gw, Fault("delay", seconds=0.5))
    runaway = [asyncio.ensure_future(chat(gw, "runaway")) for _ in range(6)]
    await asyncio.sleep(0.05)
    other = await asyncio.wait_for(chat(gw, "polite"), 2)
    assert other[0] == 200
    statuses = sorted(r[0] for r in await asyncio.gather(*runaway))
    assert statuses.count(200) >= 2
    assert 429 in statuses  # the runaway's extra calls waited past queue_timeout


# -- egress proxy ------------------------------------------------------------------------------
async def test_egress_goes_through_the_proxy_only_when_the_operator_says_so(
    make_gateway: MakeGateway,
    fake_provider: TestServer,
    aiohttp_server: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aiohttp import web

    seen: list[str] = []

    async def proxy(request: web.Request) -> web.Response:
        seen.append(str(request.url))  # a forward proxy gets the absolute URL
        return web.json_response({"error": {"message": "from the proxy"}}, status=418)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy)
    server: TestServer = await aiohttp_server(app)
    monkeypatch.setenv("HTTP_PROXY", str(server.make_url("")))
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)

    plain = await make_gateway(None)
    assert (await chat(plain, "direct"))[0] == 200
    assert seen == []

    proxied = await make_gateway(None, egress_proxy_from_env=True)
    got, _, body = await chat(proxied, "proxied")
    assert got == 418
    assert body["error"]["message"] == "from the proxy"
    assert seen == [str(fake_provider.make_url("/v1/chat/completions"))]


# -- span events -------------------------------------------------------------------------------
async def test_retries_and_breaker_moves_are_span_events(
    make_gateway: MakeGateway, fake_provider: TestServer
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    gw = await make_gateway(
        None,
        tracer_provider=provider,
        upstreams=upstreams(fake_provider, retry={**QUICK, "attempts": 2}, breaker={"failures": 2}),
    )
    faults(gw, Fault("status", status=503, count=2))
    assert (await chat(gw, "traced"))[0] == 503
    provider.force_flush()
    events = [
        (event.name, dict(event.attributes or {}))
        for span in exporter.get_finished_spans()
        for event in span.events
        if event.name.startswith("gateway.upstream")
    ]
    names = [name for name, _ in events]
    assert names == ["gateway.upstream.retry", "gateway.upstream.breaker"]
    retry, breaker = events[0][1], events[1][1]
    assert retry["gateway.upstream.retries"] == 1
    assert retry["gateway.upstream.retry_reasons"] == ("http_5xx",)
    assert breaker["gateway.breaker.from"] == "closed"
    assert breaker["gateway.breaker.to"] == "open"
    provider.shutdown()


# -- found by review: probes, hostile answers, clients that leave -------------------------------
async def test_a_refused_probe_call_gives_the_probe_back(
    make_gateway: MakeGateway, fake_provider: TestServer
) -> None:
    """A probe whose call is refused before it reaches the upstream (two credentials on a
    passthrough call) must not leave the breaker half-open for good."""
    gw = await gateway(
        make_gateway, fake_provider, retry={"attempts": 1}, breaker={"failures": 1, "open": 0.2}
    )
    faults(gw, Fault("status", status=500, count=1))
    assert (await gw.post("/v1/messages", MESSAGES, ANTHROPIC_HEADERS))[0] == 500
    await asyncio.sleep(0.3)
    two = {**ANTHROPIC_HEADERS, "x-api-key": "sk-ant-one", "Authorization": "Bearer sk-other"}
    assert (await gw.post("/v1/models", b"", two))[0] == 400
    await asyncio.sleep(0.3)
    assert (await gw.post("/v1/messages", MESSAGES, ANTHROPIC_HEADERS))[0] == 200
    assert gw.server.app[UPSTREAMS].anthropic.breaker.state == "closed"


async def test_a_fallback_rename_keeps_every_other_byte_and_prices_the_new_model(
    make_gateway: MakeGateway, fake_provider: TestServer, aiohttp_server: Any
) -> None:
    gw, backup = await with_backup(make_gateway, fake_provider, aiohttp_server)
    gw.server.app[UPSTREAMS].openai.breaker.force("open", "test")
    # 1e400: valid JSON that a float parser refuses; the rename must not read it.
    body = (
        b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi","x":1e400}],'
        b'"temperature":0.50}'
    )
    got, _, _ = await gw.post(
        "/v1/chat/completions", body, {**OPENAI_HEADERS, "X-Gateway-Session": "renamed"}
    )
    assert got < 500
    [sent] = list(backup.app[RECEIVED])
    assert b'"x":1e400' in sent.body and b'"temperature":0.50' in sent.body
    assert b'"model":"gpt-4o"' in sent.body
    # Priced as the model that answered (gpt-4o), not the one asked for.
    gw.server.app[UPSTREAMS].openai.breaker.force("closed", "test")
    direct = await make_gateway(None)
    ok = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    assert (await chat(direct, "direct", ok))[0] == 200
    if got == 200:
        assert (await gw.record("renamed")).cost == (await direct.record("direct")).cost


async def test_the_upstream_says_do_not_retry(
    make_gateway: MakeGateway, fake_provider: TestServer, aiohttp_server: Any
) -> None:
    from aiohttp import web

    async def refuse(_request: web.Request) -> web.Response:
        return web.json_response(
            {"error": {"message": "no", "type": "server_error"}},
            status=503,
            headers={"x-should-retry": "false"},
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", refuse)
    server: TestServer = await aiohttp_server(app)
    gw = await gateway(make_gateway, server)
    got, _, _ = await chat(gw, "said-no")
    assert got == 503
    assert (await gw.record("said-no")).upstream_retries == 0


async def test_a_retry_after_date_past_any_calendar_is_a_plain_retry(
    make_gateway: MakeGateway, aiohttp_server: Any
) -> None:
    from aiohttp import web

    calls = 0

    async def once(_request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return web.json_response(
                {"error": {"message": "busy", "type": "server_error"}},
                status=503,
                headers={"Retry-After": "Mon, 01 Jan 2020 00:00:00 +99999999999999999"},
            )
        return web.json_response({"id": "x", "object": "chat.completion", "choices": []})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", once)
    server: TestServer = await aiohttp_server(app)
    gw = await gateway(make_gateway, server)
    got, _, _ = await chat(gw, "overflow")
    assert got == 200
    assert calls == 2


async def test_a_client_that_leaves_while_queued_is_not_sent_upstream(
    fake_provider: TestServer,
) -> None:
    """On a server built as ``gateway serve`` builds it (aiohttp does not cancel a handler
    whose client left, unlike its TestServer): the queued call of a client that gave up
    reaches no upstream and counts no turn."""
    import socket

    import aiohttp
    from aiohttp import web

    from gateway.app import create_app
    from gateway.server import GatewayRunner
    from gateway.settings import Settings

    settings = Settings.model_validate(
        {
            "store": "memory://",
            "upstreams": {
                "openai": {
                    "url": str(fake_provider.make_url("/v1")),
                    "concurrency": {
                        "max": 1,
                        "min": 1,
                        "queue": 4,
                        "queue_timeout": 10,
                        "session_share": 1,
                    },
                },
                "anthropic": str(fake_provider.make_url("")).rstrip("/"),
            },
        }
    )
    app = create_app(settings)
    runner = GatewayRunner(app, access_log=None)
    await runner.setup()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    await web.TCPSite(runner, "127.0.0.1", port).start()
    base = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        fake_provider.app[FAULTS].replace(Fault("hang", count=1))
        async with aiohttp.ClientSession() as http:

            async def call(session: str, patience: float | None) -> int | None:
                headers = {**OPENAI_HEADERS, "Content-Type": "application/json",
                           "X-Gateway-Session": session}  # fmt: skip
                try:
                    async with http.post(
                        base, json=CHAT, headers=headers,
                        timeout=aiohttp.ClientTimeout(total=patience),
                    ) as response:  # fmt: skip
                        await response.read()
                        return response.status
                except TimeoutError:
                    return None

            holder = asyncio.get_running_loop().create_task(call("holder", None))
            await wait_until(lambda: len(fake_provider.app[RECEIVED]) == 1)
            assert await call("gone", 0.3) is None
            fake_provider.app[FAULTS].clear()
            assert await holder == 200
            await asyncio.sleep(0.3)
        assert len(fake_provider.app[RECEIVED]) == 1
        record = await app[STORE].get("gone")
        assert record is None or record.turns == 0
        assert app[UPSTREAMS].openai.limiter.in_flight == 0
    finally:
        await runner.cleanup()
