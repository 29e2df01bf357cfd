"""JWT verification against a loopback identity provider (discovery and JWKS served by an
aiohttp test server, reached through the egress guard with ``egress_allow: [127.0.0.1/32]``).

Keys are made here with ``cryptography``; time is a clock the tests move.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from gateway.auth.config import JwtIssuer
from gateway.auth.egress import egress_session
from gateway.auth.jwt import (
    MAX_TOKEN,
    REASONS,
    JwtRefused,
    JwtVerifier,
    VerifiedToken,
    looks_like_jwt,
    parse_jwks,
)
from gateway.auth.principal import AdminCaller

AUDIENCE = "gateway"
START = 1_800_000_000.0


@dataclass
class Keys:
    rsa1: rsa.RSAPrivateKey
    rsa2: rsa.RSAPrivateKey
    ec1: ec.EllipticCurvePrivateKey
    stranger: rsa.RSAPrivateKey
    """Not the IdP's: what an attacker signs with."""


@pytest.fixture(scope="module")
def keys() -> Keys:
    def rsa_key() -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    return Keys(rsa_key(), rsa_key(), ec.generate_private_key(ec.SECP256R1()), rsa_key())


def public_jwk(key: Any, kid: str | None, **extra: Any) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    if kid is not None:
        jwk["kid"] = kid
    return {**jwk, "use": "sig", **extra}


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@dataclass
class IdP:
    """What the identity provider serves; tests change it (rotation, outage)."""

    keys: list[dict[str, Any]] = field(default_factory=list)
    up: bool = True
    discovery_issuer: str | None = None
    hits: list[str] = field(default_factory=list)
    issuer: str = ""

    @property
    def jwks_fetches(self) -> int:
        return self.hits.count("/jwks")


IDP = web.AppKey("idp", IdP)


def idp_app(idp: IdP) -> web.Application:
    async def discovery(request: web.Request) -> web.Response:
        idp.hits.append(request.path)
        issuer = idp.discovery_issuer or idp.issuer
        return web.json_response({"issuer": issuer, "jwks_uri": f"{idp.issuer}/jwks"})

    async def jwks(request: web.Request) -> web.Response:
        idp.hits.append(request.path)
        if not idp.up:
            return web.json_response({"error": "maintenance"}, status=503)
        return web.json_response({"keys": idp.keys})

    app = web.Application()
    app[IDP] = idp
    app.router.add_get("/.well-known/openid-configuration", discovery)
    app.router.add_get("/jwks", jwks)
    return app


@pytest.fixture
async def idp(aiohttp_server: Any, keys: Keys) -> IdP:
    state = IdP(keys=[public_jwk(keys.rsa1, "rsa-1"), public_jwk(keys.ec1, "ec-1")])
    server: TestServer = await aiohttp_server(idp_app(state))
    state.issuer = f"http://127.0.0.1:{server.port}"
    return state


@pytest.fixture
def clock() -> Clock:
    return Clock()


def issuer_config(idp: IdP, **options: Any) -> JwtIssuer:
    return JwtIssuer(issuer=idp.issuer, audience=[AUDIENCE], **options)


Make = Callable[..., JwtVerifier]


@pytest.fixture
def make(idp: IdP, clock: Clock) -> Make:
    def build(*issuers: JwtIssuer, allow: list[str] | None = None, **options: Any) -> JwtVerifier:
        allowed = ["127.0.0.1/32"] if allow is None else allow
        return JwtVerifier(
            list(issuers) or [issuer_config(idp)],
            lambda: egress_session(allowed),
            clock,
            **options,
        )

    return build


@pytest.fixture
def verifier(make: Make) -> JwtVerifier:
    return make()


Sign = Callable[..., str]


@pytest.fixture
def sign(keys: Keys, idp: IdP, clock: Clock) -> Sign:
    """A token of the IdP: RS256 with ``rsa-1`` unless told otherwise; ``claims`` override
    the defaults (a value of None removes the claim)."""

    def make_token(
        key: Any = None, alg: str = "RS256", kid: str | None = "rsa-1", **claims: Any
    ) -> str:
        payload = {
            "iss": idp.issuer,
            "aud": AUDIENCE,
            "sub": "alice",
            "exp": int(clock.now) + 300,
            "iat": int(clock.now),
            "team": "platform",
            **claims,
        }
        payload = {name: value for name, value in payload.items() if value is not None}
        headers = {"kid": kid} if kid is not None else None
        # Signed at the JWS layer: PyJWT's JWT layer would refuse the odd claims tests send.
        return jwt.PyJWS().encode(
            json.dumps(payload).encode(), key or keys.rsa1, algorithm=alg, headers=headers
        )

    return make_token


