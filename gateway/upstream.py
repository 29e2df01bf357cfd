"""Talking to the providers: where a path goes, which headers cross, and the call itself,
retried within its upstream's budget and judged by its breaker and limiter."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, retry_if_result
from yarl import URL

from gateway.errors import ClientDisconnected, UpstreamTimeout, UpstreamUnavailable
from gateway.resilience.breaker import CLOSED, Breaker, Transition
from gateway.resilience.limiter import Limiter
from gateway.resilience.retry import (
    OVERLOAD_STATUSES,
    RETRY_AFTER_MAX,
    RETRYABLE_STATUSES,
    UNWELL_STATUSES,
    RetryBudget,
    backoff,
    retry_after,
    should_retry,
)
from gateway.settings import Settings, Timeouts, UpstreamSettings

# Hop-by-hop headers (RFC 9110 7.6.1) and those aiohttp sets itself.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
# Asked upstream for plain bytes, so usage can be read without decompressing on the side;
# the client never asked the gateway for more than identity either way.
# The body goes upstream decoded (``body``): its Content-Encoding no longer applies.
_REQUEST_DROP = _HOP_BY_HOP | {"accept-encoding", "content-encoding"}
_RESPONSE_DROP = _HOP_BY_HOP | {"content-encoding"}
_CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key", "proxy-authorization", "cookie"})
"""What a client could authenticate with: none of it goes upstream in keys and JWT modes."""
_GATEWAY_PREFIX = "x-gateway-"  # compared by slice: str.startswith parses its arguments slowly
_LARGE_BODY = 1024 * 1024
_NO_AUTO_HEADERS = ("User-Agent", "Content-Type")


@dataclass(slots=True, eq=False)
class Upstream:
    """One upstream: where its calls go, and what guards it (breaker, retry budget, limit)."""

    name: str
    provider: str
    base_url: str
    strip_prefix: str
    """The part of the client's path the base URL already holds (OpenAI's ``/v1``)."""
    settings: UpstreamSettings
    breaker: Breaker
    budget: RetryBudget
    limiter: Limiter
    fallback: Upstream | None = None
    """Takes this upstream's calls while its breaker is open (``fallback.upstream``)."""

    def url(self, path: str, query_string: str) -> str:
        """``path`` is a checked provider path (``gateway.paths``: no dot segment, no encoded
        separator), so the URL stays below the base URL's path; both parts are sent as they
        are, still percent-encoded (``send`` does not re-encode or normalise them)."""
        tail = path.removeprefix(self.strip_prefix) if self.strip_prefix else path
        url = self.base_url.rstrip("/") + tail
        return f"{url}?{query_string}" if query_string else url

    @classmethod
    def build(
        cls,
        name: str,
        settings: UpstreamSettings,
        on_breaker: Callable[[Transition], None] | None = None,
    ) -> Upstream:
        provider = settings.provider or name
        return cls(
            name=name,
            provider=provider,
            base_url=settings.url,
            strip_prefix="/v1" if provider == "openai" else "",
            settings=settings,
            breaker=Breaker(name, settings.breaker, on_breaker),
            budget=RetryBudget(settings.retry.budget_ratio),
            limiter=Limiter(settings.concurrency),
        )

    def fallback_model(self, model: str) -> str | None:
        """The model name the fallback is asked for, when the map renames it."""
        fallback = self.settings.fallback
        return fallback.models.get(model) if fallback is not None else None


@dataclass(slots=True, frozen=True)
class Upstreams:
    openai: Upstream
    anthropic: Upstream
    by_name: dict[str, Upstream]

    @classmethod
    def from_settings(
        cls, settings: Settings, on_breaker: Callable[[Transition], None] | None = None
    ) -> Upstreams:
        by_name = {
            name: Upstream.build(name, configured, on_breaker)
            for name, configured in settings.upstreams.items()
        }
        for name, configured in settings.upstreams.items():
            if configured.fallback is not None:
                by_name[name].fallback = by_name[configured.fallback.upstream]
        return cls(openai=by_name["openai"], anthropic=by_name["anthropic"], by_name=by_name)

    def for_provider(self, provider: str) -> Upstream:
        return self.anthropic if provider == "anthropic" else self.openai

    def for_headers(self, headers: CIMultiDictProxy[str]) -> Upstream:
        """Paths both providers serve (``/v1/models``): the Anthropic SDK always names its
        API version, and Anthropic keys travel as ``x-api-key``."""
        if "anthropic-version" in headers or "x-api-key" in headers:
            return self.anthropic
        return self.openai


