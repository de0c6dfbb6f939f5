"""Crash window: how much usage a `kill -9` loses, under load.

  python bench/crash_window.py                   # 3 rounds, 40 clients, 4 s of load each
  python bench/crash_window.py --rounds 5 --clients 64

Each round starts the fake upstream (bench/upstream.py) and Keystile
(proxy.py) on 127.0.0.1, pinned like bench/run.py (Keystile on one core,
everything else on the other) when `taskset` exists.  Clients send chat
completions as fast as Keystile answers them, each with its own `user`
value, and note when each answer arrived.  Then Keystile gets SIGKILL, with
no chance to flush.  The SQLite file is opened afterwards and every answer
a client received is looked up in the ledger by its `user`.

Prints, per round, how many answered requests are missing from the ledger
and how long before the kill the oldest of them was answered.  Exits 1 when
any request answered more than --window seconds before the kill is missing.
The ages are measured at the client, which sees an answer a little after
Keystile sent it: the true age of a lost row is at most that much larger.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

REPO = Path(__file__).resolve().parent.parent
MASTER = "sk-crash-window-master-key-0000"
MODEL = "gpt-3.5-turbo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(core: int) -> list[str]:
    return ["taskset", "-c", str(core)] if shutil.which("taskset") and os.cpu_count() else []


async def wait_ready(url: str, proc: subprocess.Popen[bytes], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {seconds} s")


async def one_round(
    args: argparse.Namespace, workdir: Path, number: int
) -> tuple[int, int, float, float]:
    """(answered, missing, age in seconds of the oldest missing answer, share of a core
    Keystile used under the load) for one kill."""
    keystile_core, other_core = pinned(0), pinned(1)
    up_port, port = free_port(), free_port()
    config = workdir / "config.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: http://127.0.0.1:{up_port}/v1\n"
        "      api_key: sk-upstream-fake\n"
        "general_settings:\n"
        f"  master_key: {MASTER}\n"
    )
    db = workdir / f"round-{number}.db"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        upstream = subprocess.Popen(
            [*other_core, sys.executable, str(REPO / "bench" / "upstream.py"),
             "--port", str(up_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        procs.append(upstream)
        with (workdir / f"keystile-{number}.log").open("wb") as log:
            proxy = subprocess.Popen(
                [*keystile_core, sys.executable, str(REPO / "proxy.py"), "--config", str(config),
                 "--host", "127.0.0.1", "--port", str(port), "--db", str(db)],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            )
        procs.append(proxy)
        base = f"http://127.0.0.1:{port}"
        await wait_ready(base + "/health/readiness", proxy)
        await wait_ready(f"http://127.0.0.1:{up_port}/v1/models", upstream)
        answered = await drive(args, base, proxy)
        proxy.wait(timeout=10)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    killed_at = answered.pop("")
    busy = answered.pop("~busy")
    with sqlite3.connect(db) as conn:
        recorded = {row[0] for row in conn.execute("SELECT end_user FROM usage")}
    lost = [killed_at - at for user, at in answered.items() if user not in recorded]
    return len(answered), len(lost), max(lost, default=0.0), busy


async def drive(
    args: argparse.Namespace, base: str, proxy: subprocess.Popen[bytes]
) -> dict[str, float]:
    """Load until the kill; returns each answered user's arrival time, and "" the kill's."""
    answered: dict[str, float] = {}
    counter = iter(range(1 << 62))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(base + "/key/generate", json={"key_alias": "crash"},
                                headers={"Authorization": f"Bearer {MASTER}"}) as resp:
            key = (await resp.json())["key"]
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        stop = asyncio.Event()

        async def client() -> None:
            while not stop.is_set():
                user = f"u{next(counter)}"
                body = orjson.dumps({"model": MODEL, "user": user,
                                     "messages": [{"role": "user", "content": "hi"}]})
                try:
                    async with session.post(base + "/chat/completions", data=body,
                                            headers=headers) as resp:
                        await resp.read()
                        if resp.status == 200:
                            answered[user] = time.time()
                except (TimeoutError, aiohttp.ClientError):
                    if stop.is_set():
                        return
                    await asyncio.sleep(0.01)

        tasks = [asyncio.create_task(client()) for _ in range(args.clients)]
        cpu = cpu_seconds(proxy.pid)
        await asyncio.sleep(args.seconds)
        busy = (cpu_seconds(proxy.pid) - cpu) / args.seconds
        answered[""] = time.time()
        os.kill(proxy.pid, signal.SIGKILL)
        stop.set()
        await asyncio.wait(tasks, timeout=10)
        for task in tasks:
            task.cancel()
    # Answers that arrived after the kill was sent were sent before it.
    killed_at = answered[""]
    result = {user: min(at, killed_at) for user, at in answered.items()}
    result["~busy"] = busy
    return result


def cpu_seconds(pid: int) -> float:
    """CPU time of a process, all threads, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(args: argparse.Namespace) -> int:
    if shutil.which("taskset"):
        # This process is a client: keep it off Keystile's core.
        os.sched_setaffinity(0, {1 % (os.cpu_count() or 1)})
    worst = 0.0
    with tempfile.TemporaryDirectory(prefix="keystile-crash-") as tmp:
        if args.keep:
            tmp = args.keep
            Path(tmp).mkdir(parents=True, exist_ok=True)
        for number in range(1, args.rounds + 1):
            answered, lost, oldest, busy = await one_round(args, Path(tmp), number)
            rate = answered / args.seconds
            print(f"round {number}: {answered} answered (~{rate:.0f}/s over {args.clients} "
                  f"clients, Keystile at {busy:.0%} of a core), {lost} missing from the ledger after kill -9, oldest missing "
                  f"answered {oldest * 1000:.0f} ms before the kill")
            worst = max(worst, oldest)
    verdict = "PASS" if worst <= args.window else "FAIL"
    print(f"{verdict}: oldest lost answer {worst * 1000:.0f} ms before the kill "
          f"(window {args.window * 1000:.0f} ms)")
    return 0 if verdict == "PASS" else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=40)
    ap.add_argument("--seconds", type=float, default=4.0, help="load before each kill")
    ap.add_argument("--keep", metavar="DIR", help="keep each round's database and log in DIR")
    ap.add_argument("--window", type=float, default=0.2, help="the promised window, seconds")
    return asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