async def refused(verifier: JwtVerifier, token: str) -> str:
    with pytest.raises(JwtRefused) as caught:
        await verifier.verify(token)
    assert caught.value.reason in REASONS
    assert token not in str(caught.value)
    return caught.value.reason


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return ".".join(
        (b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()), b64(signature))
    )


# Accepted


async def test_rs256_and_es256_tokens_of_the_issuer_are_accepted(
    verifier: JwtVerifier, sign: Sign, keys: Keys, idp: IdP
) -> None:
    rs = await verifier.verify(sign())
    es = await verifier.verify(sign(keys.ec1, alg="ES256", kid="ec-1", sub="bob"))
    assert (rs.subject, es.subject) == ("alice", "bob")
    assert rs.claims["iss"] == idp.issuer and rs.issuer.issuer == idp.issuer
    assert idp.hits == ["/.well-known/openid-configuration", "/jwks"]


async def test_a_verified_token_is_cached_until_it_expires(
    verifier: JwtVerifier, sign: Sign, clock: Clock, idp: IdP
) -> None:
    token = sign(exp=int(clock.now) + 100)
    first = await verifier.verify(token)
    assert await verifier.verify(token) is first and verifier.cached == 1
    clock.now += 100 + 61  # past exp and the 60 s leeway
    assert await refused(verifier, token) == "expired"
    assert verifier.cached == 0 and idp.jwks_fetches == 1


async def test_the_cache_is_bounded(make: Make, sign: Sign) -> None:
    verifier = make(cache_size=3)
    tokens = [sign(sub=f"user-{n}") for n in range(5)]
    for token in tokens:
        await verifier.verify(token)
    assert verifier.cached == 3


# Times


async def test_expired_and_clock_skew(verifier: JwtVerifier, sign: Sign, clock: Clock) -> None:
    exp = int(clock.now) - 30
    await verifier.verify(sign(exp=exp))  # 30 s late: within the 60 s leeway
    assert await refused(verifier, sign(exp=int(clock.now) - 61)) == "expired"
    assert await refused(verifier, sign(exp=None)) == "malformed"  # exp is required
    assert await refused(verifier, sign(exp="2100000000")) == "malformed"


async def test_not_yet_valid_and_clock_skew(
    verifier: JwtVerifier, sign: Sign, clock: Clock
) -> None:
    await verifier.verify(sign(nbf=int(clock.now) + 50))  # the IdP's clock is 50 s ahead
    assert await refused(verifier, sign(nbf=int(clock.now) + 120)) == "not_yet_valid"
    assert await refused(verifier, sign(iat=int(clock.now) + 120)) == "not_yet_valid"


async def test_the_leeway_is_the_issuers(make: Make, idp: IdP, sign: Sign, clock: Clock) -> None:
    strict = make(issuer_config(idp, leeway=0))
    assert await refused(strict, sign(exp=int(clock.now) - 1)) == "expired"
    assert await refused(strict, sign(nbf=int(clock.now) + 1)) == "not_yet_valid"


# Audience and issuer


async def test_audience_is_required_and_must_match(
    verifier: JwtVerifier, sign: Sign, idp: IdP
) -> None:
    assert await refused(verifier, sign(aud="another-service")) == "wrong_audience"
    assert await refused(verifier, sign(aud=None)) == "wrong_audience"
    assert await refused(verifier, sign(aud=[])) == "wrong_audience"
    assert await refused(verifier, sign(aud=7)) == "wrong_audience"
    assert idp.hits == []  # refused before any fetch: a forged token costs no JWKS request
    await verifier.verify(sign(aud=["another-service", AUDIENCE]))


async def test_a_token_of_another_issuer_is_refused(
    verifier: JwtVerifier, sign: Sign, idp: IdP
) -> None:
    assert await refused(verifier, sign(iss="https://elsewhere.example")) == "unknown_issuer"
    assert await refused(verifier, sign(iss=idp.issuer + "/")) == "unknown_issuer"
    assert await refused(verifier, sign(iss=None)) == "unknown_issuer"
    assert await refused(verifier, sign(iss=["x"])) == "unknown_issuer"
    assert idp.hits == []  # refused before any fetch


