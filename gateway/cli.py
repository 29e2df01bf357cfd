"""``gateway``: serve, fake-provider, and the session commands (which read the admin API).

The help text is plain text written for a terminal (``DESCRIPTION`` and each option's
``help``), not this docstring. Options of ``sessions`` go before or after its subcommand
(``gateway sessions --json list`` and ``gateway sessions list --json``): each subcommand
carries a copy whose default is ``SUPPRESS``, so a value given before is not overwritten.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8787"
TOKEN_VARIABLE = "GATEWAY_ADMIN_TOKEN"
URL_VARIABLE = "GATEWAY_URL"
SESSION_STATUSES = ("active", "paused", "ended")
"""The store's ``SESSION_STATUSES`` (gateway.store.records), copied: importing the store costs
the CLI 170 ms of start-up. ``tests/test_cli.py`` keeps the two equal."""

DESCRIPTION = """\
agent-gateway: a gateway between AI coding agents and their LLM providers. It relays every
call, knows each agent session (its turns, tokens and cost) and applies a policy file."""
EPILOG = f"""\
environment:
  {TOKEN_VARIABLE}  the admin token: the gateway requires it of admin API calls, and the
                       sessions commands send it (as Authorization: Bearer)
  {URL_VARIABLE}          the gateway the sessions commands talk to (default {DEFAULT_URL})

Run 'gateway COMMAND --help' for a command's options."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fake-provider"]:
        # The fake provider owns its options (python -m gateway.fake_provider takes the same).
        return _fake_provider(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    result: int = args.run(args)
    return result


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs kept as written (they hold lists); option help wrapped."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)


def _command(
    commands: Any, name: str, summary: str, description: str | None = None
) -> argparse.ArgumentParser:
    """A subcommand: ``summary`` in its parent's list, ``description`` (or the summary) in
    its own help."""
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        help=summary,
        description=description or summary[:1].upper() + summary[1:] + ".",
        formatter_class=_HelpFormatter,
    )
    return parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway", description=DESCRIPTION, epilog=EPILOG, formatter_class=_HelpFormatter
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    serve = _command(
        commands,
        "serve",
        "run the gateway",
        "Run the gateway in the foreground until SIGINT (Ctrl-C) or SIGTERM; it then stops\n"
        "accepting connections and lets the calls in flight finish (timeouts.drain, 25 s).\n"
        "Every setting is also read from the config file and GATEWAY_* variables\n"
        "('gateway config reference' lists them).",
    )
    serve.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="listen port (default 8787)")
    serve.add_argument("--config", type=Path, default=None, help="the gateway's YAML config file")
    serve.add_argument(
        "--store",
        default=None,
        metavar="URL",
        help="session store: sqlite:///gateway.db (the default) or memory://",
    )
    serve.add_argument(
        "--policy",
        type=Path,
        default=None,
        help="policy file (YAML; default: the packaged policies/default.yaml)",
    )
    serve.set_defaults(run=_serve)

    # main() hands "gateway fake-provider ..." to the fake provider's own parser; this entry
    # only lists it here.
    commands.add_parser(
        "fake-provider",
        help="run the offline fake LLM provider ('gateway fake-provider --help' for its options)",
        add_help=False,
        description="Run the offline fake LLM provider.",
    )

    _sessions_parser(commands)
    _policy_parser(commands)

    config = _command(commands, "config", "the gateway's own settings")
    config_commands = config.add_subparsers(title="config commands", metavar="COMMAND")
    config_commands.required = True
    config_reference = _command(
        config_commands,
        "reference",
        "print every config key, its default and its GATEWAY_* variable (docs/config-reference.md)",
    )
    config_reference.set_defaults(run=_config_reference)
    return parser


