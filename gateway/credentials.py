"""What a request proves about its caller: the one credential that goes upstream, and the
network peer it came from.

Each provider authenticates with one header: OpenAI with ``Authorization: Bearer``, Anthropic
with ``x-api-key`` (its OAuth logins, and the Anthropic SDK 2.x, send ``Authorization``). The
gateway picks that credential, hashes exactly it (the key hash every session, rule and budget
is tied to), and forwards only it: a second credential header is dropped when it carries the
same key, and refused when it carries another (the hash and the upstream would disagree about
who is calling, and a random second key would be a fresh budget on every call).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from gateway.errors import TwoCredentials

AUTHORIZATION = "authorization"
X_API_KEY = "x-api-key"
_OWN_HEADER = {"openai": AUTHORIZATION, "anthropic": X_API_KEY}


@dataclass(slots=True, frozen=True)
class Credential:
    key_hash: str | None
    """12 hex chars of SHA-256 of the key that goes upstream; None without one."""
    drop: str | None = None
    """The credential header that does not go upstream (the provider's own one does)."""


NO_CREDENTIAL = Credential(None)


def credential(headers: Mapping[str, str], provider: str) -> Credential:
    """The credential ``provider`` authenticates with; raises ``TwoCredentials`` for two keys.

    The provider's own header wins; the other one is the credential only when it is the only
    one sent (an OAuth bearer token to Anthropic).
    """
    api_key = headers.get(X_API_KEY)
    auth = headers.get(AUTHORIZATION)
    if api_key is None:  # the usual OpenAI call: one header, nothing to drop
        return _bearer(auth) if auth else NO_CREDENTIAL
    if auth is None:  # the usual Anthropic call
        return _api_key(api_key)
    bearer, key = _token(auth), api_key.strip()
    own = _OWN_HEADER.get(provider, AUTHORIZATION)
    other = X_API_KEY if own == AUTHORIZATION else AUTHORIZATION
    if bearer and key and bearer != key:
        raise TwoCredentials()
    # One key (or an empty header beside it): the provider's own header when it carries the
    # key, else the other; the header not chosen stays here.
    if bearer and (own == AUTHORIZATION or not key):
        return Credential(hash_key(bearer), X_API_KEY)
    if key:
        return Credential(hash_key(key), AUTHORIZATION)
    return Credential(None, other)


# Callers reuse a handful of keys: one hash and one ``Credential`` each, not one per request.
@lru_cache(maxsize=4096)
def _bearer(auth: str) -> Credential:
    token = _token(auth)
    return Credential(hash_key(token)) if token else NO_CREDENTIAL


@lru_cache(maxsize=4096)
def _api_key(api_key: str) -> Credential:
    key = api_key.strip()
    return Credential(hash_key(key)) if key else NO_CREDENTIAL


def _token(auth: str) -> str:
    """A bearer token, or the whole value for another scheme (still a credential upstream)."""
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else auth.strip()


def hash_key(key: str) -> str | None:
    # surrogateescape: a header's bytes that are not UTF-8 (aiohttp keeps them as lone
    # surrogates) hash as what they are, never raise.
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:12] if key else None


@lru_cache(maxsize=1024)
def peer_trusted(peer: str | None, proxies: tuple[str, ...]) -> bool:
    """Whether the TCP peer is one of ``trusted_proxies`` (peers repeat: one check each)."""
    if peer is None or not proxies:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False  # a Unix socket or something else that is no address
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack listener's view of an IPv4 peer
    return any(address in network for network in _networks(proxies))


@lru_cache(maxsize=8)
def _networks(
    proxies: tuple[str, ...],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in proxies)
