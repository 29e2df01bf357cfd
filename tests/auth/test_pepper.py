"""The key pepper: from the environment, a file, or generated private for a single process;
refused (with what to set) where replicas or workers would each make their own."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from gateway.auth.pepper import MIN_PEPPER, PEPPER_VARIABLE, PepperMissing, load_pepper
from gateway.redact import REDACTOR
from gateway.settings import Settings

PEPPER = "an-operator-chosen-pepper-" + "p" * 20


def _settings(tmp_path: Path, **changes: object) -> Settings:
    return Settings.model_validate(
        {
            "store": f"sqlite:///{tmp_path / 'gateway.db'}",
            "state_dir": tmp_path / "state",
            **changes,
        }
    )


def test_the_environment_comes_first(tmp_path: Path) -> None:
    file = tmp_path / "pepper"
    file.write_text("f" * 40)
    settings = _settings(tmp_path, auth={"pepper_file": file})
    pepper = load_pepper(settings, workers=4, shared_store=True, env={PEPPER_VARIABLE: PEPPER})
    assert pepper.reveal() == PEPPER and PEPPER not in repr(pepper)
    assert REDACTOR.redact(f"pepper {PEPPER}", "log") == "pepper [REDACTED]"
    assert not (tmp_path / "state").exists(), "nothing generated when one is configured"


def test_a_pepper_file_serves_every_worker(tmp_path: Path) -> None:
    file = tmp_path / "pepper"
    file.write_text(f"  {PEPPER}\n")
    settings = _settings(tmp_path, auth={"pepper_file": file})
    assert load_pepper(settings, workers=8, shared_store=True, env={}).reveal() == PEPPER


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"short\n", f"shorter than {MIN_PEPPER}"),
        (b"\xff\xfe" * 40, "not text"),
        (b"x" * 10_000, "larger than"),
    ],
)
def test_a_bad_pepper_file_is_refused(tmp_path: Path, content: bytes, says: str) -> None:
    file = tmp_path / "pepper"
    file.write_bytes(content)
    with pytest.raises(PepperMissing, match=says):
        load_pepper(_settings(tmp_path, auth={"pepper_file": file}), env={})


def test_a_missing_pepper_file_says_so(tmp_path: Path) -> None:
    settings = _settings(tmp_path, auth={"pepper_file": tmp_path / "absent"})
    with pytest.raises(PepperMissing, match="cannot be read"):
        load_pepper(settings, env={})


def test_a_short_pepper_in_the_environment_is_refused_unshown(tmp_path: Path) -> None:
    with pytest.raises(PepperMissing) as refused:
        load_pepper(_settings(tmp_path), env={PEPPER_VARIABLE: "tiny-value"})
    assert "tiny-value" not in str(refused.value) and PEPPER_VARIABLE in str(refused.value)


def test_a_single_process_generates_one_privately_and_keeps_it(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    first = load_pepper(settings, env={})
    path = tmp_path / "state" / "key-pepper"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert len(first) >= MIN_PEPPER
    assert load_pepper(settings, env={}) == first, "read again on the next start"


def test_the_state_dir_defaults_beside_the_sqlite_store(tmp_path: Path) -> None:
    settings = Settings(store=f"sqlite:///{tmp_path / 'data' / 'gateway.db'}")
    load_pepper(settings, env={})
    assert (tmp_path / "data" / "gateway-state" / "key-pepper").exists()


@pytest.mark.parametrize(
    ("workers", "shared", "store", "says"),
    [
        (2, False, None, "2 worker processes"),
        (1, True, None, "a store shared by replicas"),
        (1, False, "redis://cache:6379/0", "a store shared by replicas"),
    ],
)
def test_more_than_one_process_needs_a_configured_pepper(
    tmp_path: Path, workers: int, shared: bool, store: str | None, says: str
) -> None:
    settings = _settings(tmp_path)
    if store is not None:
        settings = settings.model_copy(update={"store": store})
    with pytest.raises(PepperMissing, match=says) as refused:
        load_pepper(settings, workers=workers, shared_store=shared, env={})
    assert PEPPER_VARIABLE in str(refused.value) and "pepper_file" in str(refused.value)
    assert not (tmp_path / "state").exists(), "none generated"


def test_an_unwritable_state_dir_is_a_clear_refusal(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    settings = _settings(tmp_path, state_dir=blocker / "state")
    with pytest.raises(PepperMissing, match="state directory"):
        load_pepper(settings, env={})