def _connection_options(parser: argparse.ArgumentParser, *, copy: bool) -> None:
    """``--url``, ``--token``, ``--json`` on ``sessions`` and again on each of its commands.
    The copies default to ``SUPPRESS``: argparse sets a subcommand's defaults over what the
    parent parsed, and a suppressed default is not set at all."""
    group = parser.add_argument_group("connection options (before or after the command)")
    group.add_argument(
        "--url",
        default=argparse.SUPPRESS if copy else None,
        help=f"the gateway's address (default: ${URL_VARIABLE}, else {DEFAULT_URL})",
    )
    group.add_argument(
        "--token",
        default=argparse.SUPPRESS if copy else None,
        help=f"the admin token (default: ${TOKEN_VARIABLE}; prefer the variable: a command "
        "line is visible to other users of the machine)",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if copy else False,
        help="print the gateway's JSON, for scripts",
    )


def _sessions_parser(commands: Any) -> None:
    sessions = _command(
        commands,
        "sessions",
        "list, show, grant and end the sessions of a running gateway",
        "List, show, grant and end the sessions of a running gateway, through its admin API.\n"
        f"With an admin token set on the gateway, set {TOKEN_VARIABLE} here too (or pass --token).",
    )
    _connection_options(sessions, copy=False)
    session_commands = sessions.add_subparsers(title="session commands", metavar="COMMAND")
    session_commands.required = True

    listing = _command(session_commands, "list", "sessions, newest first")
    listing.add_argument("--agent", help="only this agent's (claude-code, codex, opencode, ...)")
    listing.add_argument(
        "--status", choices=SESSION_STATUSES, help="only the sessions in this status"
    )
    listing.add_argument(
        "--limit", type=_positive, default=50, help="at most this many (default 50)"
    )
    listing.set_defaults(run=_sessions_list)

    show = _command(session_commands, "show", "one session in full")
    show.add_argument("session_id", metavar="SESSION", help="the session's id")
    show.set_defaults(run=_sessions_show)

    grant = _command(
        session_commands,
        "grant",
        "more turns or tokens for a session",
        "Give a session more turns and/or tokens than its limits allow; a grant also lifts a\n"
        "loop stop and resumes a paused session. An ended session refuses it.",
    )
    grant.add_argument("session_id", metavar="SESSION", help="the session's id")
    grant.add_argument("--turns", type=_not_negative, default=0, help="turns to add")
    grant.add_argument("--tokens", type=_not_negative, default=0, help="tokens to add")
    grant.add_argument("--reason", default="", help="why, for the audit log")
    grant.add_argument("--by", default=None, help="who grants it (default: $USER)")
    grant.set_defaults(run=_sessions_grant)

    end = _command(
        session_commands,
        "end",
        "end a session: its next calls are refused",
        "End a session: its next calls are refused, and no grant re-opens it.",
    )
    end.add_argument("session_id", metavar="SESSION", help="the session's id")
    end.add_argument("--reason", default="", help="why, for the audit log and the refusals")
    end.add_argument("--by", default=None, help="who ends it (default: $USER)")
    end.set_defaults(run=_sessions_end)

    for command in (listing, show, grant, end):
        _connection_options(command, copy=True)


def _policy_parser(commands: Any) -> None:
    policy = _command(commands, "policy", "check, explain and document policy files")
    policy_commands = policy.add_subparsers(title="policy commands", metavar="COMMAND")
    policy_commands.required = True

    check = _command(
        policy_commands,
        "check",
        "validate a policy file",
        "Validate a policy file: ok with its version and rules (exit 0), or its errors with\n"
        "their lines (exit 1).",
    )
    check.add_argument("file", type=Path, metavar="FILE", help="the policy file (YAML)")
    check.set_defaults(run=_policy_check)

    explain = _command(
        policy_commands,
        "explain",
        "the effective settings for a caller, and which rule set each",
    )
    explain.add_argument(
        "--policy", type=Path, default=None, help="policy file (default: the packaged one)"
    )
    explain.add_argument("--agent", default="unknown", help="the caller's agent (default unknown)")
    explain.add_argument("--model", default=None, help="the model it asks for")
    explain.add_argument("--team", default=None, help="its team, as the policy's teams name it")
    explain.add_argument("--key", default=None, help="its key hash, as sessions show it")
    explain.add_argument("--session-name", default=None, help="the session's name")
    explain.add_argument(
        "--mode", choices=("interactive", "headless"), default=None, help="how the agent runs"
    )
    explain.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a request header the rules may match (repeatable)",
    )
    explain.add_argument("--json", action="store_true", help="print JSON, for scripts")
    explain.set_defaults(run=_policy_explain)

    reference = _command(
        policy_commands,
        "reference",
        "print the policy reference (every setting; docs/policy-reference.md)",
    )
    reference.set_defaults(run=_policy_reference)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _not_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


