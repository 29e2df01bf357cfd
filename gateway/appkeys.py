"""Typed keys for what the app holds (``request.app[STORE]`` type-checks)."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from gateway.audit import AuditLog
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
SUMMARIZERS = web.AppKey("summarizers", Summarizers)
"""The summary call's own breaker per upstream (open: summaries skipped, degraded)."""
