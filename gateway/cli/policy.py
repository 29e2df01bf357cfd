"""``gateway policy check/explain/reference`` and ``gateway config check/reference``: files and
references, no running gateway needed. The policy modules (pydantic, YAML) are imported when a
command runs.

The ``config`` group lives here because its commands are the ``policy`` ones' twins: ``config
check`` reads a file with the policy files' reader (``parse_yaml``: the same limits, errors at
their lines), ``config reference`` is generated from a schema as ``policy reference`` is.
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
    config_check = command(
        config_commands,
        "check",
        "validate a gateway config file",
        "Validate a config file as 'gateway serve --config' reads it: ok with a summary (exit\n"
        "0), every error with its line (exit 1), or a file that cannot be read (exit 2). The\n"
        "file alone: GATEWAY_* variables are not applied.",
    )
    config_check.add_argument("file", type=Path, metavar="FILE", help="the config file (YAML)")
    config_check.set_defaults(run=_config_check)


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


def _config_check(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from gateway.policy import PolicyError
    from gateway.policy.loader import MAX_POLICY_BYTES, decode_utf8, locate, parse_yaml
    from gateway.settings import load_settings

    source = str(args.file)
    try:
        with args.file.open("rb") as file:
            raw = file.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        print(f"{source}: cannot read the file: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if len(raw) > MAX_POLICY_BYTES:
        limit = MAX_POLICY_BYTES // 1024
        print(f"{source}: larger than {limit} KiB, the most a config file may be", file=sys.stderr)
        return 1
    try:
        # The policy files' reader: its limits (depth, aliases, expansion) and its lines.
        data, node = parse_yaml(decode_utf8(raw, source), source)
    except PolicyError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    if data is not None and not isinstance(data, dict):
        print(
            f"{source}: line 1: expected a mapping of settings (host: ..., port: ...)",
            file=sys.stderr,
        )
        return 1
    try:
        # What ``gateway serve --config`` does with it, reading the file again: within the
        # limits above it is safe to.
        settings = load_settings(args.file, env={}, resolve_references=False)
    except ValidationError as exc:
        for problem in locate(exc.errors(), node):
            print(f"{source}: {problem}", file=sys.stderr)
        return 1
    except Exception as exc:  # whatever a hostile file finds: said, not a traceback
        print(f"{source}: cannot be validated: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    upstreams = ", ".join(settings.upstreams)
    fallbacks = ", ".join(
        f"{name} -> {upstream.fallback.upstream}"
        for name, upstream in settings.upstreams.items()
        if upstream.fallback is not None
    )
    print(
        f"{source}: ok (upstreams: {upstreams}; fallbacks: {fallbacks or 'none'};"
        f" drain {settings.drain_timeout:g} s)"
    )
    return 0
