"""A real Prometheus scrapes a test gateway after every kind of traffic the dashboards show
(the three APIs, streams, an upstream error, compaction, a policy stop, a budget stop, a
loop, and the resilience guards at work: a queue, a shed call, a spent retry budget, an open
breaker and its fallback, degraded mode); every panel and variable query must return data,
every annotation and alert expression must be valid, and every alert rule must evaluate. The
overview's Security row needs a gateway with keys and credential pools: ``test_live_security``."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from gateway.appkeys import DEGRADED, METRICS, UPSTREAMS
from gateway.fake_provider import CONFIG, ToolCallSpec
from gateway.fake_provider.faults import FAULTS, Fault
from gateway.settings import Settings, UpstreamSettings
from tests.compaction.test_sessions import run_session
from tests.conftest import ANTHROPIC_MODEL
from tests.dashboards.promql import ALERTS, Query, all_queries, concrete, label_values
from tests.harness import Gateway, MakeGateway, installed, session_headers
from tests.policy.apis import AgentLoop, call

WINDOW = "1m"
"""What ``$__rate_interval`` and ``$__range`` become: the whole test fits in it."""
SCRAPES_AFTER_TRAFFIC = 3
SECURITY_ROW = "Security"
"""The overview's row that ``test_live_security`` checks (passthrough traffic leaves it empty)."""
MAY_BE_ZERO = {
    "gateway-overview.json: Gateway-made error ratio (A)": "the gateway made no 5xx",
    "gateway-overview.json: Error budget burn rates (A)": "the gateway made no 5xx",
    "gateway-overview.json: Error budget burn rates (B)": "no request took 10 ms of overhead",
    "gateway-overview.json: In-flight requests by route (A)": "scraped between requests",
    "gateway-overview.json: Store errors by operation (A)": "the store did not fail",
    "gateway-overview.json: Store backlog by kind (A)": "the store kept up",
    "gateway-overview.json: Store backlog age by replica (A)": "the store kept up",
    "gateway-overview.json: Policy reloads in range by outcome (A)": "loaded once, at start",
    "sessions-and-agents.json: Calls past turn 100 in range (A)": "no session past 24 turns",
    "sessions-and-agents.json: Share of calls past turn 50 and 100 by agent (A)": "same",
    "sessions-and-agents.json: Share of calls past turn 50 and 100 by agent (B)": "same",
    "sessions-and-agents.json: Prompt-cache read share by agent (A)": "the fake caches nothing",
    "tokens-and-cost.json: Spend folded into 'other' (A)": "under the label caps",
    "tokens-and-cost.json: Label values folded into 'other' (A)": "under the label caps",
}
"""Panels this traffic leaves at 0 (data, but nothing to show): every other panel must have
a finite, non-zero value somewhere."""
POLICY = """
version: 1
team_header: X-Gateway-Team
defaults:
  loops: {identical_tool_calls: 3}
  budgets:
    - {per: team, window: day, max_tokens: 100000000}
    - {per: team, window: minute, max_requests: 100000}
    - {per: team, window: month, max_cost: 1000}
  context:
    window: 8000
    compact_at: 0.8
    target: 0.5
    keep_last: 2
    strategies: [summarize]
rules:
  - {name: tiny, match: {model: gpt-4o-mini}, limits: {max_turns: 1}}
  - name: interns-budget
    match: {team: interns}
    budgets: [{per: team, window: hour, max_tokens: 10}]
  - {name: lab-unbudgeted, match: {team: lab}, budgets: []}
"""
"""No ``prices``: cost comes from the built-in table. The lab team has no cost budget, so its
call to a model without a price goes through (and is counted as unpriced)."""
UNPRICED_MODEL = "house-model-7"


def guarded_upstreams(settings: Settings) -> dict[str, UpstreamSettings]:
    """The fake behind every upstream, with guards a few calls can reach: openai's breaker
    stays open once it opens, and openai-backup takes its calls; anthropic takes one call at
    a time and queues one more."""
    openai, anthropic = settings.upstreams["openai"].url, settings.upstreams["anthropic"].url
    return Settings.model_validate(
        {
            "upstreams": {
                "openai": {
                    "url": openai,
                    "breaker": {"open": 600},
                    "fallback": {"upstream": "openai-backup"},
                },
                "openai-backup": {"url": openai, "provider": "openai"},
                "anthropic": {
                    "url": anthropic,
                    "concurrency": {
                        "max": 1,
                        "min": 1,
                        "adaptive": False,
                        "queue": 1,
                        "queue_timeout": 30,
                    },
                },
            }
        }
    ).upstreams


