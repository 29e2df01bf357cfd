"""Gateway settings: defaults, then the config file, then environment, then the command line."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from gateway.auth.config import AuthSettings, CredentialEntry, pool_problems
from gateway.secret import Secret

UPSTREAM_NAME = r"^[a-z0-9][a-z0-9._-]{0,62}$"
BUILT_IN_UPSTREAMS = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
}
"""The two upstreams every gateway has; each implies its provider API."""


class RetrySettings(BaseModel):
    """Retries of a call the upstream failed before anything reached the client."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    attempts: int = Field(3, ge=1, le=10)
    """Attempts in all, the first included (1: never retried). Defaults to
    ``upstream_retries`` + 1."""
    backoff_base: float = Field(0.2, gt=0, le=600)
    """Seconds: the n-th retry waits a random time up to ``backoff_base * 2**(n-1)``."""
    backoff_max: float = Field(5.0, gt=0, le=600)
    """Seconds: the longest wait before a retry (an upstream's ``Retry-After`` may ask for
    more, up to what is left of ``timeouts.first_byte``)."""
    budget_ratio: float = Field(0.2, ge=0, le=1)
    """Retries may add at most this fraction of the upstream's recent request rate (the last
    10 s), so an outage is not multiplied by the gateway."""


class BreakerSettings(BaseModel):
    """The circuit breaker: opens when the upstream itself is unwell (5xx, 529, timeouts,
    resets; never 429 or another 4xx)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    enabled: bool = True
    """Off: calls go to the upstream however it fares."""
    failures: int = Field(5, ge=1)
    """Consecutive failures that open it."""
    failure_ratio: float = Field(0.5, gt=0, le=1)
    """Or this share of failures among the calls of the last ``window`` seconds ..."""
    window: float = Field(30.0, gt=0, le=86400)
    """Seconds of calls the failure ratio is taken over."""
    min_calls: int = Field(20, ge=1)
    """... once the window holds at least this many calls."""
    open: float = Field(30.0, gt=0, le=86400)
    """Seconds it stays open, answering at once, before it lets one probe through."""


class ConcurrencySettings(BaseModel):
    """Calls in flight to the upstream, and the queue of calls waiting for a slot."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    max: int = Field(256, ge=1, le=1_000_000)
    """The ceiling of the limit (and the limit itself when not adaptive)."""
    min: int = Field(8, ge=1)
    """The floor an adaptive limit never goes below."""
    adaptive: bool = True
    """Lower the limit when the upstream's time to first byte grows or it answers overloaded
    (429 aside, 503, 529), raise it again while it answers quickly."""
    queue: int = Field(1024, ge=0, le=1_000_000)
    """Calls that may wait for a slot; past it a call is answered 429 with ``Retry-After``."""
    queue_timeout: float = Field(30.0, gt=0, le=86400)
    """Seconds a call may wait for a slot before it is answered 429."""
    session_share: float = Field(0.25, gt=0, le=1)
    """The share of the limit one session (or, without a session, one key) may hold, so a
    runaway agent cannot starve the others. Never below one slot."""

    @model_validator(mode="after")
    def _floor_below_ceiling(self) -> ConcurrencySettings:
        if self.min > self.max:
            raise ValueError(f"concurrency.min ({self.min}) is above concurrency.max ({self.max})")
        return self


class FallbackSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    upstream: str
    """Another upstream of the same provider API that takes this one's calls while its
    breaker is open."""
    models: dict[str, str] = {}
    """Model names rewritten for the fallback (``{"gpt-4o": "gpt-4o-2024-11-20"}``); a model
    not named keeps its name."""


