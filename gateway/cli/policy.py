"""``gateway policy check/explain/reference`` and ``gateway config reference``: files and
references, no running gateway needed. The policy modules (pydantic, YAML) are imported when a
command runs.

The ``config`` group lives here while its one command, like ``policy reference``, prints a
reference generated from a schema; the ``config`` commands to come take it to a module of its
own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gateway.cli.arguments import command, subcommands
from gateway.cli.formatting import plural


def add_commands(commands: Any) -> None:
    """The ``policy`` group, then the ``config`` group."""
    policy = command(commands, "policy", "check, explain and document policy files")
    policy_commands = subcommands(policy, "policy commands")

    check = command(
        policy_commands,
        "check",
        "validate a policy file",
        "Validate a policy file: ok with its version and rules (exit 0), or its errors with\n"
        "their lines (exit 1).",
    )
    check.add_argument("file", type=Path, metavar="FILE", help="the policy file (YAML)")
    check.set_defaults(run=_policy_check)

    explain = command(
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

    reference = command(
        policy_commands,
        "reference",
        "print the policy reference (every setting; docs/policy-reference.md)",
    )
    reference.set_defaults(run=_policy_reference)

    config = command(commands, "config", "the gateway's own settings")
    config_commands = subcommands(config, "config commands")
    config_reference = command(
        config_commands,
        "reference",
        "print every config key, its default and its GATEWAY_* variable (docs/config-reference.md)",
    )
    config_reference.set_defaults(run=_config_reference)


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
    rules = plural(len(policy.rules), "rule")
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
