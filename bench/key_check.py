"""What checking a caller's credential costs: ``KeyRing.verify`` and ``JwtVerifier.verify`` in
microseconds per call.

    uv run python bench/key_check.py [--repeat 5]

Each check is timed with ``timeit`` (``autorange``, then the best of ``--repeat`` runs) on the
objects the gateway builds: a ``KeyRing`` over a ``MemoryStore`` (keys made by
``KeyRing.create``, or declared in ``auth.keys``), and a ``JwtVerifier`` whose issuer's JWKS
is served by a small aiohttp server on 127.0.0.1 and fetched once, before the timing, through
the egress guard. The checks timed never wait for I/O: each call's coroutine is run to its end
in place, so what is timed is the check, not the event loop's scheduling (a call that did wait
stops the run with an error). The clocks are frozen, so a cached entry never lapses mid-run.
Timing is reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import secrets
import sys
import timeit
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from gateway.auth.config import AuthSettings, DeclaredKey, JwtIssuer
from gateway.auth.egress import egress_session
from gateway.auth.jwt import JwtVerifier
from gateway.auth.keyring import KeyRing, KeySpec, Refusal, Verified
from gateway.auth.keys import digest, new_key, parse
from gateway.auth.principal import AdminCaller
from gateway.secret import Secret
from gateway.store.memory import MemoryStore

NOW: Final = 1_800_000_000.0
"""The frozen clock every check reads."""
AUDIENCE: Final = "gateway"
REPEAT: Final = 5
T = TypeVar("T")


def completed(call: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine run to its end in place; RuntimeError if it waits for I/O
    (then it is not the check alone that would be timed)."""
    try:
        call.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    call.close()
    raise RuntimeError("the check waited for I/O: it cannot be timed in place")


@dataclass(frozen=True, slots=True)
class Case:
    what: str
    call: Callable[[], object]
    note: str = ""


@dataclass(frozen=True, slots=True)
class Timing:
    case: Case
    per_call_us: float
    calls: int


def time_case(case: Case, repeat: int) -> Timing:
    timer = timeit.Timer(case.call)
    number, _ = timer.autorange()  # enough calls for 0.2 s a run
    best = min(timer.repeat(repeat=repeat, number=number))
    return Timing(case, best / number * 1e6, number * repeat)


# -- gateway keys ------------------------------------------------------------------------------
ADMIN: Final = AdminCaller(actor="bench", method="token", roles=frozenset({"admin"}))


def ring(
    store: MemoryStore, pepper: Secret, key_cache: float, declared: Sequence[DeclaredKey] = ()
) -> KeyRing:
    auth = AuthSettings(mode="keys", key_cache=key_cache, keys=list(declared))
    return KeyRing(store, pepper, auth, clock=lambda: NOW)


def declared_key(pepper: Secret) -> tuple[DeclaredKey, str]:
    """A key of ``auth.keys`` (by its hash, as ``gateway keys hash`` writes it) and the key."""
    key_id, token = new_key()
    parsed = parse(token.reveal())
    assert parsed is not None  # new_key makes well-formed keys
    hashed = digest(pepper.reveal().encode(), parsed[1])
    return DeclaredKey(id=key_id, hash=hashed, name="bench", team="bench"), token.reveal()


def wrong_secret(token: str) -> str:
    """``token``'s id with another secret and a right checksum: it reaches the HMAC compare."""
    parsed = parse(token)
    assert parsed is not None
    return new_key(parsed[0])[1].reveal()


