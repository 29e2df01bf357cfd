"""The egress guard: SSRF payloads never get a connection, IP literals and redirects are
refused, and what a fetch reads is bounded and strictly parsed.

Names resolve through a stub resolver; every connection attempt goes through a socket
factory that records it and opens a socket only to 127.0.0.1, so a regression shows as a
recorded attempt, never as traffic to another address.
"""

from __future__ import annotations

import asyncio
import gzip
import ipaddress
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer

from gateway.auth.egress import (
    EgressBlocked,
    EgressError,
    GuardedResolver,
    blocked_reason,
    egress_session,
    fetch_json,
    parse_allow,
)

SSRF = [
    ("127.0.0.1", "loopback"),
    ("::1", "loopback"),
    ("10.0.0.1", "private"),
    ("172.16.5.4", "private"),
    ("192.168.0.1", "private"),
    ("169.254.169.254", "link_local"),
    ("fd00:ec2::254", "private"),
    ("100.64.0.1", "private"),
    ("0.0.0.0", "reserved"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:169.254.169.254", "link_local"),
    ("64:ff9b::a9fe:a9fe", "link_local"),
    ("2002:7f00:1::", "loopback"),
    ("::ffff:0:7f00:1", "reserved"),  # IPv4-translated (SIIT) loopback
    ("224.0.0.1", "reserved"),
    ("198.18.0.1", "reserved"),
    ("fe80::1", "link_local"),
    ("fe80::1%1", "link_local"),
    ("::", "reserved"),
    ("255.255.255.255", "reserved"),
    ("192.0.2.1", "reserved"),
    ("::7f00:1", "reserved"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "reserved"),  # Teredo
]
PUBLIC = ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "64:ff9b::808:808"]


class StubResolver(AbstractResolver):
    """Fixed answers; a name it does not know does not resolve."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        if host not in self.answers:
            raise OSError(f"{host} does not resolve")
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in self.answers[host]
        ]

    async def close(self) -> None:
        pass


class Sockets:
    """A socket factory that records every connection attempt and connects only to
    127.0.0.1."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def __call__(self, addr_info: Any) -> socket.socket:
        family, type_, proto, _, address = addr_info
        self.attempts.append(address[0])
        if address[0] != "127.0.0.1":
            raise OSError("the test refuses every connection but to 127.0.0.1")
        return socket.socket(family, type_, proto)


class Listener:
    """A loopback HTTP server that counts the connections it accepts."""

    def __init__(self) -> None:
        self.accepts = 0
        self.server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepts += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n"
            b'Connection: close\r\n\r\n{"ok": true}'
        )
        await writer.drain()
        writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    server = Listener()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
def blocks() -> list[str]:
    return []