def request_headers(
    headers: CIMultiDictProxy[str],
    extra: Iterable[tuple[str, str]] = (),
    drop: str | None = None,
    *,
    strip_credentials: bool = False,
) -> CIMultiDict[str]:
    """The client's headers as they go upstream; ``drop`` is the credential header that does
    not (``credentials.Credential``: one credential goes upstream). ``strip_credentials``:
    none of the client's credential headers go (the gateway sends its own in ``extra``)."""
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in _REQUEST_DROP or lower[:10] == _GATEWAY_PREFIX or lower == drop:
            continue
        if strip_credentials and lower in _CREDENTIAL_HEADERS:
            continue
        out.add(name, value)
    out["Accept-Encoding"] = "identity"
    for name, value in extra:
        out[name] = value
    return out


def response_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in _RESPONSE_DROP:
            out.add(name, value)
    return out


def client_session(settings: Settings) -> aiohttp.ClientSession:
    """The app's one upstream session: pooled connections (timeouts are set per call)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=settings.upstream_connections, ttl_dns_cache=300),
        auto_decompress=False,
        # One session serves every client: a cookie an upstream sets for one client must not
        # travel with another's calls. Set-Cookie reaches the client; its Cookie goes upstream.
        cookie_jar=aiohttp.DummyCookieJar(),
        # HTTPS_PROXY / NO_PROXY only when the operator says so: a stray variable must not
        # send every prompt through a proxy.
        trust_env=settings.egress_proxy_from_env,
    )


class Call(Protocol):
    """What ``send`` tells the call about its retries (``Exchange`` is one)."""

    retries: int
    retry_reasons: tuple[str, ...]
    budget_spent: bool
    breaker_moves: tuple[str, ...]

    def client_gone(self) -> bool: ...


@dataclass(slots=True)
class Attempts:
    """A ``Call`` of the gateway's own (a summary call): its retries, no client to lose."""

    retries: int = 0
    retry_reasons: tuple[str, ...] = ()
    budget_spent: bool = False
    breaker_moves: tuple[str, ...] = ()

    def client_gone(self) -> bool:
        return False


