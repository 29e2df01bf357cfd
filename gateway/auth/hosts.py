"""``allowed_hosts``: which ``Host`` a request may carry. A page on an attacker's domain that
resolves to this gateway (DNS rebinding) sends its own name as ``Host``: refused. Bound to
loopback with no list, the loopback names are the list; bound elsewhere with no list, any
name is accepted (a load balancer's name is not known here). Probes answer any ``Host``."""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from functools import lru_cache

LOOPBACK_NAMES = ("localhost", "localhost.", "ip6-localhost", "127.0.0.1", "::1", "[::1]")


class HostCheck:
    def __init__(self, allowed: list[str], listen_host: str) -> None:
        patterns = list(allowed)
        if not patterns and _is_loopback(listen_host):
            patterns = [*LOOPBACK_NAMES, "127.*.*.*"]
        self.any = not patterns
        self._pattern = (
            re.compile("|".join(fnmatch.translate(p.lower()) for p in patterns))
            if patterns
            else None
        )
        # One check per distinct Host (there are few): a bounded cache of answers.
        self.allows = lru_cache(maxsize=1024)(self._allows)

    def _allows(self, host: str | None) -> bool:
        if self._pattern is None:
            return True
        if not host or len(host) > 255:
            return False
        name = host.lower()
        if name.startswith("["):  # [::1]:8787
            name = name.split("]", 1)[0] + "]"
        elif name.count(":") == 1:
            name = name.split(":", 1)[0]
        return self._pattern.fullmatch(name) is not None


def _is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
