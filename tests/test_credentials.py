"""Credentials: the one header each provider authenticates with, its hash, and trusted peers."""

from __future__ import annotations

import re

import pytest
from multidict import CIMultiDict

from gateway.credentials import Credential, credential, peer_trusted
from gateway.errors import TwoCredentials
from tests.harness import key_hash


def _of(headers: dict[str, str], provider: str) -> Credential:
    return credential(CIMultiDict(headers), provider)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_one_credential_is_hashed_whichever_header_carries_it(provider: str) -> None:
    bearer = _of({"Authorization": "Bearer sk-test-123"}, provider)
    lower = _of({"authorization": "bearer sk-test-123"}, provider)
    api_key = _of({"x-api-key": "sk-test-123"}, provider)
    assert bearer == lower == api_key == Credential(key_hash("sk-test-123"))
    assert bearer.key_hash is not None and re.fullmatch(r"[0-9a-f]{12}", bearer.key_hash)
    assert _of({"x-api-key": "sk-other"}, provider).key_hash != bearer.key_hash


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer "}, {"x-api-key": ""}, {"x-api-key": " "}]
)
def test_no_key_no_hash(headers: dict[str, str]) -> None:
    assert _of(headers, "openai").key_hash is None
    assert _of(headers, "anthropic").key_hash is None


def test_another_scheme_is_still_the_credential_that_goes_upstream() -> None:
    basic = _of({"Authorization": "Basic dXNlcjpwYXNz"}, "openai")
    assert basic.key_hash == key_hash("Basic dXNlcjpwYXNz")


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_two_different_keys_are_refused(provider: str) -> None:
    """Finding 6: the hash came from x-api-key while OpenAI authenticated with the bearer."""
    with pytest.raises(TwoCredentials) as refused:
        _of({"Authorization": "Bearer sk-a", "x-api-key": "sk-b"}, provider)
    assert "Authorization" in refused.value.message and "x-api-key" in refused.value.message
    assert "sk-a" not in refused.value.message and "sk-b" not in refused.value.message
    assert refused.value.kind.name == "INVALID_REQUEST"


def test_the_same_key_twice_goes_in_the_providers_own_header() -> None:
    both = {"Authorization": "Bearer sk-same", "x-api-key": "sk-same"}
    assert _of(both, "openai") == Credential(key_hash("sk-same"), drop="x-api-key")
    assert _of(both, "anthropic") == Credential(key_hash("sk-same"), drop="authorization")


def test_an_empty_header_beside_a_key_is_dropped() -> None:
    assert _of({"Authorization": "Bearer sk-a", "x-api-key": ""}, "anthropic") == Credential(
        key_hash("sk-a"), drop="x-api-key"
    )
    assert _of({"Authorization": "Bearer ", "x-api-key": "sk-b"}, "openai") == Credential(
        key_hash("sk-b"), drop="authorization"
    )
    assert _of({"Authorization": "", "x-api-key": ""}, "openai") == Credential(None, "x-api-key")


@pytest.mark.parametrize(
    ("peer", "proxies", "trusted"),
    [
        ("127.0.0.1", ("127.0.0.1/32",), True),
        ("10.1.2.3", ("10.0.0.0/8", "192.168.1.5"), True),
        ("192.168.1.5", ("10.0.0.0/8", "192.168.1.5"), True),
        ("192.168.1.6", ("10.0.0.0/8", "192.168.1.5"), False),
        ("::ffff:10.0.0.1", ("10.0.0.0/8",), True),
        ("::1", ("::1/128",), True),
        ("127.0.0.1", (), False),
        (None, ("0.0.0.0/0",), False),
        ("not-an-address", ("0.0.0.0/0",), False),
    ],
)
def test_peer_trusted(peer: str | None, proxies: tuple[str, ...], trusted: bool) -> None:
    assert peer_trusted(peer, proxies) is trusted