class UpstreamSettings(BaseModel):
    """One upstream. A plain URL stands for ``{url: ...}`` with every default."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    url: str
    """Its base URL: OpenAI-compatible ones include their /v1, Anthropic's has none."""
    provider: Literal["openai", "anthropic"] | None = None
    """The API it speaks; ``openai`` and ``anthropic`` imply theirs, any other name must say."""
    retry: RetrySettings = Field(default_factory=RetrySettings)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    concurrency: ConcurrencySettings = Field(default_factory=ConcurrencySettings)
    fallback: FallbackSettings | None = None
    pass_client_credentials: bool = False
    """Calls that reach this upstream as another's fallback carry the client's own
    credential here. Needed for a fallback on another host than the upstream it stands in
    for: without it such a config is refused."""
    credentials: dict[str, list[CredentialEntry]] = {}
    """Named pools of provider credentials the gateway sends (``keys``, ``jwt`` and
    ``mixed`` modes), each a list tried in order: an entry the upstream answers 401
    is skipped for the next until reloaded. Principals and teams name their pool; an upstream
    with one pool uses it for everyone."""

    @model_validator(mode="before")
    @classmethod
    def _plain_url(cls, value: Any) -> Any:
        return {"url": value} if isinstance(value, str) else value

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parsed = urlsplit(value)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"{value!r} is not an http(s) URL")
        try:
            parsed.port  # noqa: B018 (it raises on a port out of range)
        except ValueError as exc:
            raise ValueError(f"{value!r}: {exc}") from None
        if parsed.query or parsed.fragment or parsed.username or parsed.password:
            raise ValueError(f"{value!r}: no query, fragment or credentials in an upstream URL")
        return value


