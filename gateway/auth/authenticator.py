"""``Authenticator``: what the LLM plane checks credentials with (``app[AUTH]``): the auth mode,
the key ring, the JWT verifier, the upstream credential pools, the admin token's hash."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.credentials import hash_key

if TYPE_CHECKING:
    from gateway.auth.jwt import JwtVerifier
    from gateway.auth.keyring import KeyRing
    from gateway.auth.pools import CredentialPools
    from gateway.settings import Settings


@dataclass(slots=True)
class Authenticator:
    mode: str
    admin_hash: str | None
    """The short hash of the admin token: refused on LLM routes (it must never go upstream)."""
    keys: KeyRing | None = None
    jwt: JwtVerifier | None = None
    pools: CredentialPools | None = None
    team_pools: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        settings: Settings,
        admin_token: str | None,
        keys: KeyRing | None,
        jwt: JwtVerifier | None,
        pools: CredentialPools | None,
    ) -> Authenticator:
        return cls(
            mode=settings.auth.mode,
            admin_hash=hash_key(admin_token) if admin_token else None,
            keys=keys,
            jwt=jwt,
            pools=pools,
            team_pools=dict(settings.auth.team_pools),
        )
