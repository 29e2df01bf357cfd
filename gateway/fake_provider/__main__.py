"""``python -m gateway.fake_provider --port 8099``: run the fake provider in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json

from .app import serve
from .config import FakeProviderConfig, ToolCallSpec
from .faults import Fault, FaultError, parse_spec


def build_parser() -> argparse.ArgumentParser:
    """The options, each with its help (``gateway fake-provider --help``)."""
    parser = argparse.ArgumentParser(
        prog="gateway fake-provider",
        description=(
            "Run the offline fake LLM provider in the foreground: OpenAI Chat Completions and\n"
            "Responses, Anthropic Messages, strict like the real APIs, deterministic answers.\n"
            "Aim the gateway at it with GATEWAY_OPENAI_UPSTREAM=http://HOST:PORT/v1 and\n"
            "GATEWAY_ANTHROPIC_UPSTREAM=http://HOST:PORT. A request's x-fake-scenario header\n"
            "changes one answer (errors, cut streams, delays); --fault rules, or POST\n"
            "/_fake/faults, break every request for a while (outages the client does not ask for)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8099, help="listen port (default 8099)")
    parser.add_argument(
        "--usage-mode",
        choices=("bytes", "tiktoken"),
        default="bytes",
        help="how the reported input tokens are counted: JSON bytes / 4 (default), or tiktoken",
    )
    parser.add_argument(
        "--token-factor",
        type=float,
        default=1.0,
        metavar="F",
        help="multiply the reported input tokens by F (default 1)",
    )
    parser.add_argument(
        "--chunk-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="pause between the events of a streamed answer (default 0)",
    )
    parser.add_argument(
        "--reply-text", default=None, metavar="TEXT", help="the text every answer holds"
    )
    parser.add_argument(
        "--tool-loop",
        metavar="NAME:JSON",
        default=None,
        help='answer every call with this tool call (a runaway agent), e.g. \'ls:{"path": "."}\'',
    )
    parser.add_argument(
        "--no-record",
        action="store_true",
        help="do not keep the last 1,000 requests received (they are kept for tests)",
    )
    parser.add_argument(
        "--context-window",
        type=int,
        default=None,
        metavar="TOKENS",
        help="refuse a request with more input tokens, with the API's real overflow error",
    )
    parser.add_argument(
        "--fault",
        action="append",
        type=_fault,
        default=[],
        metavar="SPEC",
        help=(
            "start with this fault rule (repeatable, applied in order to every API request): "
            "KIND[:VALUE][:NAME=VALUE...], e.g. status:503:count=3:retry_after=1, reset:count=1, "
            "delay:2, hang, cut_stream:2, status:529:path=/v1/messages; change them at run "
            "time with POST/GET/DELETE /_fake/faults"
        ),
    )
    return parser


def _fault(spec: str) -> Fault:
    try:
        return parse_spec(spec)
    except FaultError as exc:
        raise argparse.ArgumentTypeError(f"{spec!r}: {exc}") from exc


def parse_args(argv: list[str] | None = None) -> tuple[str, int, FakeProviderConfig]:
    args = build_parser().parse_args(argv)
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
        faults=tuple(args.fault),
    )
    if args.reply_text is not None:
        config.reply_text = args.reply_text
    return args.host, args.port, config


def main(argv: list[str] | None = None) -> None:
    run(*parse_args(argv))


def run(host: str, port: int, config: FakeProviderConfig) -> None:
    """Serve in the foreground until Ctrl-C."""
    print(f"fake provider on http://{host}:{port}/v1", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(host, port, config))


if __name__ == "__main__":
    main()
