"""``gateway credentials reload/status``: the upstream credential pools of a running gateway,
through its admin API (the calls, the token and the connection options are the sessions
commands')."""

from __future__ import annotations

import argparse
import json
from typing import Any

from gateway.cli.arguments import command, subcommands
from gateway.cli.formatting import ago, plural, table, when
from gateway.cli.sessions import TOKEN_VARIABLE, admin_call, connection_options

PATH = "/gateway/credentials"


def add_commands(commands: Any) -> None:
    credentials = command(
        commands,
        "credentials",
        "reload and show the upstream credential pools of a running gateway",
        "The provider credentials a gateway sends in keys, jwt and mixed modes are references\n"
        "(env:VARIABLE, file:/path) in upstreams.<name>.credentials. 'reload' reads each one\n"
        "again without a restart (a changed file is also picked up by itself within a second,\n"
        "and SIGHUP reloads); a reference that cannot be read keeps its previous value.\n"
        "env: references are read from the gateway's own environment, which a running process\n"
        "keeps: rotate through files (a mounted Secret). Values are never shown.\n"
        f"With an admin token set on the gateway, set {TOKEN_VARIABLE} here too.",
    )
    connection_options(credentials, copy=False)
    actions = subcommands(credentials, "credentials commands")

    reload = command(actions, "reload", "read every credential reference again")
    reload.add_argument("--reason", default="", help="why, for the audit log")
    reload.set_defaults(run=_reload)

    status = command(actions, "status", "each pool's entries, healthy or not, and the last reload")
    status.set_defaults(run=_status)

    for each in (reload, status):
        connection_options(each, copy=True)


def _reload(args: argparse.Namespace) -> int:
    data = admin_call(args, f"{PATH}/reload", body={"reason": args.reason})
    if args.json:
        print(json.dumps(data, indent=2))
        return 0 if data.get("ok") else 1
    changed, failed = data.get("changed") or [], data.get("failed") or {}
    total = len(changed) + int(data.get("unchanged") or 0) + len(failed)
    print(f"reloaded {plural(total, 'credential')}: {len(changed)} changed")
    for where in changed:
        print(f"  changed: {where}")
    if failed:
        print(f"{len(failed)} could not be read and keep their previous value:")
        for where, error in failed.items():
            print(f"  {where}: {error}")
        return 1
    return 0


def _status(args: argparse.Namespace) -> int:
    data = admin_call(args, PATH)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    rows = [
        (upstream, pool, e["name"], e["reference"], _state(e))
        for upstream, pools in sorted((data.get("upstreams") or {}).items())
        for pool, held in sorted(pools.items())
        for e in held["entries"]
    ]
    if rows:
        print(table(("UPSTREAM", "POOL", "ENTRY", "REFERENCE", "STATE"), rows))
    else:
        print("no upstream credential pools configured")
    if data.get("reloaded_at"):
        at = data["reloaded_at"]
        print(f"last loaded {when(at)} ({ago(at)}): {data.get('reload_reason') or '-'}")
    return 0


def _state(entry: dict[str, Any]) -> str:
    if not entry.get("resolved"):
        return f"unresolved: {entry.get('error') or 'not read'}"
    if entry.get("healthy"):
        state = "healthy"
    else:
        state = f"refused {entry.get('failed_status')} {ago(entry.get('failed_at') or 0)}"
        state += f", retried in {int(entry.get('retry_in') or 0)}s"
    if entry.get("error"):  # read before, unreadable at the last reload: the old value serves
        state += f" (last reload: {entry['error']})"
    return state