async def test_a_token_signed_by_another_key_is_refused(
    verifier: JwtVerifier, sign: Sign, keys: Keys
) -> None:
    assert await refused(verifier, sign(keys.stranger)) == "bad_signature"
    genuine = sign()
    header, payload, signature = genuine.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged = b64(json.dumps({**claims, "sub": "admin"}).encode())
    assert await refused(verifier, f"{header}.{forged}.{signature}") == "bad_signature"


# Algorithms


async def test_alg_none_is_refused(verifier: JwtVerifier, sign: Sign, idp: IdP) -> None:
    claims = {"iss": idp.issuer, "aud": AUDIENCE, "sub": "alice", "exp": START + 300}
    for alg in ("none", "None", "NONE", ""):
        assert await refused(verifier, unsigned({"alg": alg, "typ": "JWT"}, claims)) == (
            "algorithm"
        )
    no_alg = unsigned({"typ": "JWT", "kid": "rsa-1"}, claims, b"x" * 32)
    assert await refused(verifier, no_alg) == "algorithm"
    assert idp.hits == []


async def test_hs256_signed_with_the_public_key_is_refused(
    verifier: JwtVerifier, keys: Keys, idp: IdP
) -> None:
    """The classic confusion: the JWKS's public key used as an HMAC secret."""
    pem = keys.rsa1.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claims = {"iss": idp.issuer, "aud": AUDIENCE, "sub": "alice", "exp": START + 300}
    for alg, digest, secret in [
        ("HS256", hashlib.sha256, pem),
        ("HS256", hashlib.sha256, json.dumps(public_jwk(keys.rsa1, "rsa-1")).encode()),
        ("HS512", hashlib.sha512, pem),
    ]:
        head = unsigned({"alg": alg, "typ": "JWT", "kid": "rsa-1"}, claims).rsplit(".", 1)[0]
        mac = hmac.new(secret, head.encode(), digest).digest()
        assert await refused(verifier, f"{head}.{b64(mac)}") == "algorithm"


async def test_the_keys_own_type_and_alg_must_agree_with_the_header(
    make: Make, sign: Sign, keys: Keys, idp: IdP
) -> None:
    idp.keys = [
        public_jwk(keys.rsa1, "rsa-1", alg="RS384"),  # declared RS384 only
        public_jwk(keys.ec1, "ec-1"),
        public_jwk(keys.rsa2, "rsa-2"),
    ]
    verifier = make(issuer_config(idp, algorithms=["RS256", "RS384", "PS256", "ES256"]))
    assert await refused(verifier, sign(alg="RS256", kid="rsa-1")) == "algorithm"
    await verifier.verify(sign(alg="RS384", kid="rsa-1"))
    # An RSA signature presented under the EC key's kid.
    assert await refused(verifier, sign(alg="RS256", kid="ec-1")) == "algorithm"
    assert await refused(verifier, sign(keys.ec1, alg="ES256", kid="rsa-2")) == "algorithm"
    # A key without a declared alg serves each algorithm of its type the issuer allows.
    await verifier.verify(sign(keys.rsa2, alg="PS256", kid="rsa-2"))


async def test_only_the_issuers_algorithms_are_accepted(
    make: Make, sign: Sign, keys: Keys, idp: IdP
) -> None:
    verifier = make(issuer_config(idp, algorithms=["ES256"]))
    assert await refused(verifier, sign()) == "algorithm"
    await verifier.verify(sign(keys.ec1, alg="ES256", kid="ec-1"))


# Keys: kid, rotation, refresh limits


async def test_an_unknown_kid_refreshes_once_and_follows_a_rotation(
    verifier: JwtVerifier, sign: Sign, keys: Keys, idp: IdP, clock: Clock
) -> None:
    await verifier.verify(sign())
    assert idp.jwks_fetches == 1
    idp.keys = [public_jwk(keys.rsa2, "rsa-2")]  # the IdP rotates
    clock.now += 31
    rotated = await verifier.verify(sign(keys.rsa2, kid="rsa-2"))
    assert rotated.subject == "alice" and idp.jwks_fetches == 2
    # The withdrawn key's new tokens are refused now; its already-verified ones were cached.
    assert await refused(verifier, sign(kid="rsa-1", sub="carol")) == "unknown_kid"
    assert idp.jwks_fetches == 2  # within 30 s of the last fetch: not asked again


