"""``python -m gateway.fake_provider --port 8099``: run the fake provider in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json

from .app import serve
from .config import FakeProviderConfig, ToolCallSpec


def parse_args(argv: list[str] | None = None) -> tuple[str, int, FakeProviderConfig]:
    parser = argparse.ArgumentParser(prog="gateway fake-provider", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--usage-mode", choices=("bytes", "tiktoken"), default="bytes")
    parser.add_argument("--token-factor", type=float, default=1.0)
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    parser.add_argument("--reply-text", default=None)
    parser.add_argument("--tool-loop", metavar="NAME:JSON", default=None)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--context-window", type=int, default=None, metavar="TOKENS")
    args = parser.parse_args(argv)
    tool_loop = None
    if args.tool_loop:
        name, _, raw = args.tool_loop.partition(":")
        tool_loop = ToolCallSpec(name=name, arguments=json.loads(raw) if raw else {})
    config = FakeProviderConfig(
        tool_loop=tool_loop,
        token_factor=args.token_factor,
        usage_mode=args.usage_mode,
        chunk_delay=args.chunk_delay,
        record=not args.no_record,
        context_window=args.context_window,
    )
    if args.reply_text is not None:
        config.reply_text = args.reply_text
    return args.host, args.port, config


def main(argv: list[str] | None = None) -> None:
    host, port, config = parse_args(argv)
    print(f"fake provider on http://{host}:{port}/v1", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(host, port, config))


if __name__ == "__main__":
    main()
