"""``Authenticator``: what the LLM plane checks credentials with (``app[AUTH]``): the auth mode,
the key ring, the JWT verifier, the upstream credential pools, the admin token's hash."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.auth.jwt import JwtVerifier
    from gateway.auth.keyring import KeyRing
    from gateway.auth.pools import CredentialPools


@dataclass(slots=True)
class Authenticator:
    mode: str
    admin_token: str | None
    """The admin token: refused on LLM routes in any spelling (it must never go upstream)."""
    keys: KeyRing | None = None
    jwt: JwtVerifier | None = None
    pools: CredentialPools | None = None
    team_pools: Mapping[str, str] = field(default_factory=dict)
    open_paths: tuple[str, ...] = ()
    """``auth.open_paths`` (``create_app`` passes the config's)."""

    def open_path(self, method: str, path: str) -> bool:
        """Whether gateway credentials may call ``method path`` (a checked provider path).
        An entry is ``METHOD /path-glob`` or a bare glob, for every method."""
        for entry in self.open_paths:
            wanted, _, glob = entry.rpartition(" ")
            if (not wanted or wanted.upper() == method) and fnmatch.fnmatchcase(path, glob):
                return True
        return False
