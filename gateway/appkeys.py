"""Typed keys for what the app holds (``request.app[STORE]`` type-checks)."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from gateway.audit import AuditLog
from gateway.auth.admin_auth import AdminAuth
from gateway.auth.authenticator import Authenticator
from gateway.auth.hosts import HostCheck
from gateway.auth.keyring import KeyRing
from gateway.auth.pools import CredentialPools
from gateway.compaction import Compactor
from gateway.compaction.summary import Summarizers
from gateway.policy.live import LivePolicy
from gateway.resilience.degraded import Degradation
from gateway.settings import Settings
from gateway.store import Store
from gateway.telemetry.logs import RequestLog
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.tracing import Tracing
from gateway.tokens import TokenCounter
from gateway.upstream import Upstreams

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey[Store]("store")
HTTP = web.AppKey("http", aiohttp.ClientSession)
UPSTREAMS = web.AppKey("upstreams", Upstreams)
TOKENS = web.AppKey("tokens", TokenCounter)
STARTED_AT = web.AppKey("started_at", float)
POLICY = web.AppKey("policy", LivePolicy)
AUDIT = web.AppKey("audit", AuditLog)
COMPACTOR = web.AppKey("compactor", Compactor)
METRICS = web.AppKey("metrics", Metrics)
TRACING = web.AppKey("tracing", Tracing)
REQUEST_LOG = web.AppKey("request_log", RequestLog)
DEGRADED = web.AppKey("degraded", Degradation)
DRAINING = web.AppKey("draining", asyncio.Event)
"""Set when a stop begins: ``/gateway/ready`` answers not-ready from then on."""
AUTH = web.AppKey("auth", Authenticator)
"""What the LLM plane checks credentials with (mode, key ring, JWT verifier, pools)."""
ADMIN_AUTH = web.AppKey("admin_auth", AdminAuth)
"""What the admin plane checks credentials with (the admin token, admin OIDC issuers)."""
HOSTS = web.AppKey("hosts", HostCheck)
"""``allowed_hosts``: the ``Host`` names requests may carry."""
KEYRING = web.AppKey("keyring", KeyRing)
"""Gateway keys: checked on the LLM plane, made, rotated and revoked by the admin API."""
SUMMARIZERS = web.AppKey("summarizers", Summarizers)
"""The summary call's own breaker per upstream (open: summaries skipped, degraded)."""
POOLS = web.AppKey("pools", CredentialPools)
"""The upstream credential pools the gateway sends in keys, jwt and mixed modes."""
