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
admin_token: from-file
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(CONFIG)
    return path


def test_defaults() -> None:
    settings = load_settings(env={})
    assert settings == Settings()
    assert settings.upstreams.openai == "https://api.openai.com/v1"
    assert settings.upstreams.anthropic == "https://api.anthropic.com"
    assert settings.admin_token is None


def test_values_from_file(config: Path) -> None:
    settings = load_settings(config, env={})
    assert (settings.host, settings.port, settings.store) == ("0.0.0.0", 9000, "memory://")
    assert settings.upstreams.openai == "http://vllm.local:8000/v1"
    assert settings.upstreams.anthropic == "http://anthropic.local"
    assert settings.timeouts.connect == 5.0
    assert settings.timeouts.idle == 300.0  # unset nested values keep their defaults
    assert settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == "from-file"
    assert "from-file" not in repr(settings)


def test_environment_overrides_file(config: Path) -> None:
    env = {
        "GATEWAY_OPENAI_UPSTREAM": "http://env-openai/v1",
        "GATEWAY_ANTHROPIC_UPSTREAM": "http://env-anthropic",
        "GATEWAY_ADMIN_TOKEN": "from-env",
        "GATEWAY_STORE": "sqlite:///env.db",
        "GATEWAY_LOG_LEVEL": "debug",
        "UNRELATED": "x",
    }
    settings = load_settings(config, env=env)
    assert settings.upstreams.openai == "http://env-openai/v1"
    assert settings.upstreams.anthropic == "http://env-anthropic"
    assert settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == "from-env"
    assert settings.store == "sqlite:///env.db"
    assert settings.log_level == "debug"
    assert settings.port == 9000  # the rest of the file still applies


def test_one_environment_upstream_keeps_the_other_from_file(config: Path) -> None:
    settings = load_settings(config, env={"GATEWAY_OPENAI_UPSTREAM": "http://env/v1"})
    assert settings.upstreams.openai == "http://env/v1"
    assert settings.upstreams.anthropic == "http://anthropic.local"


def test_environment_without_file() -> None:
    settings = load_settings(env={"GATEWAY_ANTHROPIC_UPSTREAM": "http://a"})
    assert settings.upstreams.anthropic == "http://a"
    assert settings.upstreams.openai == "https://api.openai.com/v1"


def test_empty_environment_values_are_ignored(config: Path) -> None:
    settings = load_settings(config, env={"GATEWAY_OPENAI_UPSTREAM": ""})
    assert settings.upstreams.openai == "http://vllm.local:8000/v1"


def test_process_environment_is_read_by_default(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "from-process")
    settings = load_settings(config)
    assert settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == "from-process"


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
    ["colour: blue\n", "upstreams:\n  gemini: http://g\n", "timeouts:\n  total: 5\n"],
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
        [row] = [line for line in rows if line.startswith(f"| `{'.'.join(path)}` |")]
        assert f"`{name}`" in row


def test_config_reference_cli(capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main
    from gateway.settings_reference import render

    assert main(["config", "reference"]) == 0
    assert capsys.readouterr().out == render()