def prometheus_binary() -> str:
    return installed("prometheus", "prometheus")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(directory: Path, gateway_port: int) -> Path:
    config = directory / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{ALERTS}]\n"
        "scrape_configs:\n"
        "  - job_name: agent-gateway\n"
        "    metrics_path: /metrics\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{gateway_port}']}}]\n"
    )
    return config


class Prometheus:
    def __init__(self, url: str, http: aiohttp.ClientSession, log: Path) -> None:
        self.url, self.http, self.log = url, http, log

    async def get(self, path: str, **params: str) -> dict[str, Any]:
        async with self.http.get(self.url + path, params=params) as resp:
            body: dict[str, Any] = await resp.json()
            return body

    async def query(self, expr: str) -> dict[str, Any]:
        return await self.get("/api/v1/query", query=expr)

    async def wait_for(self, expr: str, what: str, within: float = 15.0) -> list[Any]:
        """Polls until ``expr`` has a result."""
        deadline = time.monotonic() + within
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                body = await self.query(expr)
                if body.get("status") == "success" and body["data"]["result"]:
                    result: list[Any] = body["data"]["result"]
                    return result
            if time.monotonic() > deadline:
                log = await asyncio.to_thread(self.log.read_text)
                raise AssertionError(f"Prometheus: {what} within {within}s\n{log[-3000:]}")
            await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def prometheus(binary: str, tmp_path: Path, gateway_port: int) -> AsyncIterator[Prometheus]:
    port = await asyncio.to_thread(free_port)
    config = await asyncio.to_thread(write_config, tmp_path, gateway_port)
    log_path = tmp_path / "prometheus.log"
    log = await asyncio.to_thread(log_path.open, "wb")
    process = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
        stdout=log,
        stderr=log,
    )
    try:
        async with aiohttp.ClientSession() as http:
            yield Prometheus(f"http://127.0.0.1:{port}", http, log_path)
    finally:
        if process.returncode is None:
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()
        await asyncio.to_thread(log.close)


async def drive(gw: Gateway, round: int) -> None:
    """One of everything the dashboards show (sessions named by ``round``)."""

    def headers(name: str, **extra: str) -> dict[str, str]:
        return session_headers(f"live-{round}-{name}", **extra)

    teams = {"chat": "platform", "responses": "platform", "messages": "research"}
    for api, team in teams.items():
        assert (await call(gw, api, headers(api, **{"X-Gateway-Team": team}))).ok
    async with gw.anthropic.messages.stream(
        model=ANTHROPIC_MODEL,
        max_tokens=32,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers=headers("stream", **{"X-Gateway-Team": "research"}),
    ) as stream:
        await stream.get_final_message()
    chat = await gw.openai.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_headers=headers("chat-stream", **{"X-Gateway-Team": "platform"}),
    )
    async for _ in chat:
        pass
    responses = await gw.openai.responses.create(
        model="gpt-4o",
        input="hi",
        stream=True,
        extra_headers=headers("responses-stream", **{"X-Gateway-Team": "platform"}),
    )
    async for _ in responses:
        pass
    # A model without a price: counted as such, not as free.
    lab = headers("unpriced", **{"X-Gateway-Team": "lab"})
    assert (await call(gw, "chat", lab, model=UNPRICED_MODEL)).ok
    # The provider's own errors: a 5xx and a 429.
    for status in (500, 429):
        failing = headers(f"error-{status}", **{"x-fake-scenario": f"error:{status}"})
        assert (await call(gw, "chat", failing)).status == status
    # Compaction: a long session summarized once, the summary reused.
    await run_session(gw, "chat", f"live-{round}-compacted", 18)
    # Policy stops: a turn limit, and a team budget (429).
    limited = headers("limited")
    assert (await call(gw, "chat", limited, model="gpt-4o-mini")).ok
    assert (await call(gw, "chat", limited, model="gpt-4o-mini")).status == 400
    interns = headers("interns", **{"X-Gateway-Team": "interns"})
    outcomes = [await call(gw, "messages", interns) for _ in range(2)]
    assert any(o.status == 429 for o in outcomes), [o.status for o in outcomes]
    # A runaway loop, refused.
    gw.fake.app[CONFIG].tool_loop = ToolCallSpec("read_file", {"path": "notes.txt"})
    loop = AgentLoop(gw, "chat", headers("looping"), "Read the file.")
    await loop.until_refused(turns=6)
    gw.fake.app[CONFIG].tool_loop = None