async def test_a_rotation_within_the_refresh_interval_waits_for_it(
    verifier: JwtVerifier, sign: Sign, keys: Keys, idp: IdP, clock: Clock
) -> None:
    await verifier.verify(sign())
    idp.keys.append(public_jwk(keys.rsa2, "rsa-2"))
    clock.now += 10
    assert await refused(verifier, sign(keys.rsa2, kid="rsa-2")) == "unknown_kid"
    clock.now += 21
    await verifier.verify(sign(keys.rsa2, kid="rsa-2"))
    assert idp.jwks_fetches == 2


async def test_a_random_kid_spray_fetches_at_most_once_per_30_seconds(
    verifier: JwtVerifier, sign: Sign, keys: Keys, idp: IdP, clock: Clock
) -> None:
    await verifier.verify(sign())
    for round_ in range(3):
        clock.now += 31
        before = idp.jwks_fetches
        for _ in range(5):  # in bursts, and over the interval
            spray = [sign(keys.stranger, kid=uuid.uuid4().hex) for _ in range(20)]
            reasons = await asyncio.gather(*(refused(verifier, t) for t in spray))
            assert set(reasons) == {"unknown_kid"}
            clock.now += 5
        assert idp.jwks_fetches == before + 1, round_


async def test_concurrent_first_verifications_share_one_fetch(
    verifier: JwtVerifier, sign: Sign, idp: IdP
) -> None:
    tokens = [sign(sub=f"user-{n}") for n in range(20)]
    verified = await asyncio.gather(*(verifier.verify(t) for t in tokens))
    assert [v.subject for v in verified] == [f"user-{n}" for n in range(20)]
    assert idp.hits == ["/.well-known/openid-configuration", "/jwks"]


async def test_without_a_kid_only_a_single_key_of_the_type_is_used(
    make: Make, sign: Sign, keys: Keys, idp: IdP
) -> None:
    idp.keys = [public_jwk(keys.rsa1, None), public_jwk(keys.ec1, None)]
    verifier = make()
    await verifier.verify(sign(kid=None))  # one RSA key
    await verifier.verify(sign(keys.ec1, alg="ES256", kid=None))  # one EC key
    idp.keys = [public_jwk(keys.rsa1, None), public_jwk(keys.rsa2, None)]
    ambiguous = make()
    assert await refused(ambiguous, sign(kid=None)) == "unknown_kid"


async def test_the_jwks_is_refreshed_when_old(
    verifier: JwtVerifier, sign: Sign, keys: Keys, idp: IdP, clock: Clock
) -> None:
    await verifier.verify(sign())
    idp.keys = [public_jwk(keys.rsa2, "rsa-2")]  # rsa-1 withdrawn
    clock.now += 3601
    assert await refused(verifier, sign(sub="later")) == "unknown_kid"
    assert idp.jwks_fetches == 2


async def test_jwks_url_skips_discovery(make: Make, sign: Sign, idp: IdP) -> None:
    verifier = make(issuer_config(idp, jwks_url=f"{idp.issuer}/jwks"))
    await verifier.verify(sign())
    assert idp.hits == ["/jwks"]


# The IdP unavailable or hostile


async def test_the_idp_down_refuses_without_crashing_and_recovers(
    verifier: JwtVerifier, sign: Sign, idp: IdP, clock: Clock
) -> None:
    idp.up = False
    assert await refused(verifier, sign()) == "jwks_unavailable"
    assert await refused(verifier, sign(sub="again")) == "jwks_unavailable"
    assert idp.jwks_fetches == 1
    idp.up = True
    clock.now += 31
    await verifier.verify(sign())


async def test_an_unreachable_jwks_is_unavailable(make: Make, sign: Sign, idp: IdP) -> None:
    closed = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = closed.sockets[0].getsockname()[1]
    closed.close()
    await closed.wait_closed()
    verifier = make(issuer_config(idp, jwks_url=f"http://127.0.0.1:{port}/jwks"))
    assert await refused(verifier, sign()) == "jwks_unavailable"


async def test_discovery_naming_another_issuer_is_not_trusted(
    verifier: JwtVerifier, sign: Sign, idp: IdP
) -> None:
    idp.discovery_issuer = "https://evil.example"
    assert await refused(verifier, sign()) == "jwks_unavailable"
    assert idp.jwks_fetches == 0