# -- serve -------------------------------------------------------------------------------------
def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from gateway.admin import serving_problem
    from gateway.app import create_app
    from gateway.policy import PolicyError
    from gateway.server import serve
    from gateway.settings import load_settings
    from gateway.telemetry import logs

    settings = load_settings(
        args.config, host=args.host, port=args.port, store=args.store, policy=args.policy
    )
    problem = serving_problem(settings)
    if problem is not None:
        print(f"gateway: {problem}", file=sys.stderr)
        return 2
    listener = logs.configure(settings.log_level, settings.log_format)
    _install_uvloop()
    app = create_app(settings)
    print(
        f"gateway on http://{settings.host}:{settings.port}"
        f"  openai -> {settings.upstreams.openai}  anthropic -> {settings.upstreams.anthropic}"
        f"  store {settings.store}",
        flush=True,
    )
    app.on_startup.append(_tune_gc)
    try:
        asyncio.run(serve(app, settings.host, settings.port))
    except PolicyError as exc:  # the policy file at start: its problems, not a traceback
        print(f"gateway: policy refused, not starting:\n{exc}", file=sys.stderr)
        return 1
    finally:
        listener.stop()
    return 0


def _fake_provider(options: list[str]) -> int:
    from gateway.fake_provider.__main__ import parse_args, run

    # Parsed first: --help (or a bad option) exits before the process's loop policy changes.
    host, port, config = parse_args(options)
    _install_uvloop()
    run(host, port, config)
    return 0


async def _tune_gc(app: object) -> None:
    """Every call allocates thousands of short-lived objects and few cycles. Collect the young
    generation less often, and move what start-up built (modules, rank tables, the policy) out
    of the collector's sight. Measured here: about 6% less CPU per small streamed call (three
    A/B pairs, noisy); the collector still runs for cycles."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # not on Windows
        return
    uvloop.install()


# -- sessions ----------------------------------------------------------------------------------
def _admin(
    args: argparse.Namespace,
    path: str,
    query: dict[str, Any] | None = None,
    body: dict[str, Any] | None = None,
) -> Any:
    """One call to a running gateway's admin API (GET, or POST with a JSON body). A refusal or
    an unreachable gateway ends the command: its message, exit status 1."""
    base = args.url or os.environ.get(URL_VARIABLE) or DEFAULT_URL
    url = base.rstrip("/") + path
    if query:
        url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    if data:
        request.add_header("Content-Type", "application/json")
    # Read here, not as the option's default: --help would print the secret.
    token = args.token or os.environ.get(TOKEN_VARIABLE)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"gateway: {_refusal(exc, sent_token=bool(token))}") from exc
    except urllib.error.URLError as exc:
        raise SystemExit(f"gateway: cannot reach {base}: {exc.reason}") from exc


def _refusal(exc: urllib.error.HTTPError, *, sent_token: bool) -> str:
    """The gateway's answer to a refused call, as a sentence: its ``error``, and the status."""
    raw = exc.read().decode(errors="replace")
    try:
        message = str(json.loads(raw)["error"])
    except (ValueError, KeyError, TypeError):
        message = raw.strip() or str(exc.reason)
    if exc.code == 401:  # name the two places a token comes from
        if sent_token:
            what = f"the admin token was refused: check {TOKEN_VARIABLE} or --token"
        else:
            what = f"admin token required: set {TOKEN_VARIABLE} or pass --token"
        return f"{what} (the gateway answered 401: {message})"
    return f"{message} (the gateway answered {exc.code})"


