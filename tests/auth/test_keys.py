"""Gateway keys: the format and its checksum, the peppered digest, the stored record, and
``gateway keys hash`` (an ``auth.keys`` entry that verifies the key it was made from)."""

from __future__ import annotations

import asyncio
import io
import stat
import zlib
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from gateway.auth.config import AuthSettings, DeclaredKey
from gateway.auth.keyring import KeyRing, Verified
from gateway.auth.keys import (
    ALPHABET,
    KEY_LENGTH,
    KeyRecord,
    checksum,
    digest,
    looks_like_key,
    new_key,
    parse,
)
from gateway.cli import main
from gateway.secret import Secret
from gateway.store import MemoryStore

PEPPER = "pepper-for-tests-" + "x" * 32


def _other(char: str) -> str:
    return ALPHABET[(ALPHABET.index(char) + 1) % len(ALPHABET)]


def test_a_new_key_has_the_format_scanners_know() -> None:
    key_id, key = new_key()
    token = key.reveal()
    assert len(token) == KEY_LENGTH == 65
    assert token.startswith(f"gw_{key_id}_") and len(key_id) == 12
    assert set(token[3:15] + token[16:]) <= set(ALPHABET)
    crc = zlib.crc32(token[:59].encode())
    value = 0
    for char in token[59:]:
        value = value * 62 + ALPHABET.index(char)
    assert value == crc, "the last 6 characters are the CRC32 of the rest, in base62"
    assert parse(token) == (key_id, token[16:59])
    assert repr(key) == "Secret('**********')" and token not in f"{key} {key!r}"


def test_keys_are_not_drawn_twice_and_carry_their_entropy() -> None:
    tokens = [new_key()[1].reveal() for _ in range(200)]
    assert len({t[:15] for t in tokens}) == len({t[16:59] for t in tokens}) == 200
    # 200 secrets of 43 characters: every character of the alphabet shows up.
    assert set("".join(t[16:59] for t in tokens)) == set(ALPHABET)


def test_a_key_keeps_its_id_when_asked() -> None:
    key_id, key = new_key("AbCdEfGhIjKl")
    assert key_id == "AbCdEfGhIjKl" and parse(key.reveal()) is not None


@given(st.text(max_size=200))
def test_random_text_never_parses(text: str) -> None:
    assert parse(text) is None
    assert parse("gw_" + text) is None


@given(st.text(alphabet=ALPHABET, min_size=55, max_size=55))
def test_a_well_shaped_key_without_its_checksum_is_refused(body: str) -> None:
    token = f"gw_{body[:12]}_{body[12:]}"
    right = checksum(token)
    assert parse(token + right) == (body[:12], body[12:])
    wrong = _other(right[0]) + right[1:]
    assert parse(token + wrong) is None


@given(st.integers(min_value=0, max_value=KEY_LENGTH - 1).filter(lambda i: i not in (0, 1, 2, 15)))
def test_one_character_changed_fails_the_checksum(position: int) -> None:
    token = new_key()[1].reveal()
    typo = token[:position] + _other(token[position]) + token[position + 1 :]
    assert parse(typo) is None


@pytest.mark.parametrize(
    "token",
    [
        "",
        "gw_",
        "gw_short_secret",
        "x" * 10_000_000,  # the length is checked before anything reads the content
        "gw_" + "é" * 62,
        "gw_" + "\x00" * 62,
        "GW_" + "a" * 62,
        "gw_" + "a" * 12 + "-" + "a" * 49,
    ],
)
def test_malformed_tokens_are_none_not_errors(token: str) -> None:
    assert parse(token) is None


def test_a_key_is_recognised_by_its_prefix() -> None:
    assert looks_like_key(new_key()[1].reveal()) and looks_like_key("gw_anything")
    assert not looks_like_key("sk-ant-api03-abc") and not looks_like_key("eyJhbGciOi")


def test_the_digest_depends_on_the_pepper() -> None:
    secret = parse(new_key()[1].reveal())[1]  # type: ignore[index]
    one, other = digest(b"a" * 32, secret), digest(b"b" * 32, secret)
    assert one != other and len(one) == 64 and int(one, 16) >= 0
    assert digest(b"a" * 32, secret) == one
    assert secret not in one


def _record(**changes: object) -> KeyRecord:
    data: dict[str, object] = {
        "id": "AbCdEfGhIjKl",
        "name": "ci",
        "team": "search",
        "scopes": ("llm",),
        "models": ("claude-*",),
        "pool": None,
        "created_at": 100.0,
        "created_by": "token:abc",
        "expires_at": 200.0,
        "digest": "a" * 64,
        "previous_digest": "b" * 64,
        "previous_until": 150.0,
    }
    data.update(changes)
    return KeyRecord(**data)  # type: ignore[arg-type]