async def test_the_idp_behind_the_egress_guard_is_not_fetched_unless_allowed(
    make: Make, sign: Sign, idp: IdP
) -> None:
    verifier = make(allow=[])
    assert await refused(verifier, sign()) == "jwks_unavailable"
    assert idp.hits == []


def test_unusable_jwks_entries_are_skipped(keys: Keys) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    private = RSAAlgorithm.to_jwk(keys.rsa1, as_dict=True)
    good = public_jwk(keys.rsa1, "good")
    document = {
        "keys": [
            good,
            {**private, "kid": "private"},
            public_jwk(weak, "weak"),
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {**public_jwk(keys.rsa2, "hs"), "alg": "HS256"},
            {**public_jwk(keys.rsa2, "enc"), "use": "enc"},
            {**public_jwk(keys.rsa2, "ops"), "key_ops": ["encrypt"]},
            {"kty": "RSA", "n": 5, "e": "AQAB", "kid": "broken"},
            {"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA", "kid": "off-curve"},
            {"kty": "RSA", "kid": ["list"]},
            "not a key",
            None,
        ]
    }
    assert [key.kid for key in parse_jwks(document)] == ["good"]
    many = {"keys": [public_jwk(keys.rsa1, f"k{n}") for n in range(80)]}
    assert len(parse_jwks(many)) == 50
    with pytest.raises(ValueError):
        parse_jwks({"keys": "none"})


# Shape and size


async def test_a_huge_token_is_refused_before_it_is_parsed(verifier: JwtVerifier) -> None:
    huge = "eyJ" + "a" * MAX_TOKEN + ".b.c"
    assert await refused(verifier, huge) == "too_large"
    assert not looks_like_jwt(huge)


async def test_duplicate_claims_are_refused(verifier: JwtVerifier, idp: IdP) -> None:
    header = b64(b'{"alg": "RS256", "kid": "rsa-1"}')
    payload = b64(
        f'{{"iss": "{idp.issuer}", "aud": "{AUDIENCE}", "sub": "alice", "sub": "admin",'
        f' "exp": {START + 300}}}'.encode()
    )
    assert await refused(verifier, f"{header}.{payload}.{b64(b'sig')}") == "malformed"
    dup_header = b64(b'{"alg": "none", "alg": "RS256"}')
    assert await refused(verifier, f"{dup_header}.{payload}.{b64(b'sig')}") == "malformed"


def test_looks_like_jwt() -> None:
    assert looks_like_jwt(unsigned({"alg": "RS256"}, {"sub": "a"}, b"sig"))
    assert looks_like_jwt(unsigned({"alg": "none"}, {"sub": "a"}))  # refused later, as a JWT
    for other in [
        "gw_abc123_" + "x" * 44,
        "sk-ant-api03-xyz",
        "eyJ.a",
        "a.b.c",
        "eyJ a.b.c",
        "eyJhbGciOi.e30.sig=",
        "",
    ]:
        assert not looks_like_jwt(other), other
    assert JwtVerifier.looks_like("eyJhbGciOi.e30.c2ln")


# Claims to Principal and AdminCaller


async def test_claims_map_to_a_principal(verifier: JwtVerifier, sign: Sign, idp: IdP) -> None:
    verified = await verifier.verify(sign(scope="llm upstream:byok"))
    principal = verified.to_principal()
    tag = hashlib.sha256(f"{idp.issuer}\nalice".encode()).hexdigest()[:12]
    assert principal.id == "jwt:alice" and principal.kind == "jwt"
    assert principal.owner == f"jwt-{tag}"
    assert principal.team == "platform" and principal.pool is None
    assert principal.scopes == {"llm", "upstream:byok"}
    again = await verifier.verify(sign(iat=int(START) - 5))  # another token, same subject
    assert again.to_principal().owner == principal.owner
    bob = await verifier.verify(sign(sub="bob"))
    assert bob.to_principal().owner != principal.owner


@pytest.mark.parametrize(
    ("claims", "team", "scopes"),
    [
        ({"scope": ["llm"]}, "platform", {"llm"}),
        ({"scope": None}, "platform", {"llm"}),  # absent: the issuer's default scopes
        ({"scope": 42}, "platform", {"llm"}),  # wrong type: as absent
        ({"scope": "openid email"}, "platform", {"openid", "email"}),
        ({"scope": ["llm", 7, {"x": 1}, "x" * 500]}, "platform", {"llm"}),
        ({"team": None}, None, {"llm"}),
        ({"team": ["platform"]}, None, {"llm"}),
        ({"team": "x" * 65}, None, {"llm"}),
        ({"team": "ops\n"}, None, {"llm"}),
    ],
)
async def test_claims_of_the_wrong_type_are_ignored(
    verifier: JwtVerifier,
    sign: Sign,
    claims: dict[str, Any],
    team: str | None,
    scopes: set[str],
) -> None:
    principal = (await verifier.verify(sign(**claims))).to_principal()
    assert principal.team == team and principal.scopes == scopes


