"""``gateway keys create/list/show/rotate/revoke``: gateway keys through a running gateway's
admin API (the sessions commands' calls, token and connection options); and ``keys hash``,
run here: a key's hash with this deployment's pepper, as a YAML entry for ``auth.keys``.

A key is printed once, alone on stdout (so ``KEY=$(gateway keys create ...)`` keeps it), with
what it is and the warning that it will not be shown again on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
from typing import Any

from gateway.cli.arguments import command, subcommands
from gateway.cli.formatting import table, when
from gateway.cli.sessions import TOKEN_VARIABLE, admin_call, connection_options

PATH = "/gateway/keys"
ONCE = "store it now: the gateway keeps only its hash and will not show it again"
MAX_KEY_INPUT = 1024
"""Characters read from stdin by ``keys hash``: a key is 65."""


def add_commands(commands: Any) -> None:
    keys = command(
        commands,
        "keys",
        "create, list, show, rotate and revoke gateway keys; hash one for the config",
        "Gateway keys (auth.mode keys or mixed): each is a principal of a team, with its own\n"
        "scopes, models, pool and expiry. All but 'hash' go through a running gateway's admin\n"
        f"API (a key-admin or admin role; set {TOKEN_VARIABLE}); 'hash' runs here, with the\n"
        "gateway's config and pepper, for keys declared in the config (auth.keys).",
    )
    connection_options(keys, copy=False)
    actions = subcommands(keys, "key commands")

    create = command(
        actions,
        "create",
        "a new key, printed once",
        "Create a key; it is printed once, on stdout. A key never holds more than its creator:\n"
        "a team-bound admin creates keys of its own teams only.",
    )
    create.add_argument("--team", required=True, help="the team it belongs to")
    create.add_argument("--name", required=True, help="its name (who or what uses it)")
    create.add_argument(
        "--models",
        action="append",
        metavar="GLOBS",
        help="model globs it may call, comma-separated or repeated (default: what the policy "
        "allows)",
    )
    create.add_argument(
        "--scopes",
        action="append",
        metavar="SCOPES",
        help="llm (the default), upstream:byok (may bring its own provider key, mixed mode); "
        "comma-separated or repeated",
    )
    create.add_argument(
        "--expires",
        metavar="DURATION",
        help="its lifetime: 90d, 24h, 30m or seconds (default: auth.key_expiry, 90d)",
    )
    create.add_argument("--pool", help="the upstream credential pool its calls use")
    create.set_defaults(run=_create)

    listing = command(actions, "list", "keys, oldest first (never a secret)")
    listing.add_argument("--team", help="only this team's")
    listing.set_defaults(run=_list)

    show = command(actions, "show", "one key")
    show.add_argument("key_id", metavar="ID", help="its public id (the part after gw_)")
    show.set_defaults(run=_show)

    rotate = command(
        actions,
        "rotate",
        "a new secret for a key, printed once; the old one works for a grace",
        "Give a key a new secret (same id: usage, budgets and dashboards go on). The previous\n"
        "secret keeps working until the grace ends, its calls answered with\n"
        "X-Gateway-Key-Deprecated, so callers can switch without an outage.",
    )
    rotate.add_argument("key_id", metavar="ID", help="its public id")
    rotate.add_argument(
        "--grace",
        metavar="DURATION",
        help="how long the previous secret works: 24h, 30m, 0 (default: auth.rotation_grace)",
    )
    rotate.set_defaults(run=_rotate)

    revoke = command(actions, "revoke", "refuse a key from now on")
    revoke.add_argument("key_id", metavar="ID", help="its public id")
    revoke.add_argument(
        "--now",
        action="store_true",
        help="ask every replica to drop it at once (each does within auth.key_cache anyway)",
    )
    revoke.set_defaults(run=_revoke)

    for each in (create, listing, show, rotate, revoke):
        connection_options(each, copy=True)

    hashing = command(
        actions,
        "hash",
        "a key's hash for auth.keys in the config (never the key)",
        "Print an auth.keys entry for a key: its id and its hash with this deployment's pepper\n"
        "(GATEWAY_KEY_PEPPER, auth.pepper_file, or the one the gateway generated in its state\n"
        "directory: give the gateway's --config). The key is read from stdin (typed without\n"
        "echo at a terminal); --new makes one and prints it once, on stderr.",
    )
    hashing.add_argument("--new", action="store_true", help="make a new key")
    hashing.add_argument("--config", help="the gateway's config file")
    hashing.add_argument("--team", help="the team it belongs to (else filled in by hand)")
    hashing.add_argument("--name", help="its name (else filled in by hand)")
    hashing.set_defaults(run=_hash)


def _split(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _key_path(key_id: str, action: str = "") -> str:
    path = f"{PATH}/{urllib.parse.quote(key_id, safe='')}"
    return f"{path}/{action}" if action else path


def _expiry(key: dict[str, Any]) -> str:
    return when(key["expires_at"]) if key.get("expires_at") else "never"


def _print_key(args: argparse.Namespace, data: dict[str, Any], what: str) -> None:
    """The key alone on stdout (or the whole answer, with --json), the rest on stderr."""
    print(json.dumps(data, indent=2) if args.json else data["key"])
    print(f"gateway: {what}; {ONCE}", file=sys.stderr)


# -- the commands ------------------------------------------------------------------------------
def _create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"team": args.team, "name": args.name}
    for field, value in (
        ("models", _split(args.models)),
        ("scopes", _split(args.scopes)),
        ("expires", args.expires),
        ("pool", args.pool),
    ):
        if value is not None:
            body[field] = value
    data = admin_call(args, PATH, body=body)
    what = f"key {data['id']} ({data['name']}, team {data['team']}, expires {_expiry(data)})"
    _print_key(args, data, what)
    return 0


def _list(args: argparse.Namespace) -> int:
    data = admin_call(args, PATH, {"team": args.team})
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    rows = [
        (
            k["id"],
            k["name"],
            k["team"],
            k["status"],
            ",".join(k["scopes"]),
            ",".join(k["models"]) or "*",
            _expiry(k),
            "config" if k.get("declared") else k.get("created_by") or "",
        )
        for k in data["keys"]
    ]
    header = ("ID", "NAME", "TEAM", "STATUS", "SCOPES", "MODELS", "EXPIRES", "CREATED BY")
    print(table(header, rows))
    return 0


def _show(args: argparse.Namespace) -> int:
    k = admin_call(args, _key_path(args.key_id))
    if args.json:
        print(json.dumps(k, indent=2))
        return 0
    lines = [
        ("key", k["id"]),
        ("name", k["name"]),
        ("team", k["team"]),
        ("status", k["status"]),
        ("scopes", ", ".join(k["scopes"])),
        ("models", ", ".join(k["models"]) or "what the policy allows"),
        ("pool", k.get("pool") or "the team's, or the only one"),
        ("expires", _expiry(k)),
        (
            "created",
            f"{when(k['created_at'])} by {k['created_by']}"
            if k.get("created_at")
            else "in the config (auth.keys)",
        ),
    ]
    if k.get("rotated_at"):
        lines.append(("rotated", when(k["rotated_at"])))
    if k.get("previous_until"):
        lines.append(("previous secret until", when(k["previous_until"])))
    if k.get("revoked_at"):
        lines.append(("revoked", when(k["revoked_at"])))
    width = max(len(name) for name, _ in lines)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in lines))
    return 0


def _rotate(args: argparse.Namespace) -> int:
    body = {} if args.grace is None else {"grace": args.grace}
    data = admin_call(args, _key_path(args.key_id, "rotate"), body=body)
    until = data.get("previous_until")
    previous = (
        f"the previous secret works until {when(until)}"
        if until
        else "the previous secret is refused from now"
    )
    _print_key(args, data, f"key {data['id']} rotated: {previous}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    data = admin_call(args, _key_path(args.key_id, "revoke"), body={"now": args.now})
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(f"key {data['id']} revoked at {when(data['revoked_at'])}")
    return 0


def _hash(args: argparse.Namespace) -> int:
    # The server's modules, only for this command (start-up stays at the standard library).
    import re
    from pathlib import Path

    from gateway.auth.config import NAME
    from gateway.auth.keys import digest, new_key, parse
    from gateway.auth.pepper import PepperMissing, load_pepper
    from gateway.settings import load_settings

    for option, value in (("--team", args.team), ("--name", args.name)):
        if value is not None and not re.match(NAME, value):
            print(f"gateway: {option}: letters, digits, '.', '_', '-' only", file=sys.stderr)
            return 2
    try:
        pepper = load_pepper(load_settings(Path(args.config) if args.config else None))
    except PepperMissing as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # a pydantic ValidationError is a ValueError
        print(f"gateway: the configuration is refused: {exc}", file=sys.stderr)
        return 2
    if args.new:
        _, key = new_key()
        token = key.reveal()
    else:
        token = _read_key()
    parsed = parse(token)
    if parsed is None:
        print(
            "gateway: that is not a gateway key (gw_..., 65 characters): check that it was"
            " copied whole",
            file=sys.stderr,
        )
        return 2
    key_id, secret = parsed
    hashed = digest(pepper.reveal().encode(), secret)
    print(f"# auth.keys entry for gateway key {key_id}: its hash with this deployment's pepper")
    print(f"- id: {key_id}")
    print(f"  hash: {hashed}")
    print(f"  name: {args.name}" if args.name else '  name: ""  # set: who or what uses it')
    print(f"  team: {args.team}" if args.team else '  team: ""  # set: the team it belongs to')
    print("  scopes: [llm]")
    if args.new:
        print(f"gateway: the new key is {token}\ngateway: {ONCE}", file=sys.stderr)
    return 0


def _read_key() -> str:
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass("gateway key (not echoed): ").strip()
    return sys.stdin.readline(MAX_KEY_INPUT).strip()
