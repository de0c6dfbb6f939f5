"""``python proxy.py keys ...`` and ``explain``: commands on the database file.

They work with or without a running proxy: they use the same SQLite file,
and a running proxy notices a change within about a second.
Exit codes: 0 done, 1 no such key, 2 bad input, 3 (explain only) the
explained request would be refused.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import orjson

from keystore import KeyFilter, KeyRecord, KeystoreError, open_keystore
from policies import build_chain

from . import explain
from .config import Config
from .errors import BadRequest, NotFound, ProxyError
from .keyfields import GENERATE_FIELDS, parse_duration, validate_fields
from .keys import KeyService
from .router import Router

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

    parser = commands.add_parser(
        "explain", parents=[common],
        help="dry-run the policy chain for a key and a request (no upstream call)",
    )
    parser.add_argument("--key", required=True, help="the key, its hash or its alias")
    parser.add_argument("--model", help="the model the request names")
    parser.add_argument("--user", help="the request's user param")
    parser.add_argument("--endpoint", default="chat",
                        help="chat (default), completions or embeddings")
    parser.add_argument("--body", type=_json_object,
                        help="more request body fields as a JSON object")
    parser.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                        help="a request header, such as a param header; repeatable")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def run(args: argparse.Namespace, config: Config) -> int:
    creating = args.command == "keys" and args.action == "create"
    if not creating and not config.database_path.exists():
        # Only creating a key may start a new file: anything else on a
        # missing file is a mistyped path, not an empty keystore.
        print(f"error: no database at {config.database_path} (check --db or "
              "general_settings.database_url)", file=sys.stderr)
        return 2
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
        if args.command == "explain":
            return await _explain(args, config, service)
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
    rows: list[tuple[str, ...]] = [columns]
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


def _request_body(args: argparse.Namespace) -> dict[str, Any]:
    body = args.body if args.body is not None else {}
    if not isinstance(body, dict):
        raise BadRequest("--body must be a JSON object", param="body")
    body = dict(body)
    body.setdefault("endpoint", args.endpoint)
    for name in ("model", "user"):
        value = getattr(args, name)
        if value is not None:
            body[name] = value
    return body


def _headers(args: argparse.Namespace) -> dict[str, str]:
    headers = {}
    for header in args.header:
        name, colon, value = header.partition(":")
        if not colon or not name.strip():
            raise BadRequest(f"--header must look like 'Name: value', got {header!r}")
        headers[name.strip()] = value.strip()
    return headers


async def _explain(args: argparse.Namespace, config: Config, service: KeyService) -> int:
    # The operator at the database file may explain any key, as the master may.
    endpoint, _, body = explain.split_body(_request_body(args))
    subject = await explain.name_key(service, args.key, _headers(args))
    router = Router(config.deployments)
    chain = build_chain(config, service.keystore, router)
    ctx = explain.context(endpoint, body, subject)
    answer = await explain.explain(chain, router, ctx, subject.described)
    if args.json:
        print(orjson.dumps(answer).decode())
    else:
        _show_explanation(answer)
    return 0 if answer["allowed"] else 3


def _show_explanation(answer: dict[str, Any]) -> None:
    key = answer["key"]
    if key is None:
        who = "unknown"
    elif key["account_type"] == "master":
        who = "the master key"
    else:
        who = f"{key['key_alias'] or '-'}  {key['key_name']}  {key['account_type']}"
    error = answer["error"]
    deployment = answer["deployment"]
    rows = [
        ("key", who),
        ("endpoint", f"POST /{answer['endpoint']}"),
        ("allowed", "yes" if answer["allowed"] else f"no, refused by {answer['rejected_by']}"),
        ("error", "-" if error is None else
         f"{error['status']} {orjson.dumps(error['body']).decode()}"),
        ("model_group", answer["model_group"] or "-"),
        ("deployment", "-" if deployment is None else
         f"{deployment['id']}  {deployment['provider']}/{deployment['model']}  "
         f"{deployment['api_base'] or '(built in)'}"),
        ("fallbacks", ", ".join(answer["fallbacks"]) or "-"),
        ("cooling_down", ", ".join(answer["cooling_down"]) or "-"),
    ]
    for name, value in rows:
        print(f"{name:<12}  {value}")
    print()
    checks = [("policy", "outcome", "reason")] + [
        (check["policy"], check["outcome"].replace("_", " "), check["reason"])
        for check in answer["checks"]
    ]
    widths = [max(len(row[i]) for row in checks) for i in range(2)]
    for policy, outcome, reason in checks:
        print(f"{policy:<{widths[0]}}  {outcome:<{widths[1]}}  {reason}")
