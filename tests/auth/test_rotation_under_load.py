"""Rotating a key while agents call with it: no call fails, calls with the previous secret are
answered with ``X-Gateway-Key-Deprecated`` (and counted), and once the grace ends the previous
secret is refused while the new one goes on."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import openai
from aiohttp.test_utils import TestServer

from gateway.appkeys import METRICS
from tests.harness import ADMIN, MakeGateway, create_key, keys_mode

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
CALLERS = 8
GRACE = 1.5


async def test_rotation_under_load_fails_no_call(
    make_gateway: MakeGateway, fake_provider: TestServer, tmp_path: Path
) -> None:
    gw = await make_gateway(None, **keys_mode(fake_provider, tmp_path))
    made = await create_key(gw, team="platform", name="agents")
    key = {"current": made["key"]}
    failures: list[BaseException] = []
    deprecated: list[str] = []
    done = asyncio.Event()

    async def agent(held: str) -> int:
        """An agent that keeps its key until told to pick up the new one, as a real fleet
        does during a rollout; returns how many calls it made."""
        calls = 0
        client = openai.AsyncOpenAI(base_url=gw.url("/v1"), api_key=held, max_retries=0)
        try:
            while not done.is_set():
                try:
                    raw = await client.chat.completions.with_raw_response.create(**CHAT)  # type: ignore[call-overload]
                except openai.APIError as exc:
                    failures.append(exc)
                    return calls
                calls += 1
                if (notice := raw.headers.get("x-gateway-key-deprecated")) is not None:
                    deprecated.append(notice)
                    await client.close()  # the rollout reaches this agent: the new key
                    client = openai.AsyncOpenAI(
                        base_url=gw.url("/v1"), api_key=key["current"], max_retries=0
                    )
        finally:
            await client.close()
        return calls

    callers = [asyncio.create_task(agent(made["key"])) for _ in range(CALLERS)]
    await asyncio.sleep(0.3)
    status, _headers, rotated = await gw.post(
        f"/gateway/keys/{made['id']}/rotate", {"grace": GRACE}, ADMIN
    )
    assert status == 200, rotated
    assert rotated["id"] == made["id"]  # the same id: usage, budgets, dashboards go on
    key["current"] = rotated["key"]
    await asyncio.sleep(0.5)
    done.set()
    counts = await asyncio.gather(*callers)

    assert failures == [], failures
    assert sum(counts) > CALLERS * 2
    assert deprecated and all(notice.startswith("expires=") for notice in deprecated)
    uses = gw.server.app[METRICS].registry.get_sample_value(
        "gateway_key_deprecated_secret_uses_total", {"team": "platform"}
    )
    assert uses is not None and uses >= len(deprecated)

    # After the grace (and the verification cache), the previous secret is refused.
    ends = rotated["previous_until"]
    await asyncio.sleep(max(0.0, ends - time.time()) + 1.1)
    status, headers, body = await gw.post(
        "/v1/chat/completions", CHAT, {"Authorization": f"Bearer {made['key']}"}
    )
    assert status == 401 and headers["X-Gateway-Error"] == "gateway_auth_invalid", body
    status, _, _ = await gw.post(
        "/v1/chat/completions", CHAT, {"Authorization": f"Bearer {rotated['key']}"}
    )
    assert status == 200
