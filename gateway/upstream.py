"""Talking to the providers: where a path goes, which headers cross, and the call itself."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)
from yarl import URL

from gateway.errors import UpstreamTimeout, UpstreamUnavailable
from gateway.settings import Settings

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
_GATEWAY_PREFIX = "x-gateway-"  # compared by slice: str.startswith parses its arguments slowly
_LARGE_BODY = 1024 * 1024
_NO_AUTO_HEADERS = ("User-Agent", "Content-Type")


@dataclass(slots=True, frozen=True)
class Upstream:
    provider: str
    base_url: str
    strip_prefix: str
    """The part of the client's path the base URL already holds (OpenAI's ``/v1``)."""

    def url(self, path: str, query_string: str) -> str:
        """``path`` is a checked provider path (``gateway.paths``: no dot segment, no encoded
        separator), so the URL stays below the base URL's path; both parts are sent as they
        are, still percent-encoded (``send`` does not re-encode or normalise them)."""
        tail = path.removeprefix(self.strip_prefix) if self.strip_prefix else path
        url = self.base_url.rstrip("/") + tail
        return f"{url}?{query_string}" if query_string else url


@dataclass(slots=True, frozen=True)
class Upstreams:
    openai: Upstream
    anthropic: Upstream

    @classmethod
    def from_settings(cls, settings: Settings) -> Upstreams:
        return cls(
            openai=Upstream("openai", settings.upstreams.openai, "/v1"),
            anthropic=Upstream("anthropic", settings.upstreams.anthropic, ""),
        )

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
) -> CIMultiDict[str]:
    """The client's headers as they go upstream; ``drop`` is the credential header that does
    not (``credentials.Credential``: one credential goes upstream)."""
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in _REQUEST_DROP or lower[:10] == _GATEWAY_PREFIX or lower == drop:
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
    )


async def send(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    headers: CIMultiDict[str],
    body: bytes,
    settings: Settings,
    on_retry: Callable[[], None] | None = None,
) -> aiohttp.ClientResponse:
    """Send one call and wait for the response headers (``on_retry`` hears of each retry).

    Only failures to open a connection are retried: nothing reached the upstream, so nothing
    can be billed twice.
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
    timeouts = settings.timeouts
    # aiohttp's read timeout runs from the request sent to the response headers, then between
    # chunks: first_byte until the headers, idle after them (``_between_chunks``).
    timeout = _first_byte(timeouts.connect, timeouts.first_byte)

    async def attempt() -> aiohttp.ClientResponse:
        if isinstance(data, io.BytesIO):
            data.seek(0)
        response = await session.request(
            method,
            target,
            data=data,
            headers=headers,
            allow_redirects=False,
            skip_auto_headers=skip,
            timeout=timeout,
        )
        _between_chunks(response, timeouts.idle)
        return response

    try:
        try:
            return await attempt()
        except aiohttp.ClientConnectorError:
            if not settings.upstream_retries:
                raise

        # Tenacity only once the first try failed: the common path builds no retry state.
        def before(_state: RetryCallState) -> None:
            if on_retry is not None:
                on_retry()

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(aiohttp.ClientConnectorError),
            stop=stop_after_attempt(settings.upstream_retries),
            wait=wait_exponential(multiplier=0.05, max=1.0),
            reraise=True,
            before=before,
        )
        return await retrying(attempt)
    except TimeoutError as exc:
        raise UpstreamTimeout(
            f"The upstream did not answer within {settings.timeouts.first_byte:g}s."
        ) from exc
    except aiohttp.ClientError as exc:
        raise UpstreamUnavailable(
            f"The gateway could not reach the upstream ({type(exc).__name__})."
        ) from exc


@lru_cache(maxsize=16)
def _first_byte(connect: float, first_byte: float) -> aiohttp.ClientTimeout:
    """``connect`` bounds opening a socket; waiting for a free pooled connection (all
    ``upstream_connections`` busy) counts against ``first_byte``, like the wait for headers."""
    return aiohttp.ClientTimeout(
        total=None, connect=first_byte, sock_connect=connect, sock_read=first_byte
    )


def _between_chunks(response: aiohttp.ClientResponse, idle: float) -> None:
    """From the headers on, the read timeout is the idle one (a released connection, its
    answer already read whole, is left alone: it is back in the pool)."""
    connection = response.connection
    protocol = connection.protocol if connection is not None else None
    if protocol is not None:
        protocol.read_timeout = idle
        protocol.start_timeout()
