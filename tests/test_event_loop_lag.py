"""No body holds the event loop: a pathological body is counted (policy, compaction,
accounting) while a probe measures how late the loop runs its timers. One run of one
character, 10 MB, once held it 9.5 s (tiktoken's BPE is superlinear in one pre-token)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time

import aiohttp
import orjson
import pytest

from gateway.appkeys import TOKENS
from tests.harness import MakeGateway, session_headers

LIMITS = "version: 1\ndefaults:\n  limits: {max_request_input_tokens: 50000000}\n"
# Compaction counts the conversation and finds it over the window; with it off, the policy
# counts it (near max_request_input_tokens) and the call goes upstream, where a cut stream
# leaves the input to be estimated by accounting.
SCENARIOS = {
    "over the window": (LIMITS, False),
    "answered": (LIMITS + "  context: {strategies: []}\n", False),
    "cut stream": (LIMITS + "  context: {strategies: []}\n", True),
}
TEXTS = {
    "one character": lambda n: "a" * n,
    "digits": lambda n: "7" * n,
    "a multi-byte character": lambda n: "\u65e5" * (n // 3),
    "punctuation": lambda n: "!" * n,
    "no spaces, two letters": lambda n: "ab" * (n // 2),
}
LAG_BOUND = 0.25


class LagProbe:
    """Sleeps 1 ms again and again, keeping the largest delay past the wake-up asked for."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + 0.001
            await asyncio.sleep(0.001)
            self.worst = max(self.worst, loop.time() - asked)

    async def __aenter__(self) -> LagProbe:
        self._task = asyncio.get_running_loop().create_task(self._run())
        await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._task


@pytest.mark.parametrize("name", list(TEXTS))
@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_a_pathological_body_does_not_hold_the_loop(
    make_gateway: MakeGateway, name: str, scenario: str
) -> None:
    policy, cut = SCENARIOS[scenario]
    gw = await make_gateway(policy)
    text = TEXTS[name](3_000_000)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": text}], "max_tokens": 5}
    headers = {
        **session_headers(f"lag-{name}-{scenario}"),
        "Authorization": "Bearer sk-test-openai",
        "Content-Type": "application/json",
    }
    if cut:
        body["stream"] = True
        headers["x-fake-scenario"] = "cut_stream:2"
    data = orjson.dumps(body)
    async with LagProbe() as probe, aiohttp.ClientSession() as http:
        started = time.perf_counter()
        async with http.post(
            gw.url("/v1/chat/completions"), data=io.BytesIO(data), headers=headers
        ) as r:
            with contextlib.suppress(aiohttp.ClientPayloadError):  # the cut stream
                await r.read()
            status = r.status
        elapsed = time.perf_counter() - started
    assert status == (400 if scenario == "over the window" else 200)
    assert gw.upstream_calls() == (0 if scenario == "over the window" else 1)
    assert gw.server.app[TOKENS].misses > 0  # it was counted (or estimated) on the loop
    assert probe.worst < LAG_BOUND, f"loop held {probe.worst:.3f} s ({elapsed:.2f} s in all)"
