"""Async aiohttp load generator: fallback for wrk, and the TTFB meter for streaming.

wrk reports only whole-response latency, so streaming time-to-first-byte is measured
here. Runs in its own process (run.py pins it next to the upstream) and prints one line
"LOADGEN_RESULT {json}". Bounded: stops after --requests, or after --duration seconds,
and every request has a --timeout.

  python bench/loadgen.py --url URL --body-file F [--auth "Bearer k"] \
      --concurrency 16 --requests 500 [--warmup 50] [--duration S]
"""
from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from dataclasses import dataclass, field

import aiohttp
import orjson


@dataclass
class Stats:
    latency: list[float] = field(default_factory=list)  # seconds, whole response
    ttfb: list[float] = field(default_factory=list)  # seconds, to first body byte
    non2xx: int = 0
    errors: int = 0  # connection errors, timeouts, resets
    bytes: int = 0


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile of values (0.0 for an empty list)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = math.ceil(pct / 100.0 * len(ordered))  # 1-based nearest rank
    return ordered[min(len(ordered), max(1, rank)) - 1]


async def one_request(session: aiohttp.ClientSession, url: str, body: bytes,
                      headers: dict[str, str], stats: Stats) -> None:
    t0 = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            first = await resp.content.readany()
            t_first = time.perf_counter()
            size = len(first)
            while chunk := await resp.content.readany():
                size += len(chunk)
            t_end = time.perf_counter()
            status = resp.status
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        stats.errors += 1
        return
    stats.latency.append(t_end - t0)
    stats.ttfb.append(t_first - t0)
    stats.bytes += size
    if not 200 <= status <= 299:
        stats.non2xx += 1


async def run_load(url: str, body: bytes, headers: dict[str, str], concurrency: int,
                   requests: int, duration: float | None, timeout: float) -> tuple[Stats, float]:
    """Run `requests` requests (or until `duration` s) over `concurrency` workers."""
    stats = Stats()
    issued = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
        start = time.perf_counter()
        deadline = start + duration if duration else None

        async def worker() -> None:
            nonlocal issued
            while True:
                if deadline is not None:
                    if time.perf_counter() >= deadline:
                        return
                elif issued >= requests:
                    return
                issued += 1
                await one_request(session, url, body, headers, stats)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return stats, elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--body-file", required=True)
    ap.add_argument("--auth", default="", help="Authorization header value")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--duration", type=float, default=None, help="run this many seconds instead of --requests")
    ap.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, seconds")
    args = ap.parse_args()

    if not args.url.startswith(("http://127.", "http://localhost")):
        sys.exit("loadgen: refusing a non-loopback URL")  # benchmark traffic stays on this machine
    with open(args.body_file, "rb") as f:
        body = f.read()
    headers = {"Content-Type": "application/json"}
    if args.auth:
        headers["Authorization"] = args.auth

    if args.warmup:
        asyncio.run(run_load(args.url, body, headers, args.concurrency, args.warmup, None, args.timeout))
    stats, elapsed = asyncio.run(run_load(args.url, body, headers, args.concurrency,
                                          args.requests, args.duration, args.timeout))
    done = len(stats.latency)
    result = {
        "requests": done, "non2xx": stats.non2xx, "errors": stats.errors, "bytes": stats.bytes,
        "duration_s": elapsed, "rps": done / elapsed if elapsed > 0 else 0.0,
        "p50_ms": percentile(stats.latency, 50) * 1e3, "p90_ms": percentile(stats.latency, 90) * 1e3,
        "p99_ms": percentile(stats.latency, 99) * 1e3,
        "ttfb_p50_ms": percentile(stats.ttfb, 50) * 1e3, "ttfb_p99_ms": percentile(stats.ttfb, 99) * 1e3,
    }
    print("LOADGEN_RESULT " + orjson.dumps(result).decode(), flush=True)


if __name__ == "__main__":
    main()