async def until(done: Callable[[], bool], what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not done():
        assert time.monotonic() < deadline, f"not within {within}s: {what}"
        await asyncio.sleep(0.01)


async def queue_and_shed(gw: Gateway, prom: Prometheus, round: int) -> None:
    """anthropic's one slot held by a call the fake holds, a second call queued, a third
    shed (429); Prometheus scrapes them so, then the held calls go on and are answered."""
    faults = gw.fake.app[FAULTS]
    limiter = gw.server.app[UPSTREAMS].anthropic.limiter
    faults.add(Fault("hang", path="/v1/messages"))
    try:
        async with asyncio.TaskGroup() as calls:
            held = calls.create_task(call(gw, "messages", session_headers(f"live-{round}-held")))
            await until(lambda: limiter.in_flight == 1, "a call holding the slot")
            waiting = calls.create_task(
                call(gw, "messages", session_headers(f"live-{round}-waiting"))
            )
            await until(lambda: limiter.queued == 1, "a call waiting for the slot")
            shed = await call(gw, "messages", session_headers(f"live-{round}-shed"))
            assert shed.status == 429 and "retry-after" in shed.headers
            await prom.wait_for(
                'gateway_upstream_queued{upstream="anthropic"} == 1', "a queued call scraped"
            )
            faults.clear()
    finally:
        faults.clear()
    assert held.result().ok and waiting.result().ok


async def spend_the_retry_budget(gw: Gateway) -> None:
    """anthropic answers 429 (retried, and no failure for its breaker) until its retry budget
    refuses a retry. ``Retry-After: 0``: the fake's default second would make it slow."""
    refused = gw.server.app[METRICS].retry_budget_exhausted.values
    gw.fake.app[FAULTS].add(Fault("status", status=429, retry_after=0, path="/v1/messages"))
    try:
        for i in range(30):
            outcome = await call(gw, "messages", session_headers(f"live-budget-{i}"))
            assert outcome.status == 429
            if refused.get(("anthropic",)):
                break
        assert refused.get(("anthropic",)), "the retry budget was never spent"
    finally:
        gw.fake.app[FAULTS].clear()


async def open_the_breaker(gw: Gateway) -> None:
    """openai answers 503 until its breaker opens; then its fallback answers."""
    breaker = gw.server.app[UPSTREAMS].openai.breaker
    gw.fake.app[FAULTS].add(Fault("status", status=503, path="/v1/chat/completions"))
    try:
        for i in range(20):
            failed = await call(gw, "chat", session_headers(f"live-outage-{i}"))
            assert failed.status == 503
            if breaker.state == "open":
                break
        assert breaker.state == "open"
    finally:
        gw.fake.app[FAULTS].clear()
    assert (await call(gw, "chat", session_headers("live-fallback"))).ok


async def check(
    prom: Prometheus, query: Query, may_be_zero: Mapping[str, str] = MAY_BE_ZERO
) -> str | None:
    """What is wrong with one query (None when it is fine); ``may_be_zero``: the panels
    whose traffic leaves them at 0."""
    if query.kind == "variable":
        series, label = label_values(concrete(query.expr, WINDOW))
        params = {"match[]": series} if series else {}
        body = await prom.get(f"/api/v1/label/{label}/values", **params)
        if body.get("status") != "success":
            return f"{query.where}: {body.get('error')}"
        return None if body["data"] else f"{query.where}: no values"
    body = await prom.query(concrete(query.expr, WINDOW))
    if body.get("status") != "success":
        return f"{query.where}: {body.get('errorType')}: {body.get('error')}\n  {query.expr}"
    if query.kind != "panel":
        return None
    result = body["data"]["result"]
    if not result:
        return f"{query.where}: no data\n  {query.expr}"
    values = [float(series["value"][1]) for series in result]
    if query.where not in may_be_zero and not any(math.isfinite(v) and v for v in values):
        return f"{query.where}: nothing but {sorted(set(values))}\n  {query.expr}"
    return None


async def test_every_dashboard_and_alert_query_against_a_real_prometheus(
    make_gateway: MakeGateway, settings: Settings, tmp_path: Path
) -> None:
    binary = prometheus_binary()
    # The team header is believed from trusted proxies only: the test client is one.
    gw = await make_gateway(
        POLICY, trusted_proxies=["127.0.0.1/32"], upstreams=guarded_upstreams(settings)
    )
    job = 'up{job="agent-gateway"}'
    async with prometheus(binary, tmp_path, gw.server.port) as prom:
        # Scraped at least once before the traffic: counters born at 0 are seen at 0.
        await prom.wait_for(f"{job} == 1", "the gateway scraped")
        # Two rounds with a scrape between: the second moves series that already exist, so
        # rates and quantiles have values (a series born at its final value has a rate of 0).
        await drive(gw, 1)
        await queue_and_shed(gw, prom, 1)
        # The first loop of an agent (its series born at 1, which increase() cannot see)
        # fires the runaway-session alert.
        loop_alert = 'ALERTS{alertname="AgentGatewayRunawaySession", alertstate="firing"}'
        firing = await prom.wait_for(loop_alert, "the first loop alert firing")
        assert {a["metric"]["agent"] for a in firing} == {"openai-python"}
        await drive(gw, 2)
        await queue_and_shed(gw, prom, 2)
        # Counters and gauges that exist from the start: once is enough.
        await spend_the_retry_budget(gw)
        await open_the_breaker(gw)
        gw.server.app[DEGRADED].set("manual", True, "the dashboards' live test")
        done = time.time()
        await prom.wait_for(
            f"timestamp({job}) > {done + SCRAPES_AFTER_TRAFFIC}", "scrapes after the traffic"
        )

        queries = await asyncio.to_thread(all_queries)
        shown = [q for q in queries if q.row != SECURITY_ROW]
        problems = [p for p in await asyncio.gather(*(check(prom, q) for q in shown)) if p]
        assert not problems, "\n".join(problems)
        assert len([q for q in shown if q.kind == "panel"]) >= 60
        assert set(MAY_BE_ZERO) <= {q.where for q in queries}, "stale MAY_BE_ZERO entries"

        # Every rule evaluated without an error.
        groups = (await prom.get("/api/v1/rules"))["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert len(rules) == len([q for q in queries if q.kind == "alert"])
        assert {r["health"] for r in rules} == {"ok"}, [
            (r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"
        ]


async def sdk_calls(gw: Gateway, round: int) -> None:
    """Plain SDK traffic of real (priced) model names: the three APIs, JSON and streams."""
    for api in ("chat", "responses", "messages"):
        assert (await call(gw, api, session_headers(f"packaged-{round}-{api}"))).ok
    chat = await gw.openai.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_headers=session_headers(f"packaged-{round}-stream"),
    )
    async for _ in chat:
        pass


async def test_the_cost_panels_fill_with_the_packaged_policy(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    """No ``prices`` anywhere: the packaged policy and the built-in table fill every panel
    that reads gateway_cost_total."""
    binary = prometheus_binary()
    gw = await make_gateway(None)
    job = 'up{job="agent-gateway"}'
    async with prometheus(binary, tmp_path, gw.server.port) as prom:
        await prom.wait_for(f"{job} == 1", "the gateway scraped")
        await sdk_calls(gw, 1)
        await prom.wait_for("gateway_cost_total > 0", "gateway_cost_total above 0")
        await sdk_calls(gw, 2)
        done = time.time()
        await prom.wait_for(
            f"timestamp({job}) > {done + SCRAPES_AFTER_TRAFFIC}", "scrapes after the traffic"
        )
        queries = await asyncio.to_thread(all_queries)
        cost = [
            q
            for q in queries
            if q.kind == "panel"
            and q.where.startswith("tokens-and-cost.json")
            and "gateway_cost_total" in q.expr
            and q.where not in MAY_BE_ZERO
        ]
        assert len(cost) >= 8
        problems = [p for p in await asyncio.gather(*(check(prom, q) for q in cost)) if p]
        assert not problems, "\n".join(problems)