def _origin(url: str) -> tuple[str, str, int | None]:
    parsed = urlsplit(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return parsed.scheme, (parsed.hostname or "").lower(), port


class Timeouts(BaseModel):
    """Seconds."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    connect: float = Field(10.0, gt=0)
    """To open a connection to the upstream (retried, see ``upstream_retries``)."""
    first_byte: float = Field(600.0, gt=0)
    """Until the upstream's response headers arrive (a long non-streamed answer)."""
    idle: float = Field(300.0, gt=0)
    """Between two chunks of a response."""
    client_body: float = Field(30.0, gt=0)
    """To receive a client's whole request body; a slower client is answered 408 and its
    connection closed, so slow or stalled uploads cannot hold connections for ever."""
    stream_total: float = Field(3600.0, gt=0)
    """The longest an answer may take to arrive whole, from its headers (checked as each
    chunk comes; a stalled answer is ``idle``'s): a stream still going after it is cut and
    counted as an upstream cut (usage estimated), a body still coming is a 502. An agent's
    longest streams take minutes; one that trickles bytes for ever would otherwise hold its
    connection and the turn's reservations, ``idle`` never firing."""


class DegradedSettings(BaseModel):
    """When the gateway degrades by itself: bounds on what falls behind, in seconds."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    loop_lag: float = Field(1.0, gt=0)
    """Event-loop lag (how late a timer runs) that, held over two samples in a row (1 s),
    puts the gateway in degraded mode (``loop_lag``); it leaves after 5 s under half of it."""
    store_lag: float = Field(5.0, gt=0)
    """The state store's writes erroring or lagging this long put the gateway in degraded
    mode (``store``): accounting is kept in memory and written when the store is back."""


class RetentionSettings(BaseModel):
    """How long sessions are kept, in seconds or ``30d``; ``null`` keeps them for ever."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    ended: float | None = Field(30 * 86400.0, gt=0)
    """A session ended (by an operator, or idle past its policy's ``idle_timeout``) is deleted
    this long after its last call, with everything it holds (saved summaries included)."""
    idle: float | None = Field(90 * 86400.0, gt=0)
    """Any session with no call for this long is deleted; a later call with its id starts
    afresh."""

    @field_validator("ended", "idle", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float | None:
        from gateway.auth.config import duration

        return None if value is None else duration(value)


class Settings(BaseModel):
    # hide_input_in_errors: a value refused where a reference belongs (an inline key) must
    # not be echoed back in the error.
    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        allow_inf_nan=False,
        hide_input_in_errors=True,
    )

    host: str = "127.0.0.1"
    """Listen address. Any but a loopback one needs ``auth.mode`` other than passthrough
    (or ``allow_network_passthrough``)."""
    port: int = Field(8787, ge=0, le=65535)
    """Listen port."""
    admin_host: str | None = None
    """A separate listener for the admin API (``/gateway/*`` and ``/metrics``); the main
    listener then serves only the LLM routes and the probes."""
    admin_port: int | None = Field(None, ge=0, le=65535)
    """The admin listener's port (with ``admin_host``, default 8788)."""
    workers: int = Field(1, ge=1, le=256)
    """Gateway processes serving ``port`` together (``gateway serve --workers``), each a whole
    gateway, so one host's every core serves: more than 1 needs a store they share (Redis).
    Each process counts its own metrics: worker i also serves ``GET /metrics`` and the probes
    on ``worker_metrics_port`` + i, one Prometheus target each (``/metrics`` on ``port``
    answers for whichever worker took the connection). With ``audit_log``, worker i writes
    its own chain beside it (``audit.jsonl``: ``audit.worker0.jsonl``, ...)."""
    worker_metrics_port: int | None = Field(None, ge=1, le=65535)
    """With ``workers`` above 1, the first worker's own metrics port (worker i's: this + i), on
    ``admin_host`` if set, else ``host``. Default ``port`` + 100 (any free port if ``port``
    is 0)."""
    auth: AuthSettings = AuthSettings()
    """Who may call the LLM routes and how they prove it (``auth.mode``)."""
    state_dir: Path | None = None
    """Where the gateway keeps what it generates on first start (the key pepper, the admin
    token), created 0700 with files 0600. Default: ``gateway-state`` beside the SQLite store
    (with another store, in the working directory)."""
    allowed_hosts: list[str] = []
    """``Host`` names (``gateway.example.com``, ``*.internal``) requests may carry; default
    the loopback names when bound to loopback, else any. Health and readiness answer any."""
    allow_network_passthrough: bool = False
    """Serve passthrough mode on a non-loopback address: anyone who reaches it uses the
    gateway with whatever provider key they hold, unauthenticated by the gateway."""
    store: str = "sqlite:///gateway.db"
    """Session state: ``sqlite:///relative.db``, ``sqlite:////absolute.db`` (kept across
    restarts, created 0600), ``memory://`` (one process, the least recently used sessions
    forgotten past 100,000), or Redis shared by replicas and workers:
    ``redis://[:password@]host:6379/0``, ``rediss://`` (TLS), ``unix:///path.sock``, each with
    an optional ``?prefix=name`` (keys ``gw:{name}:...``); the password from the URL or
    ``GATEWAY_REDIS_PASSWORD``."""
    store_summaries: bool = False
    """Write compaction's saved rewrites (the summaries: prompt content) to the store, so that
    a summary made once is reused after a restart and, with Redis, by every replica. Off,
    each process keeps them in memory while it serves the session."""
    policy: Path | None = None
    """The policy file (YAML); without one, the packaged default policy."""
    policy_poll_interval: float = Field(1.0, gt=0)
    """How often the policy file is checked for changes (SIGHUP reloads at once)."""
    audit_log: Path | None = None
    """JSON lines, only ever appended (created 0600): every control-plane change (policy loads
    and refusals, grants, session ends, degraded mode, breaker transitions), who made it and
    why; a change asked for is on disk before it takes effect."""
    upstreams: dict[str, UpstreamSettings] = Field(default_factory=dict, validate_default=True)
    """Where calls go, by name. ``openai`` and ``anthropic`` are always there (defaults:
    the providers' own APIs); other names are fallbacks and need ``provider``."""
    drain_timeout: float = Field(30.0, gt=0, le=86400)
    """On SIGTERM or SIGINT, how long the requests in flight may run on to their end before
    they are cut and accounted as far as they got (match Kubernetes'
    ``terminationGracePeriodSeconds``, leaving it a few seconds more)."""
    egress_proxy_from_env: bool = False
    """Outbound calls honour ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY`` (egress through a
    proxy)."""
    timeouts: Timeouts = Timeouts()
    retention: RetentionSettings = RetentionSettings()
    """How long ended and idle sessions are kept, by every store."""
    degraded: DegradedSettings = DegradedSettings()
    """When the gateway enters degraded mode by itself (it also can by hand:
    ``gateway degrade on``)."""
    max_body_bytes: int = Field(64 * 1024 * 1024, gt=0)
    """The largest request body read; larger is answered 413."""
    max_response_bytes: int = Field(64 * 1024 * 1024, gt=0)
    """The largest upstream answer the gateway holds whole (any non-streamed answer of an LLM
    route, which it reads); a larger one is refused unread with a 502. Other routes' larger
    answers (file contents) are passed on as they come, never held."""
    upstream_retries: int = Field(2, ge=0, le=9)
    """Retries after the first attempt, for every upstream that does not set
    ``retry.attempts`` itself."""
    upstream_connections: int = Field(256, ge=1)
    """Open connections to the upstreams, all of them together; more calls wait for one."""
    max_client_connections: int = Field(4096, ge=1)
    """Open client connections; past it a new connection gets a 503 with ``Retry-After`` and
    is closed (the cap protects the process; ``timeouts.client_body`` frees the slots)."""
    max_header_bytes: int = Field(32768, ge=1024)
    """One request header line (and the request line) at most; larger is answered 431."""
    trusted_proxies: list[str] = []
    """CIDRs of reverse proxies whose policy ``team_header`` is believed; from any other peer
    it is ignored. (``X-Forwarded-For`` decides nothing.)"""
    admin_token: Secret | None = None
    """Bearer token for the admin API (``Authorization: Bearer <token>``), at least 32
    random characters; in a config file only as a reference (``env:VAR``, ``file:/path``).
    Without one, a token is generated on first start into ``state_dir`` (``admin-token``,
    0600), where the CLI reads it."""
    metrics_auth: bool = False
    """``GET /metrics`` needs the admin token (or an OIDC token with ``metrics:read``) on a
    loopback listener too; on any other address it always does. Open on loopback, it still
    refuses a foreign ``Host`` (a page on a rebound name)."""
    log_level: str = "info"
    """``debug``, ``info``, ``warning`` or ``error``."""
    log_format: Literal["json", "text"] = "json"
    """``json``: one object per line (with one line per request); ``text`` for a terminal."""

    @model_validator(mode="before")
    @classmethod
    def _earlier_names(cls, value: Any) -> Any:
        # ``timeouts.drain`` was the drain's name before ``drain_timeout``.
        if isinstance(value, dict) and isinstance(value.get("timeouts"), dict):
            timeouts = dict(value["timeouts"])
            drain = timeouts.pop("drain", None)
            value = {**value, "timeouts": timeouts}
            if drain is not None:
                value.setdefault("drain_timeout", drain)
        return value

    @field_validator("upstreams", mode="before")
    @classmethod
    def _built_in_upstreams(cls, value: Any) -> Any:
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            return value  # pydantic says what is wrong
        merged: dict[str, Any] = {name: {"url": url} for name, url in BUILT_IN_UPSTREAMS.items()}
        for name, given in value.items():
            if name in BUILT_IN_UPSTREAMS and isinstance(given, Mapping) and "url" not in given:
                given = {**merged[name], **given}  # tuning a built-in keeps its own URL
            merged[name] = given
        return merged

    @model_validator(mode="after")
    def _upstreams_agree(self) -> Settings:
        # Every problem at its own place (``gateway config check`` shows each at its line),
        # all in one pass rather than one per run.
        problems: list[tuple[tuple[str, ...], str]] = []
        for name, upstream in self.upstreams.items():
            at: tuple[str, ...] = ("upstreams", name)
            if not re.match(UPSTREAM_NAME, name):
                problems.append((at, "not a name (a-z, 0-9, '.', '_', '-')"))
            implied = name if name in BUILT_IN_UPSTREAMS else None
            if implied and upstream.provider not in (None, implied):
                problems.append(((*at, "provider"), f"{name} speaks the {implied} API"))
            elif upstream.provider is None and implied is None:
                problems.append((at, "say which API it speaks: provider: openai or anthropic"))
            elif upstream.provider is None:
                upstream.provider = implied  # type: ignore[assignment]
            if "attempts" not in upstream.retry.model_fields_set:
                upstream.retry.attempts = self.upstream_retries + 1
        problems.extend(
            pool_problems(self.auth, {n: u.credentials for n, u in self.upstreams.items()})
        )
        for name, upstream in self.upstreams.items():
            at = ("upstreams", name, "fallback", "upstream")
            problems.extend((at, problem) for problem in self._fallback_problems(name, upstream))
        if problems:
            raise ValidationError.from_exception_data(
                type(self).__name__,
                [
                    InitErrorDetails(
                        type=PydanticCustomError("upstreams", "{message}", {"message": message}),
                        loc=loc,
                        input=None,
                    )
                    for loc, message in problems
                ],
            )
        return self

    def _fallback_problems(self, name: str, upstream: UpstreamSettings) -> list[str]:
        if upstream.fallback is None:
            return []
        other = upstream.fallback.upstream
        target = self.upstreams.get(other)
        if target is None:
            return [f"no upstream named {other!r} (there are: {', '.join(sorted(self.upstreams))})"]
        if other == name:
            return ["an upstream cannot be its own fallback"]
        if None in (target.provider, upstream.provider):
            return []  # said above: which API one of them speaks is missing
        if target.provider != upstream.provider:
            return [f"{other} speaks the {target.provider} API, {name} the {upstream.provider} API"]
        if _origin(target.url) != _origin(upstream.url) and not target.pass_client_credentials:
            return [
                f"{other} is on another host ({urlsplit(target.url).netloc}), and a fallback"
                " call carries the client's own credential there. Write"
                f" pass_client_credentials: true on upstreams.{other} if that host may receive it."
            ]
        return []

    @model_validator(mode="after")
    def _admin_listener(self) -> Settings:
        if self.admin_host is not None:
            if self.admin_port is None:
                self.admin_port = 8788
            if self.admin_port == self.port:
                raise ValueError(
                    f"admin_port ({self.admin_port}) must differ from port: the admin API's own"
                    " listener is another socket"
                )
        return self

    @model_validator(mode="after")
    def _worker_metrics_ports(self) -> Settings:
        ports = self.worker_metrics_ports
        if ports and ports[-1] > 65535:
            raise ValueError(
                f"the workers' metrics ports ({ports[0]}-{ports[-1]}) go past 65535: set"
                " worker_metrics_port lower"
            )
        if self.workers > 1 and self.admin_host is not None and not ports:
            raise ValueError(
                "with admin_host and port 0, set worker_metrics_port: the admin plane must know"
                " the workers' metrics ports"
            )
        taken = {"port": self.port, "admin_port": self.admin_port if self.admin_host else None}
        for name, port in taken.items():
            if port is not None and port in ports:
                raise ValueError(
                    f"the workers' metrics ports ({ports[0]}-{ports[-1]}) include {name}"
                    f" ({port}): set worker_metrics_port elsewhere"
                )
        return self

    @property
    def worker_metrics_ports(self) -> range:
        """The ports of the workers' own metrics listeners: none with one worker, or when they
        are left to the system (``port`` 0 and no ``worker_metrics_port``)."""
        if self.workers == 1:
            return range(0)
        first = self.worker_metrics_port
        if first is None:
            first = self.port + 100 if self.port else 0
        return range(first, first + self.workers) if first else range(0)

    @property
    def admin_ports(self) -> frozenset[int]:
        """With ``admin_host``: the ports ``/metrics`` is served on, the admin listener's and
        each worker's metrics listener's."""
        ports = {*self.worker_metrics_ports}
        if self.admin_port is not None:
            ports.add(self.admin_port)
        return frozenset(ports)

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

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
    "GATEWAY_OPENAI_UPSTREAM": ("upstreams", "openai", "url"),
    "GATEWAY_ANTHROPIC_UPSTREAM": ("upstreams", "anthropic", "url"),
    "GATEWAY_STORE": ("store",),
    "GATEWAY_STORE_SUMMARIES": ("store_summaries",),
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
    "GATEWAY_DRAIN_TIMEOUT": ("drain_timeout",),
    "GATEWAY_EGRESS_PROXY_FROM_ENV": ("egress_proxy_from_env",),
    "GATEWAY_AUTH_MODE": ("auth", "mode"),
    "GATEWAY_STATE_DIR": ("state_dir",),
    "GATEWAY_ALLOWED_HOSTS": ("allowed_hosts",),
    "GATEWAY_ALLOW_NETWORK_PASSTHROUGH": ("allow_network_passthrough",),
    "GATEWAY_ADMIN_HOST": ("admin_host",),
    "GATEWAY_ADMIN_PORT": ("admin_port",),
    "GATEWAY_WORKERS": ("workers",),
    "GATEWAY_WORKER_METRICS_PORT": ("worker_metrics_port",),
}


