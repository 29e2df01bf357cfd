"""Gateway settings: defaults, then the config file, then environment, then the command line."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator


class Upstreams(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    openai: str = "https://api.openai.com/v1"
    """Where the OpenAI routes go. Any OpenAI-compatible server (vLLM, Ollama, ...) works
    here; include its /v1."""
    anthropic: str = "https://api.anthropic.com"
    """Where the Anthropic routes go (without /v1)."""


class Timeouts(BaseModel):
    """Seconds."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    connect: float = Field(10.0, gt=0)
    """To open a connection to the upstream (retried, see ``upstream_retries``)."""
    first_byte: float = Field(600.0, gt=0)
    """Until the upstream's response headers arrive (a long non-streamed answer)."""
    idle: float = Field(300.0, gt=0)
    """Between two chunks of a response."""
    client_body: float = Field(30.0, gt=0)
    """To receive a client's whole request body; a slower client is answered 408 and its
    connection closed, so slow or stalled uploads cannot hold connections for ever."""
    drain: float = Field(25.0, gt=0)
    """On SIGTERM or SIGINT, how long the requests in flight may run on to their end before
    they are cut (Kubernetes sends SIGKILL 30 s after SIGTERM by default)."""


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    host: str = "127.0.0.1"
    """Listen address. Any but a loopback one needs ``admin_token``."""
    port: int = 8787
    """Listen port."""
    store: str = "sqlite:///gateway.db"
    """Session state: ``sqlite:///relative.db``, ``sqlite:////absolute.db`` (kept across
    restarts, created 0600) or ``memory://`` (one process, the least recently used sessions
    forgotten past 100,000)."""
    policy: Path | None = None
    """The policy file (YAML); without one, the packaged default policy."""
    policy_poll_interval: float = Field(1.0, gt=0)
    """How often the policy file is checked for changes (SIGHUP reloads at once)."""
    audit_log: Path | None = None
    """JSON lines: policy loads and refusals, grants, session ends (created 0600)."""
    upstreams: Upstreams = Upstreams()
    timeouts: Timeouts = Timeouts()
    max_body_bytes: int = Field(64 * 1024 * 1024, gt=0)
    """The largest request body read; larger is answered 413."""
    upstream_retries: int = Field(2, ge=0)
    """Retries of a call whose connection to the upstream could not be opened (nothing sent)."""
    upstream_connections: int = Field(256, ge=1)
    """Open connections to the upstreams, all of them together; more calls wait for one."""
    max_client_connections: int = Field(4096, ge=1)
    """Open client connections; past it a new connection gets a 503 with ``Retry-After`` and
    is closed (the cap protects the process; ``timeouts.client_body`` frees the slots)."""
    max_header_bytes: int = Field(32768, ge=1024)
    """One request header line (and the request line) at most; larger is answered 431."""
    trusted_proxies: list[str] = []
    """CIDRs of reverse proxies whose policy ``team_header`` is believed; from any other peer
    it is ignored. (``X-Forwarded-For`` decides nothing: the admin API's loopback check reads
    the TCP peer.)"""
    admin_token: SecretStr | None = None
    """Bearer token for the admin API (``Authorization: Bearer <token>``). Without one, admin
    writes are accepted only from a loopback peer, and serving on a non-loopback address is
    refused."""
    metrics_auth: bool = False
    """``GET /metrics`` needs the admin token too."""
    log_level: str = "info"
    """``debug``, ``info``, ``warning`` or ``error``."""
    log_format: Literal["json", "text"] = "json"
    """``json``: one object per line (with one line per request); ``text`` for a terminal."""

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split_proxies(cls, value: Any) -> Any:
        # The environment gives one string: "10.0.0.0/8, 192.168.1.5".
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _valid_networks(cls, value: list[str]) -> list[str]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ValueError(f"trusted_proxies: {cidr!r} is not an address or CIDR") from exc
        return value


_ENV: dict[str, tuple[str, ...]] = {
    "GATEWAY_OPENAI_UPSTREAM": ("upstreams", "openai"),
    "GATEWAY_ANTHROPIC_UPSTREAM": ("upstreams", "anthropic"),
    "GATEWAY_STORE": ("store",),
    "GATEWAY_ADMIN_TOKEN": ("admin_token",),
    "GATEWAY_LOG_LEVEL": ("log_level",),
    "GATEWAY_LOG_FORMAT": ("log_format",),
    "GATEWAY_HOST": ("host",),
    "GATEWAY_PORT": ("port",),
    "GATEWAY_POLICY": ("policy",),
    "GATEWAY_AUDIT_LOG": ("audit_log",),
    "GATEWAY_MAX_CLIENT_CONNECTIONS": ("max_client_connections",),
    "GATEWAY_TRUSTED_PROXIES": ("trusted_proxies",),
    "GATEWAY_METRICS_AUTH": ("metrics_auth",),
    "GATEWAY_CLIENT_BODY_TIMEOUT": ("timeouts", "client_body"),
    "GATEWAY_DRAIN_TIMEOUT": ("timeouts", "drain"),
}


def load_settings(
    config: Path | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Settings from a YAML config file, ``GATEWAY_*`` variables, and explicit overrides.

    Overrides that are None are ignored, so CLI flags left unset do not mask the file.
    """
    data: dict[str, Any] = {}
    if config is not None:
        loaded = yaml.safe_load(config.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{config}: expected a mapping at the top level")
        data = loaded
    env = os.environ if env is None else env
    for name, path in _ENV.items():
        value = env.get(name)
        if value:
            target = data
            for part in path[:-1]:
                if not isinstance(target.get(part), dict):
                    target[part] = {}
                target = target[part]
            target[path[-1]] = value
    data.update({key: value for key, value in overrides.items() if value is not None})
    return Settings.model_validate(data)