@pytest.fixture
async def fetch(blocks: list[str]) -> AsyncIterator[Callable[..., Any]]:
    """``fetch(url, allow=[], answers={}, sockets=None, **fetch_json options)``; the session
    is closed when the test ends."""
    sessions: list[aiohttp.ClientSession] = []

    async def go(
        url: str,
        allow: list[str] | None = None,
        answers: dict[str, list[str]] | None = None,
        sockets: Sockets | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        session = egress_session(
            allow or [],
            StubResolver(answers or {}),
            on_block=blocks.append,
            socket_factory=sockets if sockets is not None else Sockets(),
        )
        sessions.append(session)
        return await fetch_json(session, url, **options)

    yield go
    for session in sessions:
        await session.close()


@pytest.mark.parametrize(("address", "reason"), SSRF)
async def test_a_name_resolving_to_an_ssrf_address_gets_no_connection(
    fetch: Callable[..., Any], blocks: list[str], address: str, reason: str
) -> None:
    sockets = Sockets()
    with pytest.raises(EgressBlocked) as refused:
        await fetch("http://idp.test/jwks", answers={"idp.test": [address]}, sockets=sockets)
    assert refused.value.reason == reason
    assert sockets.attempts == []
    assert blocks == [reason]


@pytest.mark.parametrize(
    ("name", "addresses"),
    [
        ("localhost", ["127.0.0.1", "::1"]),
        ("metadata.google.internal", ["169.254.169.254"]),
        ("metadata.azure.internal", ["fd00:ec2::254"]),
        # One public and one private address: the connector could pick either.
        ("rebinding.test", ["93.184.216.34", "10.0.0.1"]),
    ],
)
async def test_internal_names_are_refused_on_what_they_resolve_to(
    fetch: Callable[..., Any], name: str, addresses: list[str]
) -> None:
    sockets = Sockets()
    with pytest.raises(EgressBlocked):
        await fetch(
            f"http://{name}/.well-known/jwks.json", answers={name: addresses}, sockets=sockets
        )
    assert sockets.attempts == []


async def test_a_name_pointing_at_a_live_loopback_server_never_reaches_it(
    fetch: Callable[..., Any], listener: Listener
) -> None:
    for address in ("127.0.0.1", "::ffff:127.0.0.1"):
        with pytest.raises(EgressBlocked):
            await fetch(f"http://idp.test:{listener.port}/", answers={"idp.test": [address]})
    assert listener.accepts == 0
    # The control: listed in egress_allow, the same name reaches the same server.
    answer = await fetch(
        f"http://idp.test:{listener.port}/",
        allow=["127.0.0.1/32"],
        answers={"idp.test": ["127.0.0.1"]},
    )
    assert answer == {"ok": True} and listener.accepts == 1


async def test_ip_literal_urls_are_checked_although_aiohttp_skips_the_resolver(
    fetch: Callable[..., Any], listener: Listener, blocks: list[str]
) -> None:
    sockets = Sockets()
    literals = [
        f"http://127.0.0.1:{listener.port}/",
        f"http://[::ffff:127.0.0.1]:{listener.port}/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://10.0.0.1/",
        "http://0.0.0.0/",
        # Legacy numeric forms a socket maps onto 127.0.0.1.
        f"http://2130706433:{listener.port}/",
        f"http://127.1:{listener.port}/",
    ]
    for url in literals:
        with pytest.raises(EgressBlocked):
            await fetch(url, sockets=sockets)
    assert listener.accepts == 0 and sockets.attempts == []
    assert len(blocks) == len(literals)


async def test_a_public_address_passes_the_resolver_check() -> None:
    """Checked on the resolver's answer only: the test connects to nothing public."""
    resolver = GuardedResolver(StubResolver({"idp.example": PUBLIC}))
    results = await resolver.resolve("idp.example", 443)
    assert [r["host"] for r in results] == PUBLIC
    await resolver.close()


async def test_the_allow_list_admits_a_listed_private_range_only() -> None:
    stub = StubResolver({"idp.cluster": ["10.1.2.3"], "other.cluster": ["10.9.9.9"]})
    resolver = GuardedResolver(stub, allow=["10.1.0.0/16"])
    assert (await resolver.resolve("idp.cluster", 443))[0]["host"] == "10.1.2.3"
    with pytest.raises(EgressBlocked, match="private"):
        await resolver.resolve("other.cluster", 443)
    with pytest.raises(EgressBlocked, match="unresolvable"):
        await resolver.resolve("nowhere.cluster", 443)


async def test_numeric_host_forms_resolved_by_the_system_are_refused() -> None:
    """The default resolver (getaddrinfo parses these itself, no DNS) maps them to loopback."""
    resolver = GuardedResolver()
    for host in ("0x7f.0.0.1", "0177.0.0.1"):
        with pytest.raises(EgressBlocked, match="loopback"):
            await resolver.resolve(host, 80)
    await resolver.close()


def test_the_reasons_name_each_range() -> None:
    for address, reason in SSRF:
        assert blocked_reason(ipaddress.ip_address(address)) == reason, address
    for address in PUBLIC:
        assert blocked_reason(ipaddress.ip_address(address)) is None, address


def test_egress_allow_entries_must_be_cidrs() -> None:
    assert [str(n) for n in parse_allow(["127.0.0.1/32", "10.0.0.0/8", "::1"])] == [
        "127.0.0.1/32",
        "10.0.0.0/8",
        "::1/128",
    ]
    with pytest.raises(ValueError, match="not-a-cidr"):
        parse_allow(["not-a-cidr"])


HITS = web.AppKey("hits", list[str])


@pytest.fixture
async def idp(aiohttp_server: Any) -> TestServer:
    """A loopback server answering what an identity provider might, well or badly."""
    hits: list[str] = []

    async def record(request: web.Request) -> web.StreamResponse:
        hits.append(request.path)
        route = ROUTES[request.path]
        return await route(request)

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(f"http://127.0.0.1:{request.url.port}/ok")

    async def large_streamed(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(b'{"keys": "')
        for _ in range(64):
            await response.write(b"x" * 8192)
        await response.write(b'"}')
        return response

    async def gzipped(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=gzip.compress(b'{"keys": []}'),
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )

    def fixed(body: bytes, status: int = 200) -> Callable[[web.Request], Any]:
        async def answer(request: web.Request) -> web.Response:
            return web.Response(body=body, status=status, content_type="application/json")

        return answer

    ROUTES: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = {
        "/ok": fixed(b'{"keys": []}'),
        "/redirect": redirect,
        "/large": fixed(b'{"keys": "' + b"x" * (300 * 1024) + b'"}'),
        "/large-streamed": large_streamed,
        "/not-json": fixed(b"<html>sign in</html>"),
        "/duplicate": fixed(b'{"jwks_uri": "https://a", "jwks_uri": "https://b"}'),
        "/nested-duplicate": fixed(b'{"keys": [{"kid": "a", "kid": "b"}]}'),
        "/array": fixed(b"[1, 2]"),
        "/nan": fixed(b'{"exp": NaN}'),
        "/bad-utf8": fixed(b'{"k": "\xff"}'),
        "/deep": fixed(b"[" * 50_000 + b"]" * 50_000),
        "/error": fixed(b'{"error": "down"}', status=503),
        "/gzip": gzipped,
    }
    app = web.Application()
    app[HITS] = hits
    app.router.add_route("GET", "/{tail:.*}", record)
    server: TestServer = await aiohttp_server(app)
    return server


async def test_a_redirect_is_refused_and_not_followed(
    fetch: Callable[..., Any], idp: TestServer, blocks: list[str]
) -> None:
    with pytest.raises(EgressBlocked, match="redirect"):
        await fetch(str(idp.make_url("/redirect")), allow=["127.0.0.1/32"])
    assert idp.app[HITS] == ["/redirect"]
    assert blocks == ["redirect"]


async def test_an_allowed_loopback_idp_answers(fetch: Callable[..., Any], idp: TestServer) -> None:
    assert await fetch(str(idp.make_url("/ok")), allow=["127.0.0.1/32"]) == {"keys": []}


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/large", "too_large"),
        ("/large-streamed", "too_large"),
        ("/not-json", "invalid_json"),
        ("/duplicate", "duplicate_key"),
        ("/nested-duplicate", "duplicate_key"),
        ("/array", "not_object"),
        ("/nan", "invalid_json"),
        ("/bad-utf8", "invalid_json"),
        ("/deep", "invalid_json"),
        ("/error", "http_503"),
        ("/gzip", "encoding"),
    ],
)
async def test_what_an_idp_answers_is_bounded_and_strict(
    fetch: Callable[..., Any], idp: TestServer, blocks: list[str], path: str, reason: str
) -> None:
    with pytest.raises(EgressError) as failed:
        await fetch(str(idp.make_url(path)), allow=["127.0.0.1/32"])
    assert failed.value.reason == reason
    assert not isinstance(failed.value, EgressBlocked) and blocks == []