async def send(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    headers: CIMultiDict[str],
    body: bytes,
    timeouts: Timeouts,
    upstream: Upstream,
    call: Call,
    streamed: bool = False,
) -> aiohttp.ClientResponse:
    """Send one call and wait for the response headers, retrying as the providers' SDKs do
    while nothing has reached the client (``resilience.retry``); each attempt's answer goes
    to the upstream's breaker and limiter. A failure not retried is passed on as it is: an
    answer as the upstream gave it, an error as ``UpstreamUnavailable``/``UpstreamTimeout``.
    """
    # aiohttp warns on large bytes bodies; a file-like one is written out in chunks.
    data: bytes | io.BytesIO | None = body or None
    if len(body) > _LARGE_BODY:
        data = io.BytesIO(body)

    # The client's headers go as they are: aiohttp adds no User-Agent or Content-Type of its
    # own. Named only when one is missing: skipping costs aiohttp a header copy per call.
    skip = None
    if "User-Agent" not in headers or (body and "Content-Type" not in headers):
        skip = _NO_AUTO_HEADERS

    # Already encoded: yarl would otherwise re-quote the path and resolve dot segments.
    target = URL(url, encoded=True)
    loop = asyncio.get_running_loop()

    async def attempt(
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 (aiohttp's, per attempt)
        sent: float | None = None,
    ) -> aiohttp.ClientResponse:
        if isinstance(data, io.BytesIO):
            data.seek(0)
        if sent is None:
            sent = loop.time()
        breaker = upstream.breaker
        before = breaker.state
        try:
            response = await session.request(
                method,
                target,
                data=data,
                headers=headers,
                allow_redirects=False,
                skip_auto_headers=skip,
                timeout=timeout,
            )
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            _failed(upstream, _reason(exc), overload=isinstance(exc, TimeoutError))
            raise
        else:
            status = response.status
            if status in UNWELL_STATUSES:
                _failed(upstream, _http_reason(status), overload=status in OVERLOAD_STATUSES)
            else:
                answered = loop.time()
                breaker.success(answered)
                if streamed:  # a stream's headers come with its first event: the load signal
                    upstream.limiter.answered(answered - sent)
        finally:
            if breaker.state is not before:  # this attempt's answer moved it (a span event)
                call.breaker_moves += (f"{upstream.name}: {before} -> {breaker.state}",)
        _between_chunks(response, timeouts.idle)
        return response

    started = loop.time()
    upstream.budget.request(started)
    try:
        # The common path: one attempt, no retry state built.
        first: aiohttp.ClientResponse | BaseException
        try:
            first = await attempt(_first_try(timeouts.connect, timeouts.first_byte), started)
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            first = exc
        else:
            status = first.status
            if status < 400 or (
                status not in RETRYABLE_STATUSES and "x-should-retry" not in first.headers
            ):
                return first
        return await _retried(
            first, attempt, upstream, call, timeouts, started + timeouts.first_byte
        )
    except TimeoutError as exc:
        raise UpstreamTimeout(
            f"The upstream did not answer within {timeouts.first_byte:g}s."
        ) from exc
    except aiohttp.ClientError as exc:
        raise UpstreamUnavailable(
            f"The gateway could not reach the upstream ({type(exc).__name__})."
        ) from exc


async def _retried(
    first: aiohttp.ClientResponse | BaseException,
    attempt: Callable[[aiohttp.ClientTimeout], Awaitable[aiohttp.ClientResponse]],
    upstream: Upstream,
    call: Call,
    timeouts: Timeouts,
    deadline: float,
) -> aiohttp.ClientResponse:
    """The first attempt failed in a way the SDKs retry: tenacity takes over, replaying that
    first outcome as its attempt 1. Every attempt shares the first-byte deadline; each wait
    is full-jitter backoff, or the upstream's ``Retry-After`` when it fits in what is left of
    the deadline (else its answer is passed on). A retry needs the upstream's budget, a
    closed breaker and a client still there."""
    loop = asyncio.get_running_loop()
    policy = upstream.settings.retry
    pending: list[aiohttp.ClientResponse | BaseException] = [first]

    async def again() -> aiohttp.ClientResponse:
        if pending:
            outcome = pending.pop()
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        if call.client_gone():  # it left while the gateway waited to retry
            raise ClientDisconnected("The client went away before the call was retried.")
        remaining = max(0.001, deadline - loop.time())
        return await attempt(_timeouts(timeouts.connect, remaining))

    def wait(state: RetryCallState) -> float:
        """The upstream's ``Retry-After`` if it gave one, else full-jitter backoff (tenacity
        asks this before ``give_up``, which sees it as ``upcoming_sleep``)."""
        outcome = state.outcome
        if outcome is not None and not outcome.failed:
            asked = retry_after(outcome.result().headers)
            if asked is not None:
                return asked
        return backoff(state.attempt_number, policy.backoff_base, policy.backoff_max)

    def give_up(state: RetryCallState) -> bool:
        if state.attempt_number >= policy.attempts or call.client_gone():
            return True
        if upstream.breaker.state != CLOSED:
            return True  # the breaker answers from now on; this answer goes as it is
        wait = state.upcoming_sleep
        if wait >= deadline - loop.time() or wait > RETRY_AFTER_MAX:
            return True  # no time left to wait for, or a Retry-After past what is worth it
        if not upstream.budget.try_spend():
            call.budget_spent = True
            return True
        return False

    def before_sleep(state: RetryCallState) -> None:
        outcome = state.outcome
        assert outcome is not None
        if outcome.failed:
            reason = _reason(outcome.exception())
        else:
            response = outcome.result()
            reason = _http_reason(response.status)
            response.release()  # its body is not wanted: the connection goes back to the pool
        call.retries += 1
        call.retry_reasons += (reason,)

    retrying = AsyncRetrying(
        retry=retry_if_exception_type((aiohttp.ClientConnectionError, TimeoutError))
        | retry_if_result(_retryable),
        stop=give_up,
        wait=wait,
        before_sleep=before_sleep,
        retry_error_callback=_last_outcome,
    )
    response: aiohttp.ClientResponse = await retrying(again)
    return response


def _retryable(response: aiohttp.ClientResponse) -> bool:
    """A status the SDKs retry, unless the upstream says otherwise (``x-should-retry``)."""
    said = should_retry(response.headers)
    return response.status in RETRYABLE_STATUSES if said is None else said


def _last_outcome(state: RetryCallState) -> aiohttp.ClientResponse:
    """Not retried again: the last answer as it is (or its error raised)."""
    assert state.outcome is not None
    response: aiohttp.ClientResponse = state.outcome.result()
    return response


def _failed(upstream: Upstream, reason: str, *, overload: bool) -> None:
    upstream.breaker.failure(reason)
    if overload:
        upstream.limiter.overloaded()


def _reason(exc: BaseException | None) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect_error"
    return "reset"


def _http_reason(status: int) -> str:
    return f"http_{status}" if status in (408, 429, 529) else "http_5xx"


def _timeouts(connect: float, remaining: float) -> aiohttp.ClientTimeout:
    """An attempt's timeouts: ``connect`` bounds opening a socket; waiting for a free pooled
    connection (all ``upstream_connections`` busy) and for the headers counts against what
    is left of the first-byte deadline."""
    return aiohttp.ClientTimeout(
        total=None, connect=remaining, sock_connect=min(connect, remaining), sock_read=remaining
    )


_first_try = lru_cache(maxsize=16)(_timeouts)
"""The first attempt's, the same every call: built once."""


def _between_chunks(response: aiohttp.ClientResponse, idle: float) -> None:
    """From the headers on, the read timeout is the idle one (a released connection, its
    answer already read whole, is left alone: it is back in the pool)."""
    connection = response.connection
    protocol = connection.protocol if connection is not None else None
    if protocol is not None:
        protocol.read_timeout = idle
        protocol.start_timeout()
