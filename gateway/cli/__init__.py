"""``gateway``: the command line. One module per group of commands, each adding its own
parsers (``add_commands``) and holding what they run:

- ``serve``: ``serve`` and ``fake-provider``, the two that run a server;
- ``sessions``: ``sessions list/show/grant/end``, calls to a running gateway's admin API;
- ``degrade``: ``degrade on/off/status``, degraded mode by hand through the same API;
- ``keys``: ``keys create/list/show/rotate/revoke`` through the same API, and ``keys hash``
  (a key's hash for ``auth.keys``, made here with the gateway's pepper);
- ``credentials``: ``credentials reload/status``, the upstream credential pools, the same way;
- ``policy``: ``policy check/explain/reference`` and ``config reference``;
- ``audit``: ``audit verify``, the audit log's hash chain checked from its file;
- ``arguments`` (the help formatter, subcommands, number options) and ``formatting`` (tables,
  counts, times) are what they share.

A new group of commands is a module with an ``add_commands`` and one line in ``_parser``.
Start-up stays at the standard library: every module that needs more (aiohttp, pydantic, the
store, the tokenizer) imports it inside the command that runs, and ``tests/test_cli.py``
checks it.

The help text is plain text written for a terminal (``DESCRIPTION`` and each option's
``help``), not these docstrings.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gateway.cli import audit, credentials, degrade, keys, policy, serve, sessions
from gateway.cli.arguments import HelpFormatter
from gateway.cli.sessions import DEFAULT_URL, SESSION_STATUSES, TOKEN_VARIABLE, URL_VARIABLE

__all__ = ["DESCRIPTION", "EPILOG", "SESSION_STATUSES", "main"]

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
        return serve.fake_provider(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    result: int = args.run(args)
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway", description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    serve.add_commands(commands)  # serve, fake-provider
    sessions.add_commands(commands)  # sessions list/show/grant/end
    degrade.add_commands(commands)  # degrade on/off/status
    keys.add_commands(commands)  # keys create/list/show/rotate/revoke/hash
    credentials.add_commands(commands)  # credentials reload/status
    policy.add_commands(commands)  # policy check/explain/reference, config reference
    audit.add_commands(commands)  # audit verify
    return parser