def _referenced_token(value: str, env: Mapping[str, str], resolve: bool = True) -> Secret:
    """The config file's ``admin_token``: a reference (``env:VAR``, ``file:/path``), never the
    token itself (a file kept in git or a ConfigMap would carry it)."""
    if not value.startswith(("env:", "file:")):
        raise ValueError(
            "admin_token in a config file is written as a reference (env:VARIABLE or"
            " file:/path), never the token itself; or set GATEWAY_ADMIN_TOKEN"
        )
    if not resolve:  # ``config check``: the file's shape, not this machine's secrets
        return Secret(value)
    from gateway.auth.pools import CredentialReferenceError
    from gateway.auth.pools import resolve as read_reference

    try:
        return read_reference(value, env)
    except CredentialReferenceError as exc:
        raise ValueError(f"admin_token: {exc}") from None


def load_settings(
    config: Path | None = None,
    env: Mapping[str, str] | None = None,
    resolve_references: bool = True,
    **overrides: Any,
) -> Settings:
    """Settings from a YAML config file, ``GATEWAY_*`` variables, and explicit overrides.

    Overrides that are None are ignored, so CLI flags left unset do not mask the file.
    """
    data: dict[str, Any] = {}
    if config is not None:
        # The policy files' reader: a hostile config is bounded in size, depth and aliases.
        from gateway.policy.loader import MAX_POLICY_BYTES, decode_utf8, parse_yaml

        with config.open("rb") as file:
            raw = file.read(MAX_POLICY_BYTES + 1)
        if len(raw) > MAX_POLICY_BYTES:
            raise ValueError(f"{config}: larger than {MAX_POLICY_BYTES // 1024} KiB")
        loaded, _node = parse_yaml(decode_utf8(raw, str(config)), str(config))
        loaded = loaded or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{config}: expected a mapping at the top level")
        data = loaded
    env = os.environ if env is None else env
    if isinstance(data.get("admin_token"), str):
        data["admin_token"] = _referenced_token(data["admin_token"], env, resolve_references)
    for name, path in _ENV.items():
        value = env.get(name)
        if value:
            target = data
            for part in path[:-1]:
                inner = target.get(part)
                if isinstance(inner, str):  # a plain upstream URL: the mapping it stands for
                    inner = {"url": inner}
                target[part] = dict(inner) if isinstance(inner, dict) else {}
                target = target[part]
            target[path[-1]] = value
    data.update({key: value for key, value in overrides.items() if value is not None})
    return Settings.model_validate(data)
