"""``python proxy.py keys ...``: key management on the database file.

It works with or without a running proxy: it writes to the same SQLite
file, and a running proxy notices the change within about a second.
Exit codes: 0 done, 1 no such key, 2 bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import orjson

from keystore import KeyFilter, KeyRecord, KeystoreError, open_keystore

from .config import Config
from .errors import BadRequest, NotFound, ProxyError
from .keyfields import GENERATE_FIELDS, parse_duration, validate_fields
from .keys import KeyService

__all__ = ["add_commands", "run"]

_ACTIONS = ("create", "list", "info", "update", "block", "unblock", "delete", "regenerate")


def _csv(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _json_object(value: str) -> Any:
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc


def _add_field_flags(parser: argparse.ArgumentParser, *, update: bool) -> None:
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--service-account", dest="account_type", action="store_const",
                      const="service_account", help="a service-account key")
    if update:
        kind.add_argument("--user-account", dest="account_type", action="store_const",
                          const="user", help="make it a user key")
    parser.add_argument("--alias", dest="key_alias", help="unique name for the key")
    parser.add_argument("--user-id")
    parser.add_argument("--team-id")
    parser.add_argument("--models", type=_csv, help="allowed model names, comma-separated")
    parser.add_argument("--aliases", type=_json_object,
                        help='model aliases as JSON: {"public-name": "model_name"}')
    parser.add_argument("--metadata", type=_json_object, help="metadata as a JSON object")
    parser.add_argument("--duration", help='lifetime such as "30s", "12h", "30d"')
    parser.add_argument("--enforce", dest="enforced_params", type=_csv,
                        help="required body params, comma-separated (dotted paths allowed)")
    parser.add_argument("--rpm-limit", type=int)
    parser.add_argument("--tpm-limit", type=int)
    parser.add_argument("--max-parallel", dest="max_parallel_requests", type=int)
    parser.add_argument("--max-budget", type=float)
    parser.add_argument("--budget-duration", help='budget period such as "30d"')
    if not update:
        parser.add_argument("--key", help="a custom key (sk-..., 20+ characters)")
        parser.add_argument("--blocked", action="store_true", default=None)


def add_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    keys = commands.add_parser("keys", help="manage virtual keys in the database file")
    actions = keys.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action in _ACTIONS:
        parser = actions.add_parser(action, parents=[common])
        parser.add_argument("--json", action="store_true", help="print JSON for scripts")
        if action not in ("create", "list"):
            nargs = "+" if action == "delete" else None
            parser.add_argument("ref", nargs=nargs, help="the key, its hash or its alias")
        if action in ("create", "update"):
            _add_field_flags(parser, update=action == "update")
        if action == "list":
            parser.add_argument("--account-type", choices=["user", "service_account"])
            parser.add_argument("--alias", dest="key_alias")
            parser.add_argument("--user-id")
            parser.add_argument("--team-id")
            parser.add_argument("--page", type=int, default=1)
            parser.add_argument("--size", type=int, default=100)
        if action == "regenerate":
            parser.add_argument("--grace-period", help='old key keeps working, e.g. "1h"')


def run(args: argparse.Namespace, config: Config) -> int:
    try:
        return asyncio.run(_run(args, config))
    except NotFound as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except (ProxyError, KeystoreError) as exc:
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    names = GENERATE_FIELDS - {"key"} if args.action == "update" else GENERATE_FIELDS
    raw = {name: getattr(args, name) for name in names
           if getattr(args, name, None) is not None}
    return validate_fields(raw, GENERATE_FIELDS)


async def _run(args: argparse.Namespace, config: Config) -> int:
    keystore = await open_keystore(config.database_path)
    try:
        service = KeyService(keystore)
        action = args.action
        if action == "create":
            raw, record = await service.generate(_fields(args))
            _show(args, record, raw)
        elif action == "list":
            where = KeyFilter(args.account_type, args.key_alias, args.user_id, args.team_id)
            page = await service.list(where, args.page, args.size)
            _show_list(args, page.keys, page.total_count)
        elif action == "info":
            _show(args, await service.lookup(args.ref))
        elif action == "update":
            fields = _fields(args)
            if not fields:
                raise BadRequest("Nothing to change: pass at least one field flag")
            _show(args, await service.update(args.ref, fields))
        elif action in ("block", "unblock"):
            _show(args, await service.update(args.ref, {"blocked": action == "block"}))
        elif action == "delete":
            tokens = await service.delete([(ref, "key") for ref in args.ref])
            if args.json:
                print(orjson.dumps({"deleted_keys": tokens}).decode())
            else:
                print(f"deleted {len(tokens)} key(s)")
        elif action == "regenerate":
            grace = args.grace_period
            seconds = None if grace is None else parse_duration(grace, "grace_period")
            raw, record = await service.regenerate(args.ref, seconds)
            _show(args, record, raw)
        return 0
    finally:
        await keystore.close()


def _show(args: argparse.Namespace, record: KeyRecord, raw: str | None = None) -> None:
    public = record.public()
    if args.json:
        print(orjson.dumps(({"key": raw} if raw else {}) | public).decode())
        return
    if raw is not None:
        print(f"key: {raw}")
        print("  (shown once: store it now, it cannot be recovered)")
    width = max(len(name) for name in public)
    for name, value in public.items():
        if isinstance(value, list | dict):
            value = orjson.dumps(value).decode()
        print(f"{name:<{width}}  {'' if value is None else value}")


def _show_list(args: argparse.Namespace, records: list[KeyRecord], total: int) -> None:
    if args.json:
        print(orjson.dumps({"keys": [r.public() for r in records],
                            "total_count": total}).decode())
        return
    columns = ("key_alias", "key_name", "account_type", "models", "blocked", "expires",
               "token")
    rows = [columns]
    for record in records:
        public = record.public()
        rows.append(tuple(
            ",".join(public[c]) if c == "models" else
            public[c][:12] if c == "token" else
            "" if public[c] is None else str(public[c])
            for c in columns
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(f"{len(records)} of {total} key(s)")
