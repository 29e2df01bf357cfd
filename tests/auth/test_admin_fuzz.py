"""The admin API fuzzed against a running ``gateway serve`` (keys mode, loopback only, its
upstreams never called): schemathesis from the gateway's own OpenAPI document (valid and
invalid requests of every operation), then what hypothesis makes by hand (raw bodies with bad
UTF-8, duplicate fields, depth bombs, huge strings, NaN, lone surrogates; any method; hostile
path parameters). Never a 5xx, never a hang (every request has a timeout), and the process's
resident memory stays bounded.

The examples run from plain functions with ``requests`` (schemathesis' own transport): the
gateway is another process, so nothing here blocks its event loop.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

from gateway.admin_bodies import (
    MAX_BODY,
    AdminBody,
    BodyRefused,
    DegradeBody,
    EndBody,
    GrantBody,
    parse,
)
from gateway.app import create_app
from gateway.openapi import admin_routes
from gateway.settings import Settings
from tests.harness import ADMIN, ADMIN_TOKEN

TIMEOUT = (5.0, 15.0)
"""Connect and read timeouts of every request: a hang fails the test, it does not stall it."""
MAX_GROWTH = 64 * 1024 * 1024
"""Bytes of resident memory the gateway may gain over a fuzz run (caches, the audit writer's
buffers): an unbounded structure or a body held whole would exceed it."""
EXAMPLES = 100
"""Schemathesis examples per operation and mode."""
SERVER_ERRORS: list[str] = []
"""Every 5xx seen, across the tests (the README quotes the count of requests and of these)."""
SENT = [0]


class Served:
    """``gateway serve`` in keys mode on a free loopback port, its log in ``tmp``."""

    def __init__(self, tmp: Path) -> None:
        for name in ("openai", "anthropic"):
            (tmp / f"pool-{name}").write_text(f"sk-pool-{name}-fuzz-0000000001\n")
        unreachable = f"http://127.0.0.1:{_free_port()}"  # no call ever goes upstream
        config = {
            "store": "memory://",
            "state_dir": str(tmp / "state"),
            "audit_log": str(tmp / "audit.jsonl"),
            "metrics_auth": True,
            "auth": {"mode": "keys"},
            "upstreams": {
                name: {
                    "url": f"{unreachable}{suffix}",
                    "credentials": {
                        "platform": [{"name": "primary", "value": f"file:{tmp}/pool-{name}"}]
                    },
                }
                for name, suffix in (("openai", "/v1"), ("anthropic", ""))
            },
        }
        (tmp / "gateway.yaml").write_text(json.dumps(config))  # JSON is YAML
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (tmp / "serve.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(tmp / "gateway.yaml"),
             "--port", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN},
        )  # fmt: skip
        self.http = requests.Session()
        self._wait()

    def _wait(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "gateway serve exited at start"
            try:
                if self.http.get(f"{self.url}/gateway/health", timeout=TIMEOUT).ok:
                    return
            except requests.ConnectionError:
                time.sleep(0.1)
        raise AssertionError("gateway serve did not answer /gateway/health in 60 s")

    def send(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One request; a 5xx is recorded (and failed on by the caller)."""
        response = self.http.request(method, f"{self.url}{path}", timeout=TIMEOUT, **kwargs)
        SENT[0] += 1
        if response.status_code >= 500:
            SERVER_ERRORS.append(f"{method} {path[:100]}: {response.status_code}")
        return response

    def rss(self) -> int:
        """The process's resident memory, in bytes."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        [line] = [line for line in status.splitlines() if line.startswith("VmRSS:")]
        return int(line.split()[1]) * 1024

    def close(self) -> None:
        self.http.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    running = Served(tmp_path_factory.mktemp("fuzz"))
    try:
        yield running
    finally:
        running.close()
    print(f"admin fuzz: {SENT[0]} requests, {len(SERVER_ERRORS)} answered 5xx")


@pytest.fixture(scope="module")
def document(served: Served) -> dict[str, Any]:
    answer = served.send("GET", "/gateway/openapi.json", headers=ADMIN)
    assert answer.status_code == 200
    doc: dict[str, Any] = answer.json()
    return doc


def _fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,  # nothing left behind
        suppress_health_check=list(HealthCheck),
    )


# -- the bodies' models ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "raw", "status", "said"),
    [
        (GrantBody, b'{"turns": 0}', 400, "grant a positive number of turns and/or tokens"),
        (GrantBody, b"{}", 400, "grant a positive number"),
        (GrantBody, b'{"turns": -1, "tokens": 5}', 400, "grant a positive number"),
        (GrantBody, b'{"turns": "5"}', 400, "turns and tokens must be whole numbers"),
        (GrantBody, b'{"turns": 1.5}', 400, "turns and tokens must be whole numbers"),
        (GrantBody, b'{"turns": true}', 400, "turns and tokens must be whole numbers"),
        (GrantBody, b'{"tokens": 9007199254740993}', 400, "grant at most 9007199254740992"),
        (GrantBody, b'{"turns": 1, "by": 7}', 400, "by must be a string"),
        (GrantBody, b'{"turns": 1, "role": "admin", "admin": true}', 400,
         "unknown field(s): role, admin; it takes turns, tokens, reason, by"),
        (EndBody, b'{"reason": ["x"]}', 400, "reason must be a string"),
        (EndBody, b'{"status": "active"}', 400, "unknown field(s): status"),
        (DegradeBody, b"{}", 400, "on must be true or false"),
        (DegradeBody, b'{"on": 1}', 400, "on must be true or false"),
        (DegradeBody, b'{"on": true, "reason": 5}', 400, "reason must be a string"),
        (DegradeBody, b'{"on": true, "on": false}', 400, "no duplicate fields"),
        (DegradeBody, b'{"on": true, "reason": "\\ud800"}', 400, "must be JSON"),
        (DegradeBody, b'{"on": NaN}', 400, "must be JSON"),
        (DegradeBody, b"[true]", 400, "the body must be a JSON object"),
        (DegradeBody, b"\xff", 400, "must be JSON"),
        (DegradeBody, b"[" * 5000 + b"]" * 5000, 400, "must be JSON"),
        (DegradeBody, b" " * (MAX_BODY + 1), 413, "larger than"),
    ],
)  # fmt: skip
def test_admin_bodies_say_what_is_wrong(
    model: type[AdminBody], raw: bytes, status: int, said: str
) -> None:
    with pytest.raises(BodyRefused) as refused:
        parse(model, raw)
    assert refused.value.status == status and said in refused.value.message


def test_admin_bodies_take_what_the_cli_sends() -> None:
    grant = parse(GrantBody, b'{"turns": 2, "tokens": 0, "reason": "ok", "by": "alice"}')
    assert (grant.turns, grant.tokens, grant.reason, grant.by) == (2, 0, "ok", "alice")
    assert parse(EndBody, b"").reason == "" and parse(EndBody, b"{}").by is None
    assert parse(DegradeBody, b'{"on": false}').on is False


# -- the document ------------------------------------------------------------------------------
def test_the_document_is_the_served_admin_api(served: Served, document: dict[str, Any]) -> None:
    """Every admin and probe route of a gateway is in its OpenAPI document, with the scope
    it was registered with; every write has its strict model as the body's schema; and the
    document itself is an admin route."""
    here = create_app(Settings(store="memory://", metrics_auth=True))
    routes = {(r.method.lower(), r.path): r for r in admin_routes(here)}
    operations = {
        (method, path): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
    }
    assert set(operations) == set(routes)
    schemas = document["components"]["schemas"]
    for (method, path), operation in operations.items():
        route = routes[(method, path)]
        assert operation["x-gateway-scope"] == route.scope
        assert operation["x-gateway-plane"] == route.plane
        assert operation["security"] == ([] if route.plane == "probe" else [{"bearer": []}])
        declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
        assert declared == set(route.parameters)
        if method == "post":
            ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            model = schemas[ref.rsplit("/", 1)[1]]
            assert model["additionalProperties"] is False, f"{path} takes unknown fields"
    assert document["openapi"] == "3.1.0"
    assert served.send("GET", "/gateway/openapi.json").status_code == 401


# -- schemathesis ------------------------------------------------------------------------------
def test_schemathesis_finds_no_server_error(served: Served, document: dict[str, Any]) -> None:
    """Valid (positive) and schema-violating (negative) requests of every operation, made by
    schemathesis from the document, with the admin token: never a 5xx."""
    schema = schemathesis.openapi.from_dict(document)
    before = _warm_rss(served, document)
    sent = 0
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"the document does not load: {result}"
        operation = result.ok()
        modes = [GenerationMode.POSITIVE]
        if operation.path_parameters or operation.query or operation.body:
            modes.append(GenerationMode.NEGATIVE)  # nothing to break in a bare GET
        for mode in modes:

            @_fuzz_settings(EXAMPLES)
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case: schemathesis.Case[Any]) -> None:
                nonlocal sent
                sent += 1
                request = case.as_transport_kwargs(base_url=served.url, headers=dict(ADMIN))
                url = request.pop("url")
                method = request.pop("method")
                request.pop("timeout", None)
                answer = served.send(method, url.removeprefix(served.url), **request)
                assert answer.status_code < 500, (method, url, answer.text[:300])

            check()
    assert sent > 500
    assert served.rss() - before < MAX_GROWTH


def _warm_rss(served: Served, document: dict[str, Any]) -> int:
    """The resident memory once every GET has been answered once (lazy imports and caches
    made), as the baseline of a fuzz run."""
    for path, item in document["paths"].items():
        if "get" in item and "{" not in path:
            served.send("GET", path, headers=ADMIN)
    return served.rss()


@pytest.mark.parametrize(
    "query",
    ["limit=0", "limit=-1", "limit=x", "limit=" + "9" * 5000, "since=nan", "before=inf",
     "since=-inf", "before=" + "1" * 400, "status=gone"],
)  # fmt: skip
def test_a_bad_session_query_is_a_400(served: Served, query: str) -> None:
    """A page of no size has no last entry to make a cursor of (it was a 500), a negative
    one is no LIMIT at all in SQLite, and NaN compares false with every time."""
    answer = served.send("GET", f"/gateway/sessions?{query}", headers=ADMIN)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"].startswith("bad query") and len(answer.text) < 400


# -- hostile bodies, methods and paths ---------------------------------------------------------
PATH_VALUES = {"session_id": "fuzz-session", "key_id": "ZZZZZZZZZZZZ"}
"""Path parameters that pass the route's own checks (the body is read next) but name nothing."""


