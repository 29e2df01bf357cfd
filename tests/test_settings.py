"""load_settings: file, then GATEWAY_* environment, then explicit overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.settings import Settings, load_settings

CONFIG = """\
host: 0.0.0.0
port: 9000
store: memory://
upstreams:
  openai: http://vllm.local:8000/v1
  anthropic: http://anthropic.local
timeouts:
  connect: 5
admin_token: file:{token_file}
"""
FILE_TOKEN = "from-file-Qx2Lr9vKp4Wm8Zt3Nc6Hy1Bd5F"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """The config file, its admin token by reference to a file beside it."""
    token_file = tmp_path / "admin-token"
    token_file.write_text(FILE_TOKEN + "\n")
    path = tmp_path / "gateway.yaml"
    path.write_text(CONFIG.format(token_file=token_file))
    return path


def test_defaults() -> None:
    settings = load_settings(env={})
    assert settings == Settings()
    assert settings.upstreams["openai"].url == "https://api.openai.com/v1"
    assert settings.upstreams["anthropic"].url == "https://api.anthropic.com"
    assert settings.admin_token is None


def test_values_from_file(config: Path) -> None:
    settings = load_settings(config, env={})
    assert (settings.host, settings.port, settings.store) == ("0.0.0.0", 9000, "memory://")
    assert settings.upstreams["openai"].url == "http://vllm.local:8000/v1"
    assert settings.upstreams["anthropic"].url == "http://anthropic.local"
    assert settings.timeouts.connect == 5.0
    assert settings.timeouts.idle == 300.0  # unset nested values keep their defaults
    assert settings.admin_token is not None
    assert settings.admin_token.reveal() == FILE_TOKEN
    assert "from-file" not in repr(settings) and "from-file" not in str(settings.admin_token)


def test_environment_overrides_file(config: Path) -> None:
    env = {
        "GATEWAY_OPENAI_UPSTREAM": "http://env-openai/v1",
        "GATEWAY_ANTHROPIC_UPSTREAM": "http://env-anthropic",
        "GATEWAY_ADMIN_TOKEN": "from-env-Kq3Rw6Tz1Yx4Nm7P",
        "GATEWAY_STORE": "sqlite:///env.db",
        "GATEWAY_LOG_LEVEL": "debug",
        "UNRELATED": "x",
    }
    settings = load_settings(config, env=env)
    assert settings.upstreams["openai"].url == "http://env-openai/v1"
    assert settings.upstreams["anthropic"].url == "http://env-anthropic"
    assert settings.admin_token is not None
    assert settings.admin_token.reveal() == "from-env-Kq3Rw6Tz1Yx4Nm7P"
    assert settings.store == "sqlite:///env.db"
    assert settings.log_level == "debug"
    assert settings.port == 9000  # the rest of the file still applies


@pytest.mark.parametrize(
    ("written", "refused"),
    [
        ("s3cret-admin-Qx2Lr9vKp4Wm8Zt3Nc6Hy1Bd5F", "written as a reference"),
        ("env:NOT_SET_ANYWHERE", "NOT_SET_ANYWHERE is not set"),
        ("file:/nonexistent/admin-token", "admin_token"),
    ],
    ids=["inline", "unset-variable", "missing-file"],
)
def test_a_config_file_names_the_admin_token_never_holds_it(
    tmp_path: Path, written: str, refused: str
) -> None:
    """A config file is kept in git or a ConfigMap: the token in it would travel with it."""
    path = tmp_path / "gateway.yaml"
    path.write_text(f"admin_token: {written}\n")
    with pytest.raises(ValueError, match=refused) as caught:
        load_settings(path, env={})
    if not written.startswith(("env:", "file:")):
        assert written not in str(caught.value)
    env = {"THE_TOKEN": "from-variable-Qx2Lr9vKp4Wm8Zt3Nc6Hy1B"}
    path.write_text("admin_token: env:THE_TOKEN\n")
    token = load_settings(path, env=env).admin_token
    assert token is not None and token.reveal() == env["THE_TOKEN"]


def test_one_environment_upstream_keeps_the_other_from_file(config: Path) -> None:
    settings = load_settings(config, env={"GATEWAY_OPENAI_UPSTREAM": "http://env/v1"})
    assert settings.upstreams["openai"].url == "http://env/v1"
    assert settings.upstreams["anthropic"].url == "http://anthropic.local"


def test_environment_without_file() -> None:
    settings = load_settings(env={"GATEWAY_ANTHROPIC_UPSTREAM": "http://a"})
    assert settings.upstreams["anthropic"].url == "http://a"
    assert settings.upstreams["openai"].url == "https://api.openai.com/v1"


def test_empty_environment_values_are_ignored(config: Path) -> None:
    settings = load_settings(config, env={"GATEWAY_OPENAI_UPSTREAM": ""})
    assert settings.upstreams["openai"].url == "http://vllm.local:8000/v1"


def test_process_environment_is_read_by_default(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "from-process-Kq3Rw6Tz1Yx4")
    settings = load_settings(config)
    assert settings.admin_token is not None
    assert settings.admin_token.reveal() == "from-process-Kq3Rw6Tz1Yx4"


def test_overrides_beat_environment_and_none_is_ignored(config: Path) -> None:
    settings = load_settings(
        config, env={"GATEWAY_STORE": "sqlite:///env.db"}, store="memory://", port=None, host=None
    )
    assert settings.store == "memory://"
    assert (settings.host, settings.port) == ("0.0.0.0", 9000)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_settings(path, env={}) == Settings()


@pytest.mark.parametrize(
    "text",
    [
        "colour: blue\n",
        "upstreams:\n  gemini: {url: http://g, region: eu}\n",
        "timeouts:\n  total: 5\n",
    ],
)
def test_unknown_keys_are_rejected(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValidationError, match="extra"):
        load_settings(path, env={})


def test_unknown_override_is_rejected() -> None:
    with pytest.raises(ValidationError):
        load_settings(env={}, colour="blue")


def test_invalid_values_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("timeouts:\n  idle: 0\n")
    with pytest.raises(ValidationError):
        load_settings(path, env={})


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        load_settings(path, env={})


def test_config_reference_doc_is_generated_from_the_settings() -> None:
    from gateway.settings_reference import render

    doc = Path(__file__).resolve().parents[1] / "docs" / "config-reference.md"
    assert doc.read_text() == render(), f"run: uv run gateway config reference > {doc}"


def test_config_reference_lists_every_key_described_with_its_variable() -> None:
    from gateway.settings import _ENV
    from gateway.settings_reference import keys, render

    text = render()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    paths = [path for path, _ in keys()]
    assert len(rows) == len(paths) and "timeouts.client_body" in paths
    assert [line for line in rows if line.endswith("|  |")] == [], "a key without a docstring"
    for name, path in _ENV.items():
        # One row stands for every upstream: its variables say which one they set.
        shown = ("upstreams", "<name>", *path[2:]) if path[0] == "upstreams" else path
        [row] = [line for line in rows if line.startswith(f"| `{'.'.join(shown)}` |")]
        assert f"`{name}`" in row


def test_config_reference_cli(capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main
    from gateway.settings_reference import render

    assert main(["config", "reference"]) == 0
    assert capsys.readouterr().out == render()


# The upstreams: a plain URL or a mapping, the two built-in ones always there, and the
# mistakes a config can make refused at load, each at its own place.

RESILIENT = """\
upstream_retries: 4
upstreams:
  anthropic:
    url: https://api.anthropic.com
    retry:       {attempts: 3, backoff_base: 0.2, backoff_max: 5, budget_ratio: 0.2}
    breaker:     {failures: 5, open: 30}
    concurrency:
      {max: 256, min: 8, adaptive: true, queue: 1024, queue_timeout: 30, session_share: 0.25}
    fallback:    {upstream: anthropic-backup, models: {"claude-sonnet-4-5": "claude-sonnet-4-5"}}
  anthropic-backup:
    {url: https://backup.example, provider: anthropic, pass_client_credentials: true}
  openai: http://vllm.local:8000/v1
drain_timeout: 20
"""


def load_text(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Settings:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return load_settings(path, env=env or {})


def problems(tmp_path: Path, text: str) -> list[tuple[str, str]]:
    """Each error as (where, message), where dotted as ``gateway config check`` says it."""
    with pytest.raises(ValidationError) as caught:
        load_text(tmp_path, text)
    return [(".".join(map(str, e["loc"])), e["msg"]) for e in caught.value.errors()]


def test_the_issue_example_loads_with_every_setting(tmp_path: Path) -> None:
    settings = load_text(tmp_path, RESILIENT)
    anthropic = settings.upstreams["anthropic"]
    assert anthropic.provider == "anthropic" and anthropic.retry.attempts == 3
    assert (anthropic.breaker.failures, anthropic.breaker.open) == (5, 30.0)
    assert (anthropic.concurrency.min, anthropic.concurrency.max) == (8, 256)
    assert anthropic.fallback is not None and anthropic.fallback.upstream == "anthropic-backup"
    assert anthropic.fallback.models == {"claude-sonnet-4-5": "claude-sonnet-4-5"}
    backup = settings.upstreams["anthropic-backup"]
    assert backup.provider == "anthropic" and backup.pass_client_credentials
    assert settings.drain_timeout == 20.0


def test_a_plain_url_is_the_mapping_with_every_default(tmp_path: Path) -> None:
    settings = load_text(tmp_path, RESILIENT)
    openai = settings.upstreams["openai"]
    assert openai.url == "http://vllm.local:8000/v1" and openai.provider == "openai"
    assert openai.breaker.enabled and openai.fallback is None
    assert openai.concurrency == type(openai.concurrency)()


def test_upstream_retries_is_the_default_attempts_plus_one(tmp_path: Path) -> None:
    settings = load_text(tmp_path, RESILIENT)
    assert settings.upstreams["openai"].retry.attempts == 5  # upstream_retries: 4
    assert settings.upstreams["anthropic-backup"].retry.attempts == 5
    assert settings.upstreams["anthropic"].retry.attempts == 3  # its own, kept
    assert Settings().upstreams["openai"].retry.attempts == 3  # the default 2, plus one
    zero = load_text(tmp_path, "upstream_retries: 0\n")
    assert zero.upstreams["anthropic"].retry.attempts == 1


def test_the_environment_sets_only_the_url_and_keeps_the_mapping(tmp_path: Path) -> None:
    env = {"GATEWAY_ANTHROPIC_UPSTREAM": "http://env-anthropic", "GATEWAY_OPENAI_UPSTREAM": ""}
    # The backup is on another host already, with pass_client_credentials.
    settings = load_text(tmp_path, RESILIENT, env)
    anthropic = settings.upstreams["anthropic"]
    assert anthropic.url == "http://env-anthropic"
    assert anthropic.retry.attempts == 3 and anthropic.breaker.failures == 5
    assert anthropic.fallback is not None and anthropic.fallback.upstream == "anthropic-backup"
    plain = load_text(tmp_path, RESILIENT, {"GATEWAY_OPENAI_UPSTREAM": "http://env/v1"})
    assert plain.upstreams["openai"].url == "http://env/v1"  # was a plain URL in the file
    assert plain.upstreams["openai"].retry.attempts == 5


def test_a_built_in_upstream_tuned_without_a_url_keeps_its_own(tmp_path: Path) -> None:
    settings = load_text(tmp_path, "upstreams:\n  anthropic:\n    breaker: {failures: 2}\n")
    assert settings.upstreams["anthropic"].url == "https://api.anthropic.com"
    assert settings.upstreams["anthropic"].breaker.failures == 2
    assert settings.upstreams["openai"].url == "https://api.openai.com/v1"


def test_the_earlier_drain_name_still_loads(tmp_path: Path) -> None:
    assert load_text(tmp_path, "timeouts:\n  drain: 12\n").drain_timeout == 12.0


def test_an_unknown_fallback_is_refused_naming_the_upstreams(tmp_path: Path) -> None:
    text = "upstreams:\n  openai:\n    url: http://a/v1\n    fallback: {upstream: nowhere}\n"
    [(where, message)] = problems(tmp_path, text)
    assert where == "upstreams.openai.fallback.upstream"
    assert message == "no upstream named 'nowhere' (there are: anthropic, openai)"


def test_a_fallback_of_another_provider_is_refused(tmp_path: Path) -> None:
    text = (
        "upstreams:\n  openai:\n    url: https://x.example\n    fallback: {upstream: anthropic}\n"
    )
    [(where, message)] = problems(tmp_path, text)
    assert where == "upstreams.openai.fallback.upstream"
    assert message == "anthropic speaks the anthropic API, openai the openai API"


def test_an_upstream_cannot_be_its_own_fallback(tmp_path: Path) -> None:
    text = "upstreams:\n  openai:\n    url: http://a/v1\n    fallback: {upstream: openai}\n"
    assert problems(tmp_path, text) == [
        ("upstreams.openai.fallback.upstream", "an upstream cannot be its own fallback")
    ]


def test_a_fallback_on_another_host_needs_pass_client_credentials(tmp_path: Path) -> None:
    text = """\
upstreams:
  openai:
    fallback: {upstream: spare}
  spare: {url: "https://spare.example/v1", provider: openai}
"""
    [(where, message)] = problems(tmp_path, text)
    assert where == "upstreams.openai.fallback.upstream"
    # Says why: the client's own key would go to that host.
    assert "spare is on another host (spare.example)" in message
    assert "carries the client's own credential there" in message
    assert "pass_client_credentials: true on upstreams.spare" in message
    allowed = text.replace("provider: openai}", "provider: openai, pass_client_credentials: true}")
    assert load_text(tmp_path, allowed).upstreams["spare"].pass_client_credentials


def test_a_fallback_on_the_same_host_needs_no_permission(tmp_path: Path) -> None:
    text = """\
upstreams:
  openai:
    fallback: {upstream: second-account}
  second-account: {url: "https://api.openai.com:443/v1", provider: openai}
"""
    assert load_text(tmp_path, text).upstreams["openai"].fallback is not None


def test_an_extra_upstream_must_say_its_provider(tmp_path: Path) -> None:
    assert problems(tmp_path, "upstreams:\n  local: http://localhost:8000/v1\n") == [
        ("upstreams.local", "say which API it speaks: provider: openai or anthropic")
    ]


def test_a_built_in_upstream_speaks_its_own_api(tmp_path: Path) -> None:
    text = "upstreams:\n  openai: {url: http://a/v1, provider: anthropic}\n"
    assert problems(tmp_path, text) == [
        ("upstreams.openai.provider", "openai speaks the openai API")
    ]


def test_concurrency_floor_above_its_ceiling_is_refused(tmp_path: Path) -> None:
    text = "upstreams:\n  openai:\n    concurrency: {min: 10, max: 5}\n"
    [(where, message)] = problems(tmp_path, text)
    assert where == "upstreams.openai.concurrency"
    assert "concurrency.min (10) is above concurrency.max (5)" in message


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("upstreams:\n  openai: ftp://x\n", "upstreams.openai.url"),
        ("upstreams:\n  openai: https://user:pw@x/v1\n", "upstreams.openai.url"),
        ("upstreams:\n  openai:\n    retry: {attempts: 0}\n", "upstreams.openai.retry.attempts"),
        ("upstreams:\n  openai:\n    breaker: {flaky: 1}\n", "upstreams.openai.breaker.flaky"),
        ("upstreams: [a, b]\n", "upstreams"),
        ("upstreams:\n  Bad/Name: {url: http://x, provider: openai}\n", "upstreams.Bad/Name"),
    ],
)
def test_bad_upstream_values_are_refused_where_they_are(
    tmp_path: Path, text: str, where: str
) -> None:
    assert where in [found for found, _ in problems(tmp_path, text)]


def test_every_upstream_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = """\
upstreams:
  openai:
    fallback: {upstream: nowhere}
  anthropic:
    fallback: {upstream: openai}
  local: http://localhost:8000/v1
"""
    assert sorted(where for where, _ in problems(tmp_path, text)) == [
        "upstreams.anthropic.fallback.upstream",
        "upstreams.local",
        "upstreams.openai.fallback.upstream",
    ]


@pytest.mark.parametrize(
    "upstream",
    [
        {"url": "https://x.example/v1", "breaker": {"open": float("inf")}},
        {"url": "https://x.example/v1", "retry": {"backoff_max": float("nan")}},
        {"url": "https://x.example/v1", "concurrency": {"queue_timeout": 1e308}},
        {"url": "https://x.example:99999/v1"},
        {"url": "https://x.example/v1?key=secret"},
        {"url": "ftp://x.example/v1"},
    ],
)
def test_hostile_upstream_settings_are_refused(upstream: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Settings.model_validate({"upstreams": {"openai": upstream}})
