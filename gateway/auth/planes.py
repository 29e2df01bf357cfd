"""Planes: every route says, when it is registered, which plane it belongs to and which scope
it needs, and the app refuses to start with a route that says neither.

- ``llm``: the provider APIs under ``/v1`` (gateway keys, JWTs, or passthrough credentials);
- ``admin``: ``/gateway/*`` but the probes, and ``/metrics`` (the admin token or an admin OIDC
  token, mapped to a role whose scopes must include the route's);
- ``probe``: ``/gateway/health`` and ``/gateway/ready``, open to any caller and any ``Host``.

The two credential kinds never cross: a gateway key on an admin route and an admin token on an
LLM route are refused (``wrong_plane``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.auth.principal import AdminCaller

Plane = Literal["llm", "admin", "probe"]
ADMIN_CALLER = web.RequestKey("admin_caller", AdminCaller)
"""Set by the admin guard before an admin handler runs: who calls, with which role."""


@dataclass(slots=True, frozen=True)
class RouteAuth:
    plane: Plane
    scope: str
    """What the caller must hold: an admin scope (``sessions:write``), ``llm``, or ``none``
    for the probes."""


ROUTE_AUTH = web.AppKey("route_auth", dict)
"""Per application: route -> ``RouteAuth`` (a route is an aiohttp ``AbstractRoute``)."""


def declare(app: web.Application, route: web.AbstractRoute, plane: Plane, scope: str) -> None:
    app.setdefault(ROUTE_AUTH, {})[route] = RouteAuth(plane, scope)


def add_route(
    app: web.Application,
    method: str,
    path: str,
    handler: Handler,
    *,
    plane: Plane,
    scope: str,
) -> web.AbstractRoute:
    """``app.router.add_route`` with the route's plane and scope declared."""
    route = app.router.add_route(method, path, handler)
    declare(app, route, plane, scope)
    return route


def undeclared(app: web.Application) -> list[str]:
    """Routes of ``app`` and its sub-applications that declare no plane and scope."""
    missing: list[str] = []
    declared: dict[web.AbstractRoute, RouteAuth] = app.get(ROUTE_AUTH, {})
    for resource in app.router.resources():
        sub = getattr(resource, "_app", None)
        if isinstance(sub, web.Application):
            missing.extend(undeclared(sub))
            continue
        for route in resource:
            if route not in declared:
                missing.append(f"{route.method} {resource.canonical}")
    return missing


def listener_port(request: web.Request) -> int | None:
    """The local port the request arrived on (which listener: the main or the admin one)."""
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if isinstance(sockname, tuple) and len(sockname) >= 2 and isinstance(sockname[1], int):
        return sockname[1]
    return None


def route_auth(app: web.Application, route: web.AbstractRoute) -> RouteAuth | None:
    declared: dict[web.AbstractRoute, RouteAuth] = app.get(ROUTE_AUTH, {})
    return declared.get(route)