def _writes(document: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """Each write route's path (parameters filled) and its body's field names."""
    schemas = document["components"]["schemas"]
    found = []
    for path, item in document["paths"].items():
        if "post" not in item:
            continue
        ref = item["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        fields = list(schemas[ref.rsplit("/", 1)[1]]["properties"])
        for name, value in PATH_VALUES.items():
            path = path.replace(f"{{{name}}}", value)
        found.append((path, fields))
    return found


def test_every_write_refuses_duplicate_fields(served: Served, document: dict[str, Any]) -> None:
    """Two values for one field: the gateway must not pick one the caller did not mean (a
    later ``team`` or ``on`` that a proxy or a log reads differently). 400, at any depth."""
    writes = _writes(document)
    assert len(writes) >= 7
    for path, fields in writes:
        for field in fields:
            for raw in (
                f'{{"{field}": 1, "{field}": 2}}',
                f'{{"{field}": "a", "x": {{"y": 1, "y": 1}}, "{field}": "b"}}',
                f'{{"models": [{{"a": 1, "a": 1}}], "{field}": null}}',
            ):
                answer = served.send("POST", path, data=raw.encode(), headers=_json_headers())
                assert answer.status_code == 400, (path, raw, answer.text)
                assert "duplicate" in answer.json()["error"], (path, raw, answer.text)


def _json_headers() -> dict[str, str]:
    return {**ADMIN, "Content-Type": "application/json"}


def _field_bodies(fields: list[str]) -> st.SearchStrategy[bytes]:
    """Bodies naming the route's own fields with hostile values."""
    field = st.sampled_from(fields)
    value = st.one_of(
        st.sampled_from(
            [
                b"NaN",
                b"Infinity",
                b"-Infinity",
                b'"\\ud800"',
                b'"a\\udfff"',
                b"1" + b"0" * 5000,
                b"1e999",
                b'{"$ne": null}',
                b'["a"]',
                b"true",
                b'"x\\u0000y"',
                b"-0",
                b"1.5e308",
                b'"\\u001b[2J"',
                b'"gw_AAAAAAAAAAAA_forged"',
            ]
        ),
        st.integers(min_value=1, max_value=30_000).map(lambda n: b"[" * n + b"]" * n),
        st.integers(min_value=1, max_value=30_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
        st.integers(min_value=0, max_value=300_000).map(lambda n: b'"' + b"x" * n + b'"'),
        st.binary(max_size=64).map(lambda raw: b'"' + raw.replace(b'"', b"") + b'"'),
        st.text(max_size=200).map(lambda text: json.dumps(text).encode()),
    )
    return st.tuples(field, value).map(
        lambda pair: b'{"' + pair[0].encode() + b'": ' + pair[1] + b"}"
    )


BODIES = st.one_of(
    st.binary(max_size=512),
    st.sampled_from(
        [
            b"\xef\xbb\xbf{}",
            b"{",
            b"[]",
            b"null",
            b'"{}"',
            b"{}" * 3,
            b"\x00",
            b'{"a": 1}\n{"b": 2}',
            b"\xff\xfe{\x00}\x00",
        ]
    ),
)


@_fuzz_settings(300)
@given(data=st.data())
def test_hostile_admin_bodies_get_a_4xx(
    served: Served, document: dict[str, Any], data: st.DataObject
) -> None:
    path, fields = data.draw(st.sampled_from(_writes(document)), label="route")
    body = data.draw(st.one_of(BODIES, _field_bodies(fields)), label="body")
    answer = served.send("POST", path, data=body, headers=_json_headers())
    assert 400 <= answer.status_code < 500 or answer.status_code in (200, 201), answer.text
    if len(body) > MAX_BODY:
        assert answer.status_code == 413, answer.text
    error = answer.json().get("error", "") if answer.status_code >= 400 else ""
    assert len(error) < 600 and ADMIN_TOKEN not in error


HOSTILE_SEGMENTS = st.one_of(
    st.sampled_from(
        [
            "..",
            "%2e%2e",
            "..%2f..%2fmetrics",
            "%00",
            "%ff",
            "%",
            "%zz",
            "a%2Fb",
            "~",
            " ",
            "gw_AAAAAAAAAAAA_x",
            "' OR 1=1 --",
            "*",
            "{session_id}",
        ]
    ),
    st.text(max_size=40).map(lambda text: urllib.parse.quote(text, safe="")),
    st.integers(min_value=1, max_value=20_000).map(lambda n: "x" * n),
)


@_fuzz_settings(300)
@given(data=st.data())
def test_any_method_and_hostile_path_parameters(
    served: Served, document: dict[str, Any], data: st.DataObject
) -> None:
    """Every route template, any method, its parameters hostile: a 4xx or a 2xx, never a 5xx;
    without the token, never a 2xx on the admin plane."""
    template = data.draw(st.sampled_from(sorted(document["paths"])), label="path")
    path = template
    for name in ("session_id", "key_id"):
        path = path.replace(f"{{{name}}}", data.draw(HOSTILE_SEGMENTS, label=name))
    method = data.draw(st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS",
                                        "HEAD", "TRACE"]), label="method")  # fmt: skip
    token = data.draw(st.booleans(), label="token")
    headers = _json_headers() if token else {"Content-Type": "application/json"}
    answer = served.send(method, path, headers=headers, data=b'{"on": false}')
    assert answer.status_code < 500, (method, path[:200], answer.text[:300])
    item = document["paths"][template]
    admin_plane = any(op["x-gateway-plane"] == "admin" for op in item.values())
    if not token and admin_plane:
        assert not 200 <= answer.status_code < 300, (method, path[:200])


def test_a_huge_admin_body_is_refused_without_being_held(served: Served) -> None:
    """A body of 32 MiB, announced or streamed without a length: 413, read no further than
    the admin limit, and the process's memory does not grow by anything like it."""
    before = served.rss()
    size = 32 * 1024 * 1024
    announced = served.send("POST", "/gateway/degrade", data=b"x" * size, headers=_json_headers())
    assert announced.status_code == 413

    def chunks() -> Iterator[bytes]:
        for _ in range(size // 65536):
            yield b" " * 65536

    try:
        streamed = served.send("POST", "/gateway/degrade", data=chunks(), headers=_json_headers())
        assert streamed.status_code == 413
    except requests.ConnectionError:
        pass  # the gateway answered and closed while the rest was still being sent
    assert served.rss() - before < size // 2
    assert served.send("GET", "/gateway/health").status_code == 200