async def test_a_subject_is_never_cut_into_another(verifier: JwtVerifier, sign: Sign) -> None:
    long_a, long_b = "a" * 200 + "1", "a" * 200 + "2"
    ids = {
        (await verifier.verify(sign(sub=sub))).to_principal().id
        for sub in (long_a, long_b, "eve\nadmin", "eve admin")
    }
    assert len(ids) == 4
    assert all(len(i) <= len("jwt:") + 128 and i.isprintable() for i in ids)
    assert await refused(verifier, sign(sub=None)) == "malformed"
    assert await refused(verifier, sign(sub=12)) == "malformed"


async def test_the_principal_claim_is_the_issuers(make: Make, sign: Sign, idp: IdP) -> None:
    verifier = make(issuer_config(idp, principal_claim="email", team_claim="dept"))
    principal = (await verifier.verify(sign(email="a@example.com", dept="ml"))).to_principal()
    assert principal.id == "jwt:a@example.com" and principal.team == "ml"


@pytest.fixture
def admin_verifier(make: Make, idp: IdP) -> JwtVerifier:
    return make(
        issuer_config(
            idp,
            role_map={"gw-admins": "admin", "gw-viewers": "viewer", "gw-keys": "key-admin"},
            teams_claim="teams",
        )
    )


async def test_roles_map_to_an_admin_caller_bound_to_its_teams(
    admin_verifier: JwtVerifier, sign: Sign
) -> None:
    token = sign(roles=["gw-viewers", "gw-keys", "unrelated"], teams=["platform"])
    caller = (await admin_verifier.verify(token)).to_admin()
    assert caller == AdminCaller(
        actor="oidc:alice",
        method="oidc",
        roles=frozenset({"viewer", "key-admin"}),
        teams=frozenset({"platform"}),
    )
    assert caller.sees("platform") and not caller.sees("research") and not caller.sees(None)
    assert caller.may("keys:write") and not caller.may("audit:read")


@pytest.mark.parametrize(
    ("claims", "roles", "teams"),
    [
        ({"roles": "gw-admins"}, {"admin"}, None),  # no teams claim: every team
        ({"roles": ["gw-admins"], "teams": "research"}, {"admin"}, {"research"}),
        ({"roles": ["gw-admins"], "teams": 5}, {"admin"}, set()),  # wrong type: no team
        ({"roles": ["gw-admins"], "teams": []}, {"admin"}, set()),  # listed, none: no team
        ({"roles": ["gw-admins"], "teams": [5, None]}, {"admin"}, set()),
        ({"roles": ["nothing-mapped"]}, None, None),
        ({"roles": None}, None, None),
        ({"roles": {"gw-admins": True}}, None, None),
    ],
)
async def test_admin_mapping_edge_cases(
    admin_verifier: JwtVerifier,
    sign: Sign,
    claims: dict[str, Any],
    roles: set[str] | None,
    teams: set[str] | None,
) -> None:
    caller = (await admin_verifier.verify(sign(**claims))).to_admin()
    if roles is None:
        assert caller is None
        return
    assert caller is not None and caller.roles == roles
    assert caller.teams == (None if teams is None else frozenset(teams))


async def test_an_issuer_without_a_role_map_gives_no_admin(
    verifier: JwtVerifier, sign: Sign
) -> None:
    assert (await verifier.verify(sign(roles=["admin"]))).to_admin() is None


# Hostile input (hypothesis): nothing but JwtRefused, or a token that maps without crashing


