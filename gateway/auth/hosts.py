"""``allowed_hosts``: which ``Host`` a request may carry. A page on an attacker's domain that
resolves to this gateway (DNS rebinding) sends its own name as ``Host``: refused. Bound to
loopback with no list, loopback names and addresses are the list; bound elsewhere with no
list, any name is accepted (a load balancer's name is not known here). Probes answer any
``Host``. In a pattern, ``*`` stands for one DNS label (``*.internal``)."""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache

LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})


class HostCheck:
    def __init__(self, allowed: list[str], listen_host: str) -> None:
        self.loopback_only = not allowed and is_loopback(listen_host)
        self.any = not allowed and not self.loopback_only
        self._pattern = (
            re.compile("|".join(re.escape(p.lower()).replace(r"\*", "[^.]*") for p in allowed))
            if allowed
            else None
        )
        # One check per distinct Host (there are few): a bounded cache of answers.
        self.allows = lru_cache(maxsize=1024)(self._allows)

    def _allows(self, host: str | None) -> bool:
        if self.any:
            return True
        if not host or len(host) > 255:
            return False
        name = _name(host.lower())
        if name is None:
            return False
        if self.loopback_only:
            return is_loopback(name)
        assert self._pattern is not None
        return self._pattern.fullmatch(name) is not None


def _name(host: str) -> str | None:
    """The name of a ``Host`` value without its port (``[::1]:8787`` -> ``::1``)."""
    if host.startswith("["):
        inside, bracket, rest = host[1:].partition("]")
        if not bracket or (rest and not rest[1:].isdigit()) or (rest and rest[0] != ":"):
            return None
        return inside
    name, colon, port = host.partition(":")
    if colon and not port.isdigit():
        return None
    return name


def is_loopback(host: str) -> bool:
    """A loopback name (``localhost``) or address."""
    return host.lower() in LOOPBACK_NAMES or loopback_address(host)


def loopback_address(address: str | None) -> bool:
    """A loopback address (``127.0.0.1``, ``[::1]``, ``::1%lo``); a name is not one."""
    if address is None:
        return False
    try:
        return ipaddress.ip_address(address.strip("[]").split("%")[0]).is_loopback
    except ValueError:
        return False
