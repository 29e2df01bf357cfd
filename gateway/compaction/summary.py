"""The summary call: a plain request to the session's own upstream, in its own API.

It carries the agent's own credentials and API headers (the call is the agent's, billed to the
agent's key) and goes to the same provider. Every way it can fail becomes ``SummaryFailed`` with
a short reason, so the compactor falls back to the next strategy instead of failing the agent.

It goes through a breaker of its own (``Summarizers``: one per upstream, with that upstream's
``breaker`` settings), not the upstream's: the agents' calls are the upstream's health, and a
summary that fails (another model, a long transcript) must not shed them. While one is open,
summaries to that upstream are skipped (``SummarySkipped``) and the gateway runs degraded for
``summarizer``; after its open period, one summary call probes it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping

import aiohttp
import orjson
from multidict import CIMultiDict

from gateway.compaction.job import Summary, SummaryFailed, SummarySkipped
from gateway.compaction.transcript import INSTRUCTIONS
from gateway.dialects.base import Dialect
from gateway.errors import GatewayError
from gateway.resilience.breaker import CLOSED, Breaker, Transition
from gateway.resilience.degraded import Degradation
from gateway.resilience.limiter import Limiter
from gateway.settings import Settings
from gateway.upstream import Attempts, Upstream, Upstreams, send

log = logging.getLogger("gateway.compaction")

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


class Summarizers:
    """The summary call's side of each upstream (``app[SUMMARIZERS]``): the upstream with a
    breaker of its own, a limiter of its own (a summary's first byte comes with its whole
    answer: no sample for the agents' limit) and no fallback; the retry budget is shared."""

    __slots__ = ("by_name", "degraded")

    def __init__(self, upstreams: Upstreams, degraded: Degradation) -> None:
        self.degraded = degraded
        self.by_name = {
            name: dataclasses.replace(
                upstream,
                breaker=Breaker(name, upstream.settings.breaker, self._moved),
                limiter=Limiter(upstream.settings.concurrency),
                fallback=None,
            )
            for name, upstream in upstreams.by_name.items()
        }

    def of(self, upstream: Upstream) -> Upstream:
        return self.by_name[upstream.name]

    def _moved(self, moved: Transition) -> None:
        """Degraded for ``summarizer`` while any summarizer breaker is not closed (half-open
        too: only its probe goes)."""
        level = logging.WARNING if moved.new == "open" else logging.INFO
        log.log(level, "summarizer breaker of %s %s -> %s: %s", moved.breaker, moved.old,
                moved.new, moved.reason)  # fmt: skip
        unwell = [u.name for u in self.by_name.values() if u.breaker.state != CLOSED]
        if not unwell:
            self.degraded.set("summarizer", False, f"summarizer breaker closed: {moved.reason}")
        elif not self.degraded.holds("summarizer"):
            detail = f"summarizer breaker {moved.new} for {moved.breaker}: {moved.reason}"
            self.degraded.set("summarizer", True, detail)


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
    upstream: Upstream,
) -> Summary:
    """One summary call through ``upstream``, a ``Summarizers`` one: its breaker decides
    whether the call is made at all (``SummarySkipped``), and hears how it went."""
    body = dialect.history.summary_request(model, INSTRUCTIONS, transcript, max_tokens)
    breaker = upstream.breaker
    if not breaker.allow():
        raise SummarySkipped(f"skipped: the summarizer's breaker for {upstream.name} is open")
    try:
        async with asyncio.timeout(time_limit):
            response = await send(
                http, "POST", url, headers, orjson.dumps(body), settings.timeouts, upstream,
                Attempts(),
            )  # fmt: skip
            async with response:
                data = await response.read()
    except TimeoutError as exc:
        # Cut by ``time_limit``: ``send`` heard no answer to judge (its own timeouts raise
        # UpstreamTimeout), and a summarizer this slow is unwell.
        breaker.failure("timeout")
        raise SummaryFailed(f"timeout after {time_limit:g}s") from exc
    except (GatewayError, aiohttp.ClientError) as exc:
        raise SummaryFailed(f"upstream unreachable ({type(exc).__name__})") from exc
    finally:
        breaker.abandoned()  # a probe that ended without a verdict lets the next one probe
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