class Background:
    """The IdP and a verifier on an event loop of their own: hypothesis drives examples from
    a plain function."""

    def __init__(self, keys: Keys) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.idp = IdP(keys=[public_jwk(keys.rsa1, "rsa-1"), public_jwk(keys.ec1, "ec-1")])
        self.server = self.run(self._start())
        self.verifier = JwtVerifier(
            [
                JwtIssuer(
                    issuer=self.idp.issuer,
                    audience=[AUDIENCE],
                    role_map={"a": "admin"},
                    teams_claim="teams",
                )
            ],
            lambda: egress_session(["127.0.0.1/32"]),
        )

    def run(self, coro: Awaitable[Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)  # type: ignore[arg-type]

    async def _start(self) -> TestServer:
        server = TestServer(idp_app(self.idp))
        await server.start_server()
        self.idp.issuer = f"http://127.0.0.1:{server.port}"
        return server

    def outcome(self, token: str) -> str:
        """``ok`` after mapping the claims, or the refusal's reason; anything else raises."""

        async def check() -> str:
            try:
                verified = await self.verifier.verify(token)
            except JwtRefused as refusal:
                return refusal.reason
            verified.to_principal()
            verified.to_admin()
            return "ok"

        return str(self.run(check()))

    def close(self) -> None:
        self.run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def background(keys: Keys) -> Iterator[Background]:
    running = Background(keys)
    yield running
    running.close()


FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@FUZZ
@given(text=st.text(max_size=MAX_TOKEN + 50) | st.text(alphabet=B64URL + ".=", max_size=400))
def test_arbitrary_text_is_refused(background: Background, text: str) -> None:
    assert background.outcome(text) in REASONS
    assert background.outcome("eyJ" + text) in REASONS


@FUZZ
@given(
    parts=st.lists(
        st.text(alphabet=B64URL, max_size=200) | st.binary(max_size=200).map(b64),
        min_size=3,
        max_size=3,
    )
)
def test_arbitrary_three_part_tokens_are_refused(background: Background, parts: list[str]) -> None:
    assert background.outcome(".".join(parts)) in REASONS
    assert background.outcome("eyJ" + ".".join(parts)) in REASONS


HEADER_FIELDS = ["alg", "kid", "typ", "crit", "jku", "b64", "x5u"]
CLAIMS = ["iss", "aud", "exp", "nbf", "iat", "sub", "team", "scope", "roles", "teams", "x"]


@FUZZ
@given(data=st.data())
def test_crafted_tokens_with_real_signatures_never_crash(
    background: Background, keys: Keys, data: st.DataObject
) -> None:
    """A valid token of the IdP with some header fields and claims replaced or removed by
    arbitrary JSON, then signed by the IdP's key (or not): verified and mapped, or refused."""
    now = int(time.time())
    signer = data.draw(st.sampled_from(["rsa", "ec", "garbage"]))
    alg, kid = {"rsa": ("RS256", "rsa-1"), "ec": ("ES256", "ec-1")}.get(signer, ("RS256", "rsa-1"))
    header: dict[str, Any] = {"alg": alg, "kid": kid}
    header.update(data.draw(st.dictionaries(st.sampled_from(HEADER_FIELDS), JSON, max_size=2)))
    payload: dict[str, Any] = {
        "iss": background.idp.issuer,
        "aud": AUDIENCE,
        "sub": "alice",
        "exp": now + 300,
        "nbf": now - 10,
        "iat": now,
        "team": "t",
        "scope": "llm",
        "roles": ["a"],
        "teams": ["t"],
    }
    payload.update(data.draw(st.dictionaries(st.sampled_from(CLAIMS), JSON, max_size=3)))
    for name in data.draw(st.sets(st.sampled_from(CLAIMS), max_size=2)):
        payload.pop(name, None)
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    if signer == "rsa":
        signature = RSAAlgorithm(RSAAlgorithm.SHA256).sign(signing_input.encode(), keys.rsa1)
    elif signer == "ec":
        signature = ECAlgorithm(ECAlgorithm.SHA256).sign(signing_input.encode(), keys.ec1)
    else:
        signature = data.draw(st.binary(max_size=300))
    assert background.outcome(f"{signing_input}.{b64(signature)}") in {"ok", *REASONS}


def test_a_refusal_carries_only_its_reason() -> None:
    refusal = JwtRefused("bad_signature")
    assert str(refusal) == "bad_signature" and refusal.args == ("bad_signature",)


def test_verified_token_is_plain_data(keys: Keys) -> None:
    issuer = JwtIssuer(issuer="https://idp.example", audience=[AUDIENCE])
    token = VerifiedToken(issuer=issuer, claims={"sub": "a"}, subject="a", expires_at=START)
    assert token.to_principal().id == "jwt:a" and token.to_principal().expires_at == START
