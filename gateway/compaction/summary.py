"""The summary call: a plain request to the session's own upstream, in its own API.

It carries the agent's own credentials and API headers (the call is the agent's, billed to the
agent's key) and goes to the same provider. Every way it can fail becomes ``SummaryFailed`` with
a short reason, so the compactor falls back to the next strategy instead of failing the agent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiohttp
import orjson
from multidict import CIMultiDict

from gateway.compaction.job import Summary, SummaryFailed
from gateway.compaction.transcript import INSTRUCTIONS
from gateway.dialects.base import Dialect
from gateway.errors import GatewayError
from gateway.settings import Settings
from gateway.upstream import send

# What the summary call carries over from the agent's call: whose call it is and which API
# version and features; nothing that shapes the agent's own request (its scenario, its ids).
CARRIED_HEADERS = (
    "authorization",
    "x-api-key",
    "api-key",
    "anthropic-version",
    "anthropic-beta",
    "openai-organization",
    "openai-project",
    "user-agent",
)


def carried_headers(headers: Mapping[str, str], drop: str | None = None) -> CIMultiDict[str]:
    """The call's own headers the summary call needs; ``drop`` is the credential header that
    does not go upstream (``credentials``): the summary sends one credential, as the call did."""
    out: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/json"})
    for name in CARRIED_HEADERS:
        if name in headers and name != drop:
            out[name] = headers[name]
    out["Accept-Encoding"] = "identity"
    return out


async def summarize(
    http: aiohttp.ClientSession,
    url: str,
    headers: CIMultiDict[str],
    dialect: Dialect,
    model: str,
    transcript: str,
    max_tokens: int,
    time_limit: float,
    settings: Settings,
) -> Summary:
    body = dialect.history.summary_request(model, INSTRUCTIONS, transcript, max_tokens)
    try:
        async with asyncio.timeout(time_limit):
            response = await send(http, "POST", url, headers, orjson.dumps(body), settings)
            async with response:
                data = await response.read()
    except TimeoutError as exc:
        raise SummaryFailed(f"timeout after {time_limit:g}s") from exc
    except (GatewayError, aiohttp.ClientError) as exc:
        raise SummaryFailed(f"upstream unreachable ({type(exc).__name__})") from exc
    if response.status >= 400:
        raise SummaryFailed(f"upstream answered {response.status}")
    try:
        answer = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise SummaryFailed("upstream answered with something that is not JSON") from exc
    if not isinstance(answer, dict):
        raise SummaryFailed("upstream answered with something that is not a JSON object")
    text = dialect.history.summary_text(answer)
    if not text.strip():
        raise SummaryFailed("the summary came back empty")
    facts = dialect.read_response(answer)
    return Summary(text, facts.model or model, facts.usage)
