"""Keystile: an OpenAI-compatible proxy with virtual keys in SQLite.

    python proxy.py --config config.yaml            serve (default 0.0.0.0:4000)
    python proxy.py keys create --config ... [...]  manage keys on the database file
    python proxy.py explain --key ALIAS --model M   why a request would be refused
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from keystile import cli
from keystile.config import ConfigError, load_config
from keystile.server import serve


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default="config.yaml", help="config file (default: config.yaml)")
    common.add_argument("--db", help="SQLite file; overrides general_settings.database_url")
    common.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])

    parser = argparse.ArgumentParser(
        prog="proxy.py", parents=[common],
        description="Keystile, an OpenAI-compatible proxy with virtual keys.",
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--port", type=int, default=4000, help="port to listen on")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    cli.add_commands(commands, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = load_config(args.config, args.db)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command is not None:
        return cli.run(args, config)
    try:
        import uvloop  # optional: a faster event loop when it is installed
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(serve(config, args.host, args.port))
    except OSError as exc:
        print(f"error: cannot serve on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
