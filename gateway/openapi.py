"""``GET /gateway/openapi.json``: the admin API as an OpenAPI 3.1 document, generated from the
routes the running app has registered (``admin_routes``) and the plane and scope each declared
(``gateway.auth.planes``), so that it cannot drift from what is served.

Each operation carries its scope (``x-gateway-scope``), the roles holding it
(``x-gateway-roles``), bearer security (none for the probes), its path parameters, and for a
write the strict pydantic model its handler validates the body with (``REQUEST_BODIES``):
the schema a client or a fuzzer (schemathesis) works from.
"""

from __future__ import annotations

import inspect
import re
import weakref
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gateway import __version__
from gateway.admin_bodies import DegradeBody, EndBody, GrantBody
from gateway.auth.config import NAME, ROLES
from gateway.auth.keyring import KeySpec
from gateway.auth.keys_api import RevokeSpec, RotateSpec
from gateway.auth.planes import Plane, route_auth
from gateway.auth.pools import ReloadBody
from gateway.auth.principal import ROLE_SCOPES
from gateway.store.records import SESSION_STATUSES

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
DOCUMENTED: frozenset[Plane] = frozenset({"admin", "probe"})
"""The planes of the admin API; the LLM plane is the providers' own APIs."""
ANY_METHOD = ("get", "post", "put", "patch", "delete")
"""What a route registered for every method (``*``) is documented as."""
_PARAMETER = re.compile(r"\{([^{}:]+)(?::[^{}]*)?\}")

REQUEST_BODIES: dict[tuple[str, str], type[BaseModel]] = {
    ("POST", "/gateway/degrade"): DegradeBody,
    ("POST", "/gateway/sessions/{session_id}/grant"): GrantBody,
    ("POST", "/gateway/sessions/{session_id}/end"): EndBody,
    ("POST", "/gateway/keys"): KeySpec,
    ("POST", "/gateway/keys/{key_id}/rotate"): RotateSpec,
    ("POST", "/gateway/keys/{key_id}/revoke"): RevokeSpec,
    ("POST", "/gateway/credentials/reload"): ReloadBody,
}
"""The model each write's handler validates its body with, by method and path. A write
route missing here is documented with an open object body (and tests/auth fails on it)."""

QUERY_PARAMETERS: dict[tuple[str, str], tuple[tuple[str, dict[str, Any]], ...]] = {
    ("GET", "/gateway/sessions"): (
        ("agent", {"type": "string"}),
        ("status", {"type": "string", "enum": list(SESSION_STATUSES)}),
        ("since", {"type": "number", "description": "Unix time: last seen since then"}),
        ("before", {"type": "number", "description": "The cursor: the previous next_before"}),
        ("limit", {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}),
    ),
    ("GET", "/gateway/keys"): (("team", {"type": "string", "pattern": NAME}),),
}
"""Query parameters the handlers read (they refuse bad values with a 400)."""

_ERROR = {
    "type": "object",
    "properties": {"error": {"type": "string"}},
    "required": ["error"],
}
_ERROR_REF = "#/components/schemas/Error"
_cache: weakref.WeakKeyDictionary[web.Application, bytes] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, slots=True)
class AdminRoute:
    """A registered route of the admin API, as declared."""

    method: str
    path: str
    """As registered, with its prefix: ``/gateway/sessions/{session_id}``."""
    plane: Plane
    scope: str
    handler: Handler

    @property
    def parameters(self) -> tuple[str, ...]:
        return tuple(_PARAMETER.findall(self.path))


def admin_routes(root: web.Application) -> list[AdminRoute]:
    """Every route of ``root`` and its sub-applications on the admin or probe plane, in the
    order they were registered. A route that declared no plane is left out (the app refuses
    to start with one: ``gateway.auth.planes.undeclared``)."""
    return [route for route in _routes(root) if route.plane in DOCUMENTED]


def _routes(app: web.Application) -> Iterator[AdminRoute]:
    for resource in app.router.resources():
        sub = getattr(resource, "_app", None)
        if isinstance(sub, web.Application):
            yield from _routes(sub)
            continue
        for route in resource:
            declared = route_auth(app, route)
            if declared is not None:
                yield AdminRoute(
                    route.method, resource.canonical, declared.plane, declared.scope, route.handler
                )


def document(root: web.Application) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``root``'s admin API."""
    routes = admin_routes(root)
    served = {(route.method, route.path) for route in routes}
    models = sorted(
        {model for at, model in REQUEST_BODIES.items() if at in served},
        key=lambda model: model.__name__,
    )
    _, schemas = models_json_schema(
        [(model, "validation") for model in models], ref_template="#/components/schemas/{model}"
    )
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        methods = ANY_METHOD if route.method == "*" else (route.method.lower(),)
        for method in methods:
            paths.setdefault(route.path, {})[method] = _operation(route, method.upper())
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "agent-gateway admin API",
            "version": __version__,
            "description": "Generated from the routes this gateway serves. Every operation but"
            " the probes takes Authorization: Bearer <admin token or admin OIDC token>; its"
            " x-gateway-scope is what the caller's role must hold.",
        },
        "paths": paths,
        "components": {
            "schemas": {**schemas.get("$defs", {}), "Error": _ERROR},
            "responses": {
                "Refused": {
                    "description": "refused: the error says why",
                    "content": {"application/json": {"schema": {"$ref": _ERROR_REF}}},
                }
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _operation(route: AdminRoute, method: str) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": _operation_id(method, route.path),
        "x-gateway-plane": route.plane,
        "x-gateway-scope": route.scope,
        "responses": {
            "2XX": {"description": "done"},
            "4XX": {"$ref": "#/components/responses/Refused"},
            "503": {"description": "not done now: the store, the audit log, or draining"},
        },
    }
    summary = _summary(route.handler)
    if summary:
        operation["summary"] = summary
    if route.plane == "probe":
        operation["security"] = []
    else:
        roles = [role for role in ROLES if route.scope in ROLE_SCOPES[role]]
        operation["x-gateway-roles"] = roles
        operation["security"] = [{"bearer": []}]
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in route.parameters
    ]
    for name, schema in QUERY_PARAMETERS.get((method, route.path), ()):
        parameters.append({"name": name, "in": "query", "required": False, "schema": schema})
    if parameters:
        operation["parameters"] = parameters
    if method in ("POST", "PUT", "PATCH"):
        model = REQUEST_BODIES.get((method, route.path))
        schema = (
            {"$ref": f"#/components/schemas/{model.__name__}"}
            if model is not None
            else {"type": "object"}
        )
        operation["requestBody"] = {
            "required": False,
            "content": {"application/json": {"schema": schema}},
        }
    return operation


def _operation_id(method: str, path: str) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", "_", _PARAMETER.sub(r"by_\1", path)).strip("_")
    return f"{method.lower()}_{words}"


def _summary(handler: Handler) -> str | None:
    """The first line of the handler's docstring, when the guard lets it be seen."""
    doc = inspect.getdoc(inspect.unwrap(handler))
    return doc.split("\n\n")[0].replace("\n", " ") if doc else None


async def openapi(request: web.Request) -> web.Response:
    """The admin API as OpenAPI 3.1, made once per app from the routes it serves."""
    root = request.match_info.apps[0]
    body = _cache.get(root)
    if body is None:
        body = _cache[root] = orjson.dumps(document(root))
    return web.Response(body=body, content_type="application/json")
