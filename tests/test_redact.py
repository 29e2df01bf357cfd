"""The one redaction every sink uses: known values and credential shapes, counted per sink."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.redact import REPLACEMENT, Redactor

SHAPES = [
    "sk-ant-api03-" + "a" * 40,
    "sk-proj-" + "B" * 30,
    "gw_abcdef123456_" + "x" * 49,
    "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJlc2lnbmF0dXJl",
    "Bearer abcdefghijklmnopqrstuvwxyz",
    "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg\n-----END PRIVATE KEY-----",
    "AKIAABCDEFGHIJKLMNOP",
]


def test_every_credential_shape_is_replaced_and_counted() -> None:
    redactor = Redactor()
    for shape in SHAPES:
        out = redactor.redact(f"before {shape} after", "log")
        assert REPLACEMENT in out and shape not in out, shape
    assert redactor.counts["log"] == len(SHAPES)


def test_known_values_are_replaced_longest_first() -> None:
    redactor = Redactor()
    redactor.know("short-secret-1")
    redactor.know("short-secret-1-and-longer")
    assert redactor.redact("x short-secret-1-and-longer y", "span") == f"x {REPLACEMENT} y"
    assert redactor.counts["span"] == 1


def test_values_too_short_to_scrub_are_not_known() -> None:
    redactor = Redactor()
    redactor.know("abc")
    assert redactor.redact("abc abc", "log") == "abc abc"


def test_structured_values_are_redacted_inside() -> None:
    redactor = Redactor()
    redactor.know("canary-value-123")
    out = redactor.redact_value({"a": ["canary-value-123", 1], "b": {"c": "ok"}}, "audit")
    assert out == {"a": [REPLACEMENT, 1], "b": {"c": "ok"}}


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300))
def test_clean_text_passes_unchanged(text: str) -> None:
    redactor = Redactor()
    redactor.know("zzzzzzzzzzzz-known")
    out = redactor.redact(text, "log")
    if "zzzzzzzzzzzz-known" not in text and not any(
        marker in text for marker in ("gw_", "sk-", "eyJ", "earer", "EARER", "AKIA", "-----BEGIN")
    ):
        assert out == text


def test_a_secret_glued_to_a_claim_or_split_by_an_invisible_character_is_found() -> None:
    from gateway.identity import _clean
    from gateway.redact import REDACTOR
    from gateway.secret import Secret

    pool = "sk-proj-poolcredential0123456789abcd"
    Secret(pool)
    assert pool not in _clean(f"run_{pool}", 200)
    assert pool not in _clean(f"run{pool}", 200)
    gateway_key = "gw_abcdef123456_" + "k" * 43 + "abcdef"
    assert gateway_key[:30] not in _clean(f"agent_{gateway_key}", 200)
    admin = "adm-canary-token-q8w7e6r5t4y3u2i1o0p9"
    Secret(admin)
    hidden = admin[:10] + "\u200b" + admin[10:]
    assert admin not in _clean(hidden, 200)
    long_cut = "x" * 180 + gateway_key  # the limit cuts through the key
    assert "k" * 20 not in _clean(long_cut, 200)
    assert REDACTOR.counts["claim"] > 0
