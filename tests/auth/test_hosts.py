"""``allowed_hosts``: loopback names by default on loopback, any name elsewhere, globs."""

from __future__ import annotations

import pytest

from gateway.auth.hosts import HostCheck


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:8787", "127.0.0.1:8787", "[::1]:8787", "127.0.0.2"]
)
def test_loopback_names_pass_on_loopback(host: str) -> None:
    assert HostCheck([], "127.0.0.1").allows(host)


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:8787", "127.0.0.1.evil.example", "", "a" * 300,
             "localhost.evil", "[::1].evil"],
)  # fmt: skip
def test_other_names_are_refused_on_loopback(host: str) -> None:
    assert not HostCheck([], "127.0.0.1").allows(host)


def test_any_name_passes_on_another_address_without_a_list() -> None:
    assert HostCheck([], "0.0.0.0").allows("gateway.internal")


def test_a_list_with_globs() -> None:
    check = HostCheck(["gateway.example.com", "*.internal"], "0.0.0.0")
    assert check.allows("gateway.example.com:443")
    assert check.allows("GW.Internal")
    assert not check.allows("gateway.example.com.evil")
    assert not check.allows("internal")