def _sessions_list(args: argparse.Namespace) -> int:
    data = _admin(
        args,
        "/gateway/sessions",
        {"agent": args.agent, "status": args.status, "limit": args.limit},
    )
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    rows = [
        (
            s["id"],
            s.get("name") or "",
            s["agent"],
            s["status"],
            str(s["turns"]),
            _count(s["tokens"]["input_tokens"]),
            _count(s["tokens"]["output_tokens"]),
            _ago(s["last_seen"]),
            s["source"],
        )
        for s in data["sessions"]
    ]
    header = ("SESSION", "NAME", "AGENT", "STATUS", "TURNS", "IN", "OUT", "LAST SEEN", "SOURCE")
    print(_table(header, rows))
    return 0


def _sessions_show(args: argparse.Namespace) -> int:
    s = _admin(args, _session_path(args.session_id))
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    tokens = s["tokens"]
    lines = [
        ("session", s["id"]),
        ("name", s.get("name") or "-"),
        ("agent", s["agent"]),
        ("source", s["source"]),
        ("status", s["status"]),
        ("key", s.get("key_hash") or "-"),
        ("first seen", _when(s["first_seen"])),
        ("last seen", f"{_when(s['last_seen'])} ({_ago(s['last_seen'])})"),
        ("turns", f"{s['turns']} ({s['user_turns']} user, {s['estimated_turns']} estimated)"),
        ("upstream errors", str(s["upstream_errors"])),
        (
            "input tokens",
            f"{tokens['input_tokens']:,} (cache read {tokens['cache_read_tokens']:,})",
        ),
        (
            "output tokens",
            f"{tokens['output_tokens']:,} (reasoning {tokens['reasoning_tokens']:,})",
        ),
        *_policy_lines(s),
    ]
    width = max(len(k) for k, _ in lines)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in lines))
    models = [
        (m, str(c["turns"]), _count(c["input_tokens"]), _count(c["output_tokens"]))
        for m, c in s["models"].items()
    ]
    if models:
        print()
        print(_table(("MODEL", "TURNS", "IN", "OUT"), models))
    return 0


def _by(args: argparse.Namespace) -> str:
    by: str = args.by or os.environ.get("USER") or "operator"
    return by


def _session_path(session_id: str, action: str = "") -> str:
    path = "/gateway/sessions/" + urllib.parse.quote(session_id, safe="")
    return f"{path}/{action}" if action else path


def _sessions_grant(args: argparse.Namespace) -> int:
    if not (args.turns or args.tokens):
        print("gateway: grant a positive number of --turns and/or --tokens", file=sys.stderr)
        return 2
    body = {"turns": args.turns, "tokens": args.tokens, "reason": args.reason, "by": _by(args)}
    s = _admin(args, _session_path(args.session_id, "grant"), body=body)
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        print(
            f"granted {args.turns} turns and {args.tokens} tokens to {s['id']}: now "
            f"{s['granted_turns']} turns and {s['granted_tokens']} tokens granted in all; "
            f"status {s['status']}"
        )
    return 0


def _sessions_end(args: argparse.Namespace) -> int:
    body = {"reason": args.reason, "by": _by(args)}
    s = _admin(args, _session_path(args.session_id, "end"), body=body)
    # The reason says who ended it and why: "ended by dana: runaway".
    print(json.dumps(s, indent=2) if args.json else f"session {s['id']} {s['status_reason']}")
    return 0