async def test_the_body_bound_is_the_callers(fetch: Callable[..., Any], idp: TestServer) -> None:
    with pytest.raises(EgressError, match="too_large"):
        await fetch(str(idp.make_url("/ok")), allow=["127.0.0.1/32"], max_bytes=8)


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://127.0.0.1/",
        "gopher://127.0.0.1/",
        "http://user:pw@idp.test/",
        "http:///no-host",
        "not a url",
        "",
    ],
)
async def test_only_plain_http_urls_are_fetched(
    fetch: Callable[..., Any], url: str, blocks: list[str]
) -> None:
    sockets = Sockets()
    with pytest.raises(EgressError, match="url"):
        await fetch(url, answers={"idp.test": ["127.0.0.1"]}, sockets=sockets)
    assert sockets.attempts == []


async def test_an_unreachable_allowed_address_is_an_error_not_a_crash(
    fetch: Callable[..., Any],
) -> None:
    closed = Listener()
    await closed.start()
    port = closed.port
    await closed.close()  # nothing listens there now: the connection is refused
    with pytest.raises(EgressError, match="unreachable"):
        await fetch(f"http://127.0.0.1:{port}/", allow=["127.0.0.1/32"])


def test_a_refusal_is_an_os_error_with_a_short_reason() -> None:
    refused = EgressBlocked("link_local")
    assert isinstance(refused, OSError) and isinstance(refused, EgressError)
    assert str(refused) == "link_local" and refused.reason == "link_local"
