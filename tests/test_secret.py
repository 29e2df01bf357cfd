"""``Secret``: masked wherever it is shown, refused wherever it would be serialised, compared in
constant time, and known to the redactor from the moment it exists."""

from __future__ import annotations

import json
import pickle

import pytest
from pydantic import BaseModel

from gateway.redact import REDACTOR
from gateway.secret import MASK, Secret

VALUE = "canary-secret-7f3e9a1c2b4d"


class Holder(BaseModel):
    token: Secret


def test_it_prints_masked_everywhere() -> None:
    secret = Secret(VALUE)
    for shown in (repr(secret), str(secret), f"{secret}", f"{secret!r}", "{}".format(secret)):  # noqa: UP032
        assert VALUE not in shown
        assert MASK in shown
    assert VALUE not in repr(Holder(token=secret))


def test_it_is_never_serialised() -> None:
    secret = Secret(VALUE)
    with pytest.raises(TypeError):
        pickle.dumps(secret)
    with pytest.raises(TypeError):
        json.dumps(secret)
    with pytest.raises(ValueError, match="cannot be serialised"):
        Holder(token=secret).model_dump_json()
    assert Holder(token=secret).model_dump()["token"] is not VALUE  # the Secret itself


def test_it_compares_with_strings_and_secrets_and_hashes_nothing_of_the_value() -> None:
    assert Secret(VALUE) == VALUE
    assert Secret(VALUE) == Secret(VALUE)
    assert Secret(VALUE) != VALUE + "x"
    assert hash(Secret(VALUE)) == hash(Secret("y" * len(VALUE)))
    assert Secret(VALUE).reveal() == VALUE


def test_a_secret_is_scrubbed_by_the_redactor_once_made() -> None:
    Secret(VALUE)
    assert REDACTOR.redact(f"token={VALUE}!", "log") == "token=[REDACTED]!"
