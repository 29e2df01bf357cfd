"""``gateway sessions list/show/grant/end``: calls to a running gateway's admin API (urllib,
the standard library only) and the tables they print.

Options of ``sessions`` go before or after its subcommand (``gateway sessions --json list``
and ``gateway sessions list --json``): each subcommand carries a copy whose default is
``SUPPRESS``, so a value given before is not overwritten.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from gateway.cli.arguments import command, not_negative, positive, subcommands
from gateway.cli.formatting import ago, count, plural, table, when

DEFAULT_URL = "http://127.0.0.1:8787"
TOKEN_VARIABLE = "GATEWAY_ADMIN_TOKEN"
URL_VARIABLE = "GATEWAY_URL"
SESSION_STATUSES = ("active", "paused", "ended")
"""The store's ``SESSION_STATUSES`` (gateway.store.records), copied: importing the store costs
the CLI 170 ms of start-up. ``tests/test_cli.py`` keeps the two equal."""


def add_commands(commands: Any) -> None:
    sessions = command(
        commands,
        "sessions",
        "list, show, grant and end the sessions of a running gateway",
        "List, show, grant and end the sessions of a running gateway, through its admin API.\n"
        f"With an admin token set on the gateway, set {TOKEN_VARIABLE} here too (or pass --token).",
    )
    connection_options(sessions, copy=False)
    session_commands = subcommands(sessions, "session commands")

    listing = command(session_commands, "list", "sessions, newest first")
    listing.add_argument("--agent", help="only this agent's (claude-code, codex, opencode, ...)")
    listing.add_argument(
        "--status", choices=SESSION_STATUSES, help="only the sessions in this status"
    )
    listing.add_argument(
        "--limit", type=positive, default=50, help="at most this many (default 50)"
    )
    listing.set_defaults(run=_sessions_list)

    show = command(session_commands, "show", "one session in full")
    show.add_argument("session_id", metavar="SESSION", help="the session's id")
    show.set_defaults(run=_sessions_show)

    grant = command(
        session_commands,
        "grant",
        "more turns or tokens for a session",
        "Give a session more turns and/or tokens than its limits allow; a grant also lifts a\n"
        "loop stop and resumes a paused session. An ended session refuses it.",
    )
    grant.add_argument("session_id", metavar="SESSION", help="the session's id")
    grant.add_argument("--turns", type=not_negative, default=0, help="turns to add")
    grant.add_argument("--tokens", type=not_negative, default=0, help="tokens to add")
    grant.add_argument("--reason", default="", help="why, for the audit log")
    grant.add_argument("--by", default=None, help="who grants it (default: $USER)")
    grant.set_defaults(run=_sessions_grant)

    end = command(
        session_commands,
        "end",
        "end a session: its next calls are refused",
        "End a session: its next calls are refused, and no grant re-opens it.",
    )
    end.add_argument("session_id", metavar="SESSION", help="the session's id")
    end.add_argument("--reason", default="", help="why, for the audit log and the refusals")
    end.add_argument("--by", default=None, help="who ends it (default: $USER)")
    end.set_defaults(run=_sessions_end)

    for each in (listing, show, grant, end):
        connection_options(each, copy=True)


def connection_options(parser: argparse.ArgumentParser, *, copy: bool) -> None:
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


# -- the admin API -----------------------------------------------------------------------------
def admin_call(
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
    token = args.token or os.environ.get(TOKEN_VARIABLE) or _generated_token()
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with _NO_REDIRECTS.open(request, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"gateway: {_refusal(exc, sent_token=bool(token))}") from exc
    except urllib.error.URLError as exc:
        raise SystemExit(f"gateway: cannot reach {base}: {exc.reason}") from exc


class _Refuse(urllib.request.HTTPRedirectHandler):
    """The admin API never redirects; urllib would follow one with the admin token to any
    host, so a redirect is answered as the error it is."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_NO_REDIRECTS = urllib.request.build_opener(_Refuse)


def _generated_token() -> str | None:
    """The token a gateway generated on first start into its state directory (the same
    default: ``GATEWAY_STATE_DIR``, else beside ``GATEWAY_STORE``'s SQLite file, else
    ``gateway.db``'s in this directory), when this user may read it."""
    from pathlib import Path

    from gateway.state import ADMIN_TOKEN_FILE, read_state, state_dir

    configured = os.environ.get("GATEWAY_STATE_DIR")
    store = os.environ.get("GATEWAY_STORE") or "sqlite:///gateway.db"
    directory = state_dir(Path(configured) if configured else None, store)
    try:
        return read_state(directory, ADMIN_TOKEN_FILE)
    except (OSError, ValueError):
        return None


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


def _session_path(session_id: str, action: str = "") -> str:
    path = "/gateway/sessions/" + urllib.parse.quote(session_id, safe="")
    return f"{path}/{action}" if action else path


def _by(args: argparse.Namespace) -> str:
    by: str = args.by or os.environ.get("USER") or "operator"
    return by


# -- the commands ------------------------------------------------------------------------------
def _sessions_list(args: argparse.Namespace) -> int:
    data = admin_call(
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
            count(s["tokens"]["input_tokens"]),
            count(s["tokens"]["output_tokens"]),
            ago(s["last_seen"]),
            s["source"],
        )
        for s in data["sessions"]
    ]
    header = ("SESSION", "NAME", "AGENT", "STATUS", "TURNS", "IN", "OUT", "LAST SEEN", "SOURCE")
    print(table(header, rows))
    return 0


def _sessions_show(args: argparse.Namespace) -> int:
    s = admin_call(args, _session_path(args.session_id))
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
        ("first seen", when(s["first_seen"])),
        ("last seen", f"{when(s['last_seen'])} ({ago(s['last_seen'])})"),
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
        (m, str(c["turns"]), count(c["input_tokens"]), count(c["output_tokens"]))
        for m, c in s["models"].items()
    ]
    if models:
        print()
        print(table(("MODEL", "TURNS", "IN", "OUT"), models))
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
                f"{plural(s['compacted_calls'], 'call')}, {count(s['tokens_saved'])} tokens "
                f"saved, {plural(s['summary_calls'], 'summary call')}",
            )
        )
    for event in s.get("compactions", [])[-3:]:
        what = ",".join(event["strategies"]) or "nothing"
        tokens = f"{count(event['tokens_before'])} -> {count(event['tokens_after'])} tokens"
        failed = f" ({'; '.join(event['failures'])})" if event.get("failures") else ""
        lines.append(("compaction", f"{when(event['at'])} {what}: {tokens}{failed}"))
    return lines


def _sessions_grant(args: argparse.Namespace) -> int:
    if not (args.turns or args.tokens):
        print("gateway: grant a positive number of --turns and/or --tokens", file=sys.stderr)
        return 2
    body = {"turns": args.turns, "tokens": args.tokens, "reason": args.reason, "by": _by(args)}
    s = admin_call(args, _session_path(args.session_id, "grant"), body=body)
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
    s = admin_call(args, _session_path(args.session_id, "end"), body=body)
    # The reason says who ended it and why: "ended by dana: runaway".
    print(json.dumps(s, indent=2) if args.json else f"session {s['id']} {s['status_reason']}")
    return 0
