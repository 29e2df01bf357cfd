"""``gateway degrade on/off/status``: degraded mode by hand, through a running gateway's admin
API (the calls, the token and the connection options are the sessions commands')."""

from __future__ import annotations

import argparse
import json
from typing import Any

from gateway.cli.arguments import command, subcommands
from gateway.cli.formatting import ago, when
from gateway.cli.sessions import TOKEN_VARIABLE, admin_call, connection_options

PATH = "/gateway/degrade"


def add_commands(commands: Any) -> None:
    degrade = command(
        commands,
        "degrade",
        "put a running gateway in degraded mode by hand, take it out, or show why it is in it",
        "Degraded mode keeps forwarding and the hard limits and pauses optional work: summarize\n"
        "compaction falls back to the next strategy, content capture and debug logging stop.\n"
        "The gateway also enters it by itself (a store, span exporter or summarizer falling\n"
        "behind, event-loop lag); 'off' ends only the degraded mode set by hand. Every change\n"
        f"is audited. With an admin token set on the gateway, set {TOKEN_VARIABLE} here too.",
    )
    connection_options(degrade, copy=False)
    actions = subcommands(degrade, "degrade commands")

    on = command(actions, "on", "enter degraded mode by hand")
    on.add_argument("--reason", required=True, help="why, for the audit log and health")
    on.set_defaults(run=_degrade, on=True)

    off = command(actions, "off", "leave the degraded mode set by hand")
    off.add_argument("--reason", default="", help="why, for the audit log")
    off.set_defaults(run=_degrade, on=False)

    status = command(actions, "status", "whether the gateway runs degraded, and why")
    status.set_defaults(run=_status)

    for each in (on, off, status):
        connection_options(each, copy=True)


def _degrade(args: argparse.Namespace) -> int:
    data = admin_call(args, PATH, body={"on": args.on, "reason": args.reason})
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    if not data.get("changed"):
        print(f"degraded mode by hand was already {'on' if args.on else 'off'}")
    _print_status(data)
    return 0


def _status(args: argparse.Namespace) -> int:
    data = admin_call(args, PATH)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        _print_status(data)
    return 0


def _print_status(data: dict[str, Any]) -> None:
    reasons = data.get("reasons") or []
    if not reasons:
        print("not degraded")
        return
    print("degraded:")
    for r in reasons:
        detail = f": {r['detail']}" if r.get("detail") else ""
        since = f"{when(r['since'])} ({ago(r['since'])})"
        print(f"  {r['reason']} since {since}, by {r['actor']}{detail}")
