"""The argparse pieces every command module uses: the help formatter, a subcommand, and the
number types of options."""

from __future__ import annotations

import argparse
from typing import Any


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs kept as written (they hold lists); option help wrapped."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)


def command(
    commands: Any, name: str, summary: str, description: str | None = None
) -> argparse.ArgumentParser:
    """A subcommand: ``summary`` in its parent's list, ``description`` (or the summary) in
    its own help."""
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        help=summary,
        description=description or summary[:1].upper() + summary[1:] + ".",
        formatter_class=HelpFormatter,
    )
    return parser


def subcommands(group: argparse.ArgumentParser, title: str) -> Any:
    """The commands of a group (``gateway policy check``): one of them is required."""
    commands = group.add_subparsers(title=title, metavar="COMMAND")
    commands.required = True
    return commands


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def not_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value
