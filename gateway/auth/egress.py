"""The egress guard: how the gateway fetches a URL that no operator wrote into ``upstreams``
(an OIDC discovery document, a JWKS), so that such a URL cannot reach into the network the
gateway sits in (loopback services, private ranges, the cloud metadata endpoint).

``egress_session`` builds the one kind of client session allowed to make those fetches:
its resolver (``GuardedResolver``) refuses a name when any address it resolves to is not
globally routable, and the addresses it returns are the ones the connector connects to, so
the check and the connection cannot disagree (no time-of-check/time-of-use gap); a request
middleware checks IP-literal hosts, which aiohttp connects to without asking the resolver,
and refuses every redirect. ``fetch_json`` reads a bounded, strictly parsed JSON object.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.client_middlewares import ClientHandlerType
from aiohttp.connector import SocketFactoryType
from aiohttp.resolver import DefaultResolver
from yarl import URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
OnBlock = Callable[[str], None]
"""Called with the reason of each refused fetch (``metrics.egress_blocked``)."""

MAX_BYTES = 256 * 1024
TIMEOUT = 5.0


class EgressError(Exception):
    """A guarded fetch failed; ``reason`` is a short code, safe to log (never the URL's
    userinfo nor the body)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class EgressBlocked(EgressError, OSError):
    """The guard refused the destination. An ``OSError``, so that aiohttp treats a refusal
    from the resolver as the connection failure it is."""


def _nets(*cidrs: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


# Checked in order; the first match names the reason. Written out rather than read from
# ``ipaddress``'s ``is_private``/``is_global``, whose tables changed between Python releases.
_BLOCKED: tuple[tuple[str, tuple[IPNetwork, ...]], ...] = (
    ("loopback", _nets("127.0.0.0/8", "::1/128")),
    ("link_local", _nets("169.254.0.0/16", "fe80::/10", "fec0::/10")),  # 169.254.169.254
    ("private", _nets("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7",
                      "100.64.0.0/10")),  # CGNAT: a provider's shared space is still inside
    ("reserved", _nets(
        "0.0.0.0/8", "::/128", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24",
        "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
        "ff00::/8", "100::/64", "2001::/23", "2001:db8::/32", "64:ff9b:1::/48", "::/96",
        "::ffff:0:0:0/96",  # IPv4-translated (SIIT): an address translator reaches IPv4
    )),
)  # fmt: skip
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_v4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 form carries and leads to: IPv4-mapped, NAT64, 6to4."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def blocked_reason(address: IPAddress) -> str | None:
    """Why ``address`` may not be reached (``loopback``, ``link_local``, ``private``,
    ``reserved``), or None when it is globally routable."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            address = ipaddress.IPv6Address(address.compressed.split("%", 1)[0])
        inner = _embedded_v4(address)
        if inner is not None:
            return blocked_reason(inner)
    for reason, networks in _BLOCKED:
        if any(address in network for network in networks):
            return reason
    # Whatever else the standard library does not call global (new IANA special-purpose
    # blocks) is refused too: an identity provider lives on a public address or is listed.
    return None if address.is_global else "reserved"


def parse_allow(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """``auth.egress_allow`` as networks; ValueError names the entry that is not a CIDR."""
    networks: list[IPNetwork] = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError:
            raise ValueError(f"auth.egress_allow: {cidr!r} is not an address or CIDR") from None
    return tuple(networks)


class EgressPolicy:
    """What may be reached: every globally routable address, and the operator's CIDRs."""

    __slots__ = ("allow", "on_block")

    def __init__(self, allow: Iterable[str] = (), on_block: OnBlock | None = None) -> None:
        self.allow = parse_allow(allow)
        self.on_block = on_block

    def refuse(self, reason: str) -> NoReturn:
        if self.on_block is not None:
            self.on_block(reason)
        raise EgressBlocked(reason)

    def check(self, host: str) -> None:
        """Refuse an address (given as text, as a resolver returns it) that may not be
        reached; text that is not an address is refused too."""
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            self.refuse("unresolvable")
        if self._allowed(address):
            return
        reason = blocked_reason(address)
        if reason is not None:
            self.refuse(reason)

    def _allowed(self, address: IPAddress) -> bool:
        if not self.allow:
            return False
        candidates: list[IPAddress] = [address]
        if isinstance(address, ipaddress.IPv6Address):
            bare = ipaddress.IPv6Address(address.compressed.split("%", 1)[0])
            candidates.append(bare)
            if (inner := _embedded_v4(bare)) is not None:
                candidates.append(inner)
        return any(a in network for a in candidates for network in self.allow)


class GuardedResolver(AbstractResolver):
    """Resolves through ``inner`` and refuses the name when ANY address is not allowed: a
    name resolving to one public and one private address is refused, as the connector
    could pick either."""

    def __init__(
        self,
        inner: AbstractResolver | None = None,
        *,
        allow: Iterable[str] = (),
        on_block: OnBlock | None = None,
        policy: EgressPolicy | None = None,
    ) -> None:
        self._inner = inner
        self.policy = policy if policy is not None else EgressPolicy(allow, on_block)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self._inner is None:  # made here: the default resolver binds the running loop
            self._inner = DefaultResolver()
        try:
            results = await self._inner.resolve(host, port, family)
        except OSError:
            self.policy.refuse("unresolvable")
        if not results:
            self.policy.refuse("unresolvable")
        for result in results:
            self.policy.check(result["host"])
        return results

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()


def _is_ip_literal(host: str) -> bool:
    """As aiohttp decides to skip the resolver: a colon, or only digits and dots."""
    return ":" in host or host.replace(".", "").isdigit()


def _middleware(policy: EgressPolicy) -> aiohttp.ClientMiddlewareType:
    """Runs for every request the session sends (and every redirect hop, were one followed)."""

    async def guard(
        request: aiohttp.ClientRequest, handler: ClientHandlerType
    ) -> aiohttp.ClientResponse:
        url = request.url
        if url.scheme not in ("http", "https"):
            policy.refuse("scheme")
        host = url.raw_host or ""
        if _is_ip_literal(host):
            # aiohttp connects to an IP literal without asking the resolver: check it here.
            policy.check(host.strip("[]"))
        response = await handler(request)
        if 300 <= response.status < 400:
            response.close()
            policy.refuse("redirect")
        return response

    return guard


def egress_session(
    allow: Sequence[str],
    resolver: AbstractResolver | None = None,
    *,
    on_block: OnBlock | None = None,
    socket_factory: SocketFactoryType | None = None,
) -> aiohttp.ClientSession:
    """A client session that can reach only what the egress guard allows: guarded resolver,
    IP literals and redirects refused by a middleware, no cookies, no proxy from the
    environment. ``socket_factory`` lets a test count every connection attempt."""
    policy = EgressPolicy(allow, on_block)
    connector = aiohttp.TCPConnector(
        resolver=GuardedResolver(resolver, policy=policy),
        socket_factory=socket_factory,
        limit=10,
    )
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        middlewares=(_middleware(policy),),
        auto_decompress=False,  # a compressed body could inflate past any bound we read to
        timeout=aiohttp.ClientTimeout(total=TIMEOUT),
    )


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Another parser may keep the first of two equal keys where json keeps the last: refuse
    # both, so that what we read is what anyone reads.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _DuplicateKey
    return result


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def loads_strict(data: bytes | str) -> Any:
    """JSON with duplicate keys, ``NaN`` and ``Infinity`` refused (EgressError)."""
    try:
        return json.loads(data, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except _DuplicateKey:
        raise EgressError("duplicate_key") from None
    except (ValueError, RecursionError):  # bad UTF-8 and over-long numbers are ValueErrors
        raise EgressError("invalid_json") from None


def _blocked_cause(error: BaseException) -> EgressBlocked | None:
    """The guard's refusal inside the error aiohttp wrapped it in, if that is what it is."""
    seen: BaseException | None = error
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, EgressBlocked):
            return seen
        seen = seen.__cause__ or getattr(seen, "os_error", None) or seen.__context__
    return None


