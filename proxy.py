"""Keystile: an OpenAI-compatible proxy with virtual keys in SQLite.

    python proxy.py --config config.yaml            serve (default 0.0.0.0:4000)
    python proxy.py keys create --config ... [...]  manage keys on the database file
    python proxy.py explain --key ALIAS --model M   why a request would be refused
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from keystile import cli
from keystile.config import ConfigError, load_config
from keystile.logs import configure_logging
from keystile.server import StartupError, serve

_COMMON_DEFAULTS = {"config": "config.yaml", "db": None, "log_level": "info"}


def _parser() -> argparse.ArgumentParser:
    # Shared by the main command and every subcommand.  SUPPRESS keeps a
    # subcommand from resetting a flag given before it to its default, so
    # "--config x keys list" and "keys list --config x" mean the same.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS,
                        help="config file (default: config.yaml)")
    common.add_argument("--db", default=argparse.SUPPRESS,
                        help="SQLite file; overrides general_settings.database_url")
    common.add_argument("--log-level", default=argparse.SUPPRESS,
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
    # Defaults applied here, not on the shared flags: argparse would copy
    # them into every subcommand, where they would override an earlier flag.
    for name, default in _COMMON_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, default)
    configure_logging(args.log_level)
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
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