def test_a_record_round_trips_and_its_public_view_holds_no_digest() -> None:
    record = _record()
    assert KeyRecord.from_json(record.to_json()) == record
    view = record.public_view(now=120.0)
    assert view["status"] == "active" and view["id"] == "AbCdEfGhIjKl"
    assert "a" * 64 not in str(view) and "b" * 64 not in str(view)
    assert {"digest", "previous_digest"}.isdisjoint(view)
    assert record.status(200.0) == "expired"
    assert _record(revoked_at=110.0).status(120.0) == "revoked"


@pytest.mark.parametrize(
    "damage",
    [
        {"digest": "not hex"},
        {"digest": None},
        {"scopes": "llm"},
        {"expires_at": "soon"},
        {"expires_at": True},
        {"id": "../../etc"},
        {"name": 5},
    ],
)
def test_a_corrupt_record_is_refused(damage: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        KeyRecord.from_json({**_record().to_json(), **damage})
    with pytest.raises(ValueError):
        KeyRecord.from_json(["not", "a", "record"])
    data = _record().to_json()
    del data["team"]
    with pytest.raises(ValueError, match="team"):
        KeyRecord.from_json(data)


# -- gateway keys hash -------------------------------------------------------------------------
def _hash(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str, key: str = ""
) -> tuple[int, str, str]:
    monkeypatch.setenv("GATEWAY_KEY_PEPPER", PEPPER)
    monkeypatch.setattr("sys.stdin", io.StringIO(key + "\n"))
    code = main(["keys", "hash", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _verifies(snippet: str, token: str) -> bool:
    entries = yaml.safe_load(snippet)
    declared = [DeclaredKey.model_validate(entry) for entry in entries]
    ring = KeyRing(MemoryStore(), Secret(PEPPER), AuthSettings(keys=declared))
    return isinstance(asyncio.run(ring.verify(token)), Verified)


def test_keys_hash_prints_an_entry_that_verifies_and_never_the_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    token = new_key()[1].reveal()
    code, out, err = _hash(monkeypatch, capsys, "--team", "search", "--name", "ci", key=token)
    assert code == 0 and token not in out + err and token[16:59] not in out + err
    assert _verifies(out, token)
    (entry,) = yaml.safe_load(out)
    assert entry["id"] == token[3:15] and entry["team"] == "search" and entry["name"] == "ci"


def test_keys_hash_new_shows_the_key_once_beside_the_entry(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _hash(monkeypatch, capsys, "--new", "--team", "t", "--name", "n")
    assert code == 0
    (token,) = [word for word in err.split() if word.startswith("gw_")]
    assert token not in out, "the key goes to stderr, the entry to stdout"
    assert _verifies(out, token) and "will not show it again" in err


def test_keys_hash_without_a_name_leaves_an_entry_the_config_refuses(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _hash(monkeypatch, capsys, key=new_key()[1].reveal())
    assert code == 0
    with pytest.raises(ValueError):
        DeclaredKey.model_validate(yaml.safe_load(out)[0])


@pytest.mark.parametrize("typed", ["", "gw_nope", "sk-ant-api03-" + "a" * 40, "x" * 5000])
def test_keys_hash_refuses_what_is_not_a_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], typed: str
) -> None:
    code, out, err = _hash(monkeypatch, capsys, key=typed)
    assert code == 2 and out == "" and "not a gateway key" in err
    assert not typed or typed[:20] not in err, "what was typed is not echoed"


def test_keys_hash_says_what_to_set_when_the_pepper_is_weak(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GATEWAY_KEY_PEPPER", "tiny-pepper")
    monkeypatch.setattr("sys.stdin", io.StringIO(new_key()[1].reveal()))
    assert main(["keys", "hash"]) == 2
    err = capsys.readouterr().err
    assert "GATEWAY_KEY_PEPPER" in err and "32 characters" in err and "tiny-pepper" not in err


def test_keys_hash_uses_the_generated_pepper_of_the_config(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Without a configured pepper, the one generated in the config's state directory: the
    one the gateway started on that config uses."""
    monkeypatch.delenv("GATEWAY_KEY_PEPPER", raising=False)
    config = tmp_path / "gateway.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nstore: memory://\n")
    token = new_key()[1].reveal()
    monkeypatch.setattr("sys.stdin", io.StringIO(token))
    assert main(["keys", "hash", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    pepper = tmp_path / "state" / "key-pepper"
    assert stat.S_IMODE(pepper.stat().st_mode) == 0o600
    digest_line = next(line for line in out.splitlines() if "hash:" in line)
    secret = token[16:59]
    assert digest_line.split()[-1] == digest(pepper.read_text().strip().encode(), secret)