def check_url(url: str) -> URL:
    """Only ``http(s)`` URLs with a host and no userinfo (EgressError ``url``)."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        raise EgressError("url") from None
    if parsed.scheme not in ("http", "https") or not parsed.raw_host:
        raise EgressError("url")
    if parsed.raw_user is not None or parsed.raw_password is not None:
        raise EgressError("url")
    return parsed


async def fetch_json(
    session: aiohttp.ClientSession,
    url: str,
    *,
    max_bytes: int = MAX_BYTES,
    timeout: float = TIMEOUT,  # noqa: ASYNC109 (the bound is applied here, on the whole fetch)
) -> dict[str, Any]:
    """GET ``url`` through an ``egress_session`` and return the JSON object it answers.

    Raises ``EgressBlocked`` when the guard refused the destination or a redirect, and
    ``EgressError`` for anything else (status, size, encoding, JSON, network)."""
    target = check_url(url)
    try:
        async with asyncio.timeout(timeout):
            async with session.get(
                target,
                allow_redirects=False,
                headers={"Accept": "application/json", "Accept-Encoding": "identity"},
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                if response.status != 200:
                    raise EgressError(f"http_{response.status}")
                if response.headers.get("Content-Encoding", "identity").lower() != "identity":
                    raise EgressError("encoding")
                if (response.content_length or 0) > max_bytes:
                    raise EgressError("too_large")
                body = await _read_bounded(response.content, max_bytes)
    except EgressError:
        raise
    except TimeoutError:
        raise EgressError("timeout") from None
    except (aiohttp.ClientError, OSError) as error:
        blocked = _blocked_cause(error)
        if blocked is not None:
            raise EgressBlocked(blocked.reason) from None
        raise EgressError("unreachable") from None
    document = loads_strict(body)
    if not isinstance(document, dict):
        raise EgressError("not_object")
    return document


async def _read_bounded(content: aiohttp.StreamReader, max_bytes: int) -> bytes:
    """At most ``max_bytes``; one byte more means the body is too large."""
    body = bytearray()
    while len(body) <= max_bytes:
        chunk = await content.read(max_bytes + 1 - len(body))
        if not chunk:
            break
        body += chunk
    if len(body) > max_bytes:
        raise EgressError("too_large")
    return bytes(body)