# -- policy ------------------------------------------------------------------------------------
def _policy_check(args: argparse.Namespace) -> int:
    from gateway.policy import PolicyError
    from gateway.policy.loader import read_policy

    try:
        policy = read_policy(args.file)
    except PolicyError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    from gateway.policy.claims import loosening

    names = ", ".join(rule.name for rule in policy.rules) or "none"
    rules = _plural(len(policy.rules), "rule")
    print(f"{args.file}: ok (version {policy.version}; {rules}: {names})")
    for warning in loosening(policy.file):  # valid all the same: a warning, still exit 0
        print(f"{args.file}: warning: {warning.message()}", file=sys.stderr)
    return 0


def _policy_explain(args: argparse.Namespace) -> int:
    from gateway.policy import Caller, PolicyError, packaged_default, parse_policy
    from gateway.policy.explain import claim_marks, explain_lines
    from gateway.policy.loader import read_policy

    try:
        if args.policy is None:
            policy = parse_policy(*packaged_default())
        else:
            policy = read_policy(args.policy)
    except PolicyError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    headers = tuple(
        (name.strip().lower(), value.strip())
        for name, _, value in (h.partition("=") for h in args.header)
    )
    who = Caller(
        agent=args.agent,
        model=args.model,
        key_hash=args.key,
        team=args.team,
        session_name=args.session_name,
        mode=args.mode,
        headers=headers,
    )
    effective = policy.resolve(who)
    if args.json:
        data = {
            "policy": {"source": policy.source, "version": policy.version},
            "rules": list(effective.rules),
            "settings": effective.settings.model_dump(),
            "sources": dict(effective.sources),
            "claims": claim_marks(policy, effective),
        }
        print(json.dumps(data, indent=2))
        return 0
    print("\n".join(explain_lines(policy, effective)))
    return 0


def _policy_reference(args: argparse.Namespace) -> int:
    from gateway.policy.reference import render

    print(render(), end="")
    return 0


def _config_reference(args: argparse.Namespace) -> int:
    from gateway.settings_reference import render

    print(render(), end="")
    return 0


def _policy_lines(s: dict[str, Any]) -> list[tuple[str, str]]:
    """What the policy did to a session: only the lines that have something to say."""
    lines = []
    if s.get("status_reason"):
        lines.append(("status reason", s["status_reason"]))
    if s.get("cost"):
        lines.append(("cost", f"{s['cost']:.4f}"))
    if s.get("granted_turns") or s.get("granted_tokens"):
        lines.append(("granted", f"{s['granted_turns']} turns, {s['granted_tokens']:,} tokens"))
    if s.get("rejected"):
        last = s["rejections"][-1] if s.get("rejections") else {}
        why = f"last: {last.get('limit')}, rule {last.get('rule')}"
        lines.append(("rejected", f"{s['rejected']} ({why})"))
    for event in s.get("detections", [])[-3:]:
        more = "+" if event.get("at_least") else ""  # the history held more than were counted
        times = f"x{event['count']:g}{more}"
        lines.append(("loop", f"{event['detector']} {event.get('tool') or ''} {times}"))
    for event in s.get("warnings", [])[-1:]:
        lines.append(("warning", "; ".join(event.get("warnings", []))))
    if s.get("compacted_calls"):
        lines.append(
            (
                "compacted",
                f"{_plural(s['compacted_calls'], 'call')}, {_count(s['tokens_saved'])} tokens "
                f"saved, {_plural(s['summary_calls'], 'summary call')}",
            )
        )
    for event in s.get("compactions", [])[-3:]:
        what = ",".join(event["strategies"]) or "nothing"
        tokens = f"{_count(event['tokens_before'])} -> {_count(event['tokens_after'])} tokens"
        failed = f" ({'; '.join(event['failures'])})" if event.get("failures") else ""
        lines.append(("compaction", f"{_when(event['at'])} {what}: {tokens}{failed}"))
    return lines


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=False)]
    return "\n".join(
        "  ".join(f"{cell!s:<{w}}" for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e4 else str(n)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _ago(ts: float) -> str:
    seconds = max(0, int(time.time() - ts))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


if __name__ == "__main__":
    sys.exit(main())