async def key_cases() -> list[Case]:
    pepper = Secret(secrets.token_urlsafe(48))
    declared, declared_token = declared_key(pepper)
    store = MemoryStore()  # both rings read the key made here, as replicas share a store
    cached, uncached = ring(store, pepper, 1.0), ring(store, pepper, 0.0, [declared])
    _, token = await cached.create(KeySpec(team="bench", name="bench"), ADMIN)
    stored = token.reveal()
    unknown = new_key()[1].reveal()
    wrong = wrong_secret(stored)
    parsed = parse(stored)
    assert parsed is not None
    secret = parsed[1]
    pepper_bytes = pepper.reveal().encode()

    def verify(keyring: KeyRing, presented: str, ok: bool) -> Callable[[], object]:
        answer = completed(keyring.verify(presented))
        expected = Verified if ok else Refusal
        if not isinstance(answer, expected):
            raise RuntimeError(f"expected {expected.__name__}, got {answer!r}")
        return lambda: completed(keyring.verify(presented))

    return [
        Case("HMAC-SHA256 of a secret (digest)", lambda: digest(pepper_bytes, secret), "floor"),
        Case("KeyRing.verify, cached", verify(cached, stored, True), "key_cache 1 s (default)"),
        Case(
            "KeyRing.verify, not cached",
            verify(uncached, stored, True),
            "key_cache 0: store lookup, record decoded",
        ),
        Case(
            "KeyRing.verify, not cached, declared",
            verify(uncached, declared_token, True),
            "key_cache 0, a key of auth.keys",
        ),
        Case("KeyRing.verify, wrong secret", verify(cached, wrong, False), "refused (invalid)"),
        Case("KeyRing.verify, unknown id", verify(cached, unknown, False), "refused (invalid)"),
    ]


# -- JWTs ----------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def identity_provider(jwks: dict[str, Any]) -> AsyncIterator[str]:
    """An issuer on 127.0.0.1 serving ``jwks``; yields its URL."""

    async def serve_jwks(request: web.Request) -> web.Response:
        return web.json_response(jwks)

    app = web.Application()
    app.router.add_get("/jwks", serve_jwks)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        public: dict[str, Any] = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        public = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**public, "kid": kid, "use": "sig"}


async def jwt_cases(
    url: str, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> list[Case]:
    """Tokens of the issuer at ``url``, signed with the keys its JWKS holds."""
    issuer = JwtIssuer(issuer=url, audience=[AUDIENCE], jwks_url=f"{url}/jwks")

    def verifier(cache_size: int) -> JwtVerifier:
        return JwtVerifier(
            [issuer], lambda: egress_session(["127.0.0.1/32"]), lambda: NOW, cache_size=cache_size
        )

    claims: dict[str, Any] = {"iss": url, "aud": AUDIENCE, "sub": "agent-1", "team": "bench"}
    claims |= {"iat": int(NOW), "exp": int(NOW) + 3600}
    rs256 = jwt.encode(claims, rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    es256 = jwt.encode(claims, ec_key, algorithm="ES256", headers={"kid": "ec-1"})
    cached, uncached = verifier(1000), verifier(0)
    for checker in (cached, uncached):
        await checker.verify(rs256)  # fetches the JWKS (the one call that waits for I/O)
    return [
        Case("JwtVerifier.verify, cached", lambda: completed(cached.verify(rs256)), "RS256"),
        Case(
            "JwtVerifier.verify, not cached",
            lambda: completed(uncached.verify(rs256)),
            "RS256 2048: signature checked, JWKS held",
        ),
        Case(
            "JwtVerifier.verify, not cached",
            lambda: completed(uncached.verify(es256)),
            "ES256 P-256: signature checked, JWKS held",
        ),
    ]


# -- main ------------------------------------------------------------------------------------
def table(timings: Sequence[Timing]) -> str:
    header = ("check", "us/call", "calls", "what")
    rows = [(t.case.what, f"{t.per_call_us:.2f}", str(t.calls), t.case.note) for t in timings]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.rjust(width) if i in (1, 2) else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in (header, *rows)
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def machine_line() -> str:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"machine: nproc={os.cpu_count()}  cpu={model}  python={platform.python_version()}"


async def run(repeat: int) -> list[Timing]:
    cases = await key_cases()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    jwks = {"keys": [jwk(rsa_key, "rsa-1"), jwk(ec_key, "ec-1")]}
    async with identity_provider(jwks) as url:
        cases += await jwt_cases(url, rsa_key, ec_key)
        return [time_case(case, repeat) for case in cases]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--repeat", type=int, default=REPEAT, help=f"timed runs per check, best kept ({REPEAT})"
    )
    args = parser.parse_args(argv)
    print(machine_line())
    print(f"timeit: best of {args.repeat} runs of about 0.2 s each, per check\n")
    print(table(asyncio.run(run(max(1, args.repeat)))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
