"""Ledger check: many concurrent requests through a real Keystile, then proof
that the usage ledger and the limits held.

  python bench/ledger_check.py                  # 1000 requests, 20 clients
  python bench/ledger_check.py --requests 200 --clients 10

Starts a fake OpenAI upstream in this process and Keystile (proxy.py) as a
subprocess, both on 127.0.0.1 with ephemeral ports, creates keys with and
without limits, sends a mix of plain and streamed chat completions from
several end users, stops Keystile with SIGTERM (which must write the
ledger out), and then checks, from the SQLite file alone:

- every request is in the ledger, with the status its client saw;
- per key, the ledger's token sums equal what the upstream reported;
- the upstream's usage chunk reached exactly the clients that asked for it;
- rpm_limit and max_parallel_requests were never passed (as the upstream
  saw the requests arrive), and the rpm key got exactly its limit through;
- tpm_limit and max_budget were passed only by requests that were already
  in flight when the limit was reached;
- each key's spend equals the sum of its ledger costs.

Exits 0 when every check passes, 1 otherwise.  Every process it starts is
stopped before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from aiohttp import web

REPO = Path(__file__).resolve().parent.parent
MASTER = "sk-ledger-check-master-key-000"
PRICE_IN, PRICE_OUT = 0.00001, 0.00003
WINDOW = 60.0

KEYS: dict[str, dict[str, Any]] = {
    "free": {},
    "rpm": {"rpm_limit": 40},
    "parallel": {"max_parallel_requests": 3},
    "tpm": {"tpm_limit": 3000},
    "budget": {"max_budget": 0.02},
    "mixed": {"rpm_limit": 500, "max_parallel_requests": 5, "tpm_limit": 20000},
}
USERS = ["ann", "bo", "cy", "dee", "eli", None]


@dataclass
class Upstream:
    """A fake OpenAI server that reports random usage and notes what it saw."""

    usage: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    arrivals: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    in_flight: Counter[str] = field(default_factory=Counter)
    peak: Counter[str] = field(default_factory=Counter)
    asked_usage: int = 0
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        key = request.headers.get("x-check-key", "?")
        self.arrivals[key].append(time.monotonic())
        self.in_flight[key] += 1
        self.peak[key] = max(self.peak[key], self.in_flight[key])
        try:
            await asyncio.sleep(self.rng.uniform(0.002, 0.03))
            prompt, completion = self.rng.randint(5, 60), self.rng.randint(3, 40)
            usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                     "total_tokens": prompt + completion}
            if not body.get("stream"):
                answer = {"id": "chatcmpl-check", "object": "chat.completion",
                          "created": 0, "model": body["model"],
                          "choices": [{"index": 0, "finish_reason": "stop",
                                       "message": {"role": "assistant", "content": "ok"}}],
                          "usage": usage}
                self._count(key, usage)
                return web.Response(body=orjson.dumps(answer),
                                    content_type="application/json")
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for i in range(4):
                await response.write(b"data: " + orjson.dumps({
                    "id": "chatcmpl-check", "object": "chat.completion.chunk", "created": 0,
                    "model": body["model"],
                    "choices": [{"index": 0, "delta": {"content": f"w{i} "},
                                 "finish_reason": "stop" if i == 3 else None}],
                }) + b"\n\n")
            if (body.get("stream_options") or {}).get("include_usage"):
                self.asked_usage += 1
                self._count(key, usage)
                await response.write(b"data: " + orjson.dumps({
                    "id": "chatcmpl-check", "object": "chat.completion.chunk",
                    "created": 0, "model": body["model"], "choices": [], "usage": usage,
                }) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        finally:
            self.in_flight[key] -= 1

    def _count(self, key: str, usage: dict[str, int]) -> None:
        self.usage[key][0] += usage["prompt_tokens"]
        self.usage[key][1] += usage["completion_tokens"]


@dataclass
class Sent:
    key: str
    stream: bool
    asked_usage: bool
    status: int = 0
    saw_usage: bool = False


async def start_proxy(workdir: Path, upstream_url: str) -> tuple[subprocess.Popen[str], str]:
    config = {
        "model_list": [{
            "model_name": "gpt-3.5-turbo",
            "litellm_params": {"model": "openai/gpt-3.5-turbo", "api_base": upstream_url,
                               "api_key": "sk-fake"},
            "model_info": {"input_cost_per_token": PRICE_IN,
                           "output_cost_per_token": PRICE_OUT},
        }],
        "general_settings": {"master_key": MASTER},
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    process = subprocess.Popen(
        [sys.executable, str(REPO / "proxy.py"), "--config", str(workdir / "config.yaml"),
         "--db", str(workdir / "ledger.db"), "--host", "127.0.0.1", "--port", "0"],
        stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    assert process.stderr is not None
    deadline = time.monotonic() + 20
    while True:
        line = await asyncio.wait_for(asyncio.to_thread(process.stderr.readline),
                                      deadline - time.monotonic())
        if not line:
            raise RuntimeError("Keystile exited before listening")
        if "listening on" in line:
            url = line.split("listening on ")[1].split()[0]
            break
    # Drain the access log so the pipe never fills and blocks the proxy.
    asyncio.get_running_loop().run_in_executor(None, _drain, process)
    return process, url


def _drain(process: subprocess.Popen[str]) -> None:
    assert process.stderr is not None
    for _ in process.stderr:
        pass


async def run(args: argparse.Namespace) -> int:
    upstream = Upstream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream_url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"

    with tempfile.TemporaryDirectory(prefix="ledger-check-") as tmp:
        workdir = Path(tmp)
        process, url = await start_proxy(workdir, upstream_url)
        try:
            sent, elapsed = await drive(args, url)
            process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(process.wait, 30)
            print(f"Keystile stopped by SIGTERM, exit status {code}")
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            await runner.cleanup()
        return report(args, workdir / "ledger.db", upstream, sent, elapsed)


async def drive(args: argparse.Namespace, url: str) -> tuple[list[Sent], float]:
    rng = random.Random(args.seed)
    connector = aiohttp.TCPConnector(limit=args.clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        raw_keys: dict[str, str] = {}
        for name, limits in KEYS.items():
            async with session.post(url + "/key/generate",
                                    json={"key_alias": f"check-{name}"} | limits,
                                    headers={"Authorization": f"Bearer {MASTER}"}) as r:
                raw_keys[name] = (await r.json())["key"]
        plan = []
        for _ in range(args.requests):
            stream = rng.random() < 0.4
            plan.append((rng.choice(list(KEYS)), rng.choice(USERS), stream,
                         stream and rng.random() < 0.5))
        queue: asyncio.Queue[tuple[str, str | None, bool, bool]] = asyncio.Queue()
        for item in plan:
            queue.put_nowait(item)
        sent: list[Sent] = []

        async def client() -> None:
            while not queue.empty():
                key, user, stream, asked = queue.get_nowait()
                body: dict[str, Any] = {"model": "gpt-3.5-turbo",
                                        "messages": [{"role": "user", "content": "hi"}]}
                if user:
                    body["user"] = user
                if stream:
                    body["stream"] = True
                if asked:
                    body["stream_options"] = {"include_usage": True}
                record = Sent(key, stream, asked)
                async with session.post(
                    url + "/chat/completions", json=body,
                    headers={"Authorization": f"Bearer {raw_keys[key]}",
                             "x-check-key": key},
                ) as response:
                    raw = await response.read()
                    record.status = response.status
                    record.saw_usage = stream and b'"usage":{' in raw
                sent.append(record)

        started = time.monotonic()
        await asyncio.gather(*[client() for _ in range(args.clients)])
        return sent, time.monotonic() - started


def _seconds(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def report(args: argparse.Namespace, db: Path, upstream: Upstream,
           sent: list[Sent], elapsed: float) -> int:
    connection = sqlite3.connect(db)
    connection.row_factory = sqlite3.Row
    rows = [dict(r) for r in connection.execute("SELECT * FROM usage ORDER BY id")]
    spend = {r["key_alias"]: r["spend"] for r in connection.execute(
        "SELECT key_alias, spend FROM keys")}
    connection.close()
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(f"  [{'ok' if ok else 'FAIL'}] {what}")
        if not ok:
            failures.append(what)

    statuses = Counter(s.status for s in sent)
    print(f"{len(sent)} requests from {args.clients} clients in {elapsed:.2f} s "
          f"({len(sent) / elapsed:.0f} req/s); statuses {dict(sorted(statuses.items()))}")
    print(f"ledger: {len(rows)} rows; estimated rows: {sum(r['estimated'] for r in rows)}")

    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_key[row["key_alias"].removeprefix("check-")].append(row)
    check(len(rows) == len(sent), f"every request is in the ledger ({len(rows)} of {len(sent)})")
    for name in KEYS:
        client_side = Counter(s.status for s in sent if s.key == name)
        ledger_side = Counter(r["status"] for r in by_key[name])
        check(client_side == ledger_side,
              f"{name}: statuses in the ledger match the clients' {dict(client_side)}")
    for name in KEYS:
        ok_rows = [r for r in by_key[name] if r["status"] == 200]
        tokens = [sum(r["prompt_tokens"] for r in ok_rows),
                  sum(r["completion_tokens"] for r in ok_rows)]
        check(tokens == upstream.usage[name] and not any(r["estimated"] for r in ok_rows),
              f"{name}: ledger tokens {tokens} == upstream usage {upstream.usage[name]}")
    not_asked = [s for s in sent if s.stream and not s.asked_usage and s.status == 200]
    asked = [s for s in sent if s.stream and s.asked_usage and s.status == 200]
    check(not any(s.saw_usage for s in not_asked) and all(s.saw_usage for s in asked),
          f"usage chunk hidden from {len(not_asked)} streams that did not ask, "
          f"shown to {len(asked)} that did")
    total_streams = sum(1 for s in sent if s.stream and s.status == 200)
    check(upstream.asked_usage == total_streams,
          f"the upstream was asked for usage on all {total_streams} streams")

    for name, limits in KEYS.items():
        rpm = limits.get("rpm_limit")
        if rpm is not None:
            times = sorted(upstream.arrivals[name])
            worst = max((sum(1 for t in times[i:] if t < start + WINDOW)
                         for i, start in enumerate(times)), default=0)
            check(worst <= rpm, f"{name}: at most {worst} requests in any 60 s "
                                f"(rpm_limit {rpm})")
            tried = sum(1 for s in sent if s.key == name)
            if tried >= rpm and elapsed < WINDOW:
                check(len(times) == rpm,
                      f"{name}: exactly rpm_limit ({len(times)}) of {tried} got through")
        parallel = limits.get("max_parallel_requests")
        if parallel is not None:
            check(upstream.peak[name] <= parallel,
                  f"{name}: at most {upstream.peak[name]} in flight at the upstream "
                  f"(max_parallel_requests {parallel})")

    for name, limits in KEYS.items():
        for limit_name, measure in (("tpm_limit", "tokens"), ("max_budget", "cost")):
            limit = limits.get(limit_name)
            if limit is None:
                continue
            admitted = [r for r in by_key[name] if r["status"] == 200]
            spans = [(_seconds(r["time"]), _seconds(r["time"]) + r["latency_ms"] / 1000,
                      r["prompt_tokens"] + r["completion_tokens"] if measure == "tokens"
                      else r["cost"]) for r in admitted]
            # Each admitted request may only see what ended before it began
            # (within the window for tpm); anything past the limit had to be in
            # flight already.
            violations = 0
            for start, _, _ in spans:
                # 2 ms of slack: the ledger keeps times to the millisecond.
                before = sum(amount for s, end, amount in spans if end < start - 0.002
                             and (measure == "cost" or end > start - WINDOW))
                if before >= limit:
                    violations += 1
            total = sum(amount for _, _, amount in spans)
            check(violations == 0,
                  f"{name}: {limit_name} {limit}: used {total:.6g}; no request began "
                  f"after the limit was reached ({len(spans)} admitted)")
    for name in KEYS:
        ledger_cost = sum(r["cost"] for r in by_key[name])
        check(abs(spend[f"check-{name}"] - ledger_cost) < 1e-9,
              f"{name}: keys.spend {spend[f'check-{name}']:.6f} == ledger cost "
              f"{ledger_cost:.6f}")

    print("PASS" if not failures else f"FAIL: {len(failures)} check(s) failed")
    return 0 if not failures else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
