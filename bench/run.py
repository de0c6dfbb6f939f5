"""Keystile benchmark: direct vs bare aiohttp pass-through vs Keystile, on loopback only.

  python bench/run.py                      # full run, 20000 requests per case
  python bench/run.py --quick              # small smoke run
  python bench/run.py --cases direct,passthrough --quick
  python bench/run.py --soak 600           # constant load at 16 connections, RSS over time

Starts the fake upstream (bench/upstream.py), the pass-through (bench/passthrough.py)
and Keystile (proxy.py) itself, drives them with wrk (bench/wrk_post.lua) or, without
wrk, with bench/loadgen.py, and prints one Markdown table. Every process it starts is
stopped before it exits; every subprocess call and every case is bounded in time.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
MODEL = "gpt-3.5-turbo"
CHAT_PATH = "/v1/chat/completions"
STREAM_CHUNKS = 20  # what bench/upstream.py sends
TARGETS = ["direct", "passthrough", "keystile", "keystile-limited"]


@dataclass(frozen=True)
class Workload:
    name: str
    concurrency: int
    stream: bool


WORKLOADS = [Workload("chat-1", 1, False), Workload("chat-16", 16, False),
             Workload("chat-64", 64, False), Workload("stream-16", 16, True)]


@dataclass
class Target:
    name: str
    base_url: str
    auth: str  # Authorization header value, "" for none
    pid: int | None  # process under test (None for direct)


@dataclass
class CaseResult:
    target: str
    workload: Workload
    requests: int = 0
    errors: int = 0
    error_detail: str = ""
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    ttfb_p50_ms: float | None = None
    cpu_ms_per_req: float | None = None
    busy_pct: float | None = None
    other_pct: float | None = None  # CPU used by processes outside the benchmark, % of one core
    hwm_mib: float | None = None
    rss_mib: float | None = None
    note: str = ""


@dataclass
class Context:
    args: argparse.Namespace
    tmp: Path
    proxy_core: list[str]  # taskset prefix for the process under test
    client_core: list[str]  # taskset prefix for upstream and load generator
    use_wrk: bool
    upstream_pid: int | None = None
    load_at_start: float = field(default_factory=lambda: os.getloadavg()[0])  # 1-min load average
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- processes

class Proc:
    """A child process in its own process group, logged to a file, stopped for sure."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name, self.log = name, log
        self._log_file = open(log, "wb")
        # Own session: stop() can signal the child and anything it spawned, by its group id.
        self.popen = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=env, cwd=cwd, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        if self._log_file.closed:
            return  # already stopped
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            if self.popen.poll() is not None:
                break
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.popen.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        # The group may still hold children that outlived the leader (e.g. workers).
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log_file.close()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin_prefixes() -> tuple[list[str], list[str], str]:
    """taskset prefixes: process under test on one core, upstream + client on another."""
    cores = sorted(os.sched_getaffinity(0))
    if shutil.which("taskset") and len(cores) >= 2:
        a, b = cores[0], cores[1]
        return (["taskset", "-c", str(a)], ["taskset", "-c", str(b)],
                f"process under test on core {a}; upstream and load generator on core {b}")
    return [], [], "no CPU pinning (taskset missing or fewer than 2 cores)"


# --------------------------------------------------------------------------- HTTP helpers

# No proxy handler: an http_proxy variable in the environment must never divert this traffic.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(method: str, url: str, body: Any = None, auth: str = "",
         timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One request with the standard library; returns (status, headers, body); status 0 = no answer."""
    assert url.startswith("http://127.0.0.1:"), url  # loopback only
    data = orjson.dumps(body) if body is not None else None
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if auth:
        headers["Authorization"] = auth
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with _OPENER.open(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()
    except (urllib.error.URLError, OSError) as e:
        return 0, {}, str(e).encode()


def describe(method: str, url: str, body: Any, auth: str, status: int, headers: dict[str, str],
             resp: bytes) -> str:
    """Exact request and response, for the problems section (key values shortened)."""
    shown_auth = f"Bearer {auth[7:15]}..." if auth.startswith("Bearer ") else auth
    return (f"request: {method} {url}" + (f"\n  Authorization: {shown_auth}" if auth else "")
            + (f"\n  body: {orjson.dumps(body).decode()}" if body is not None else "")
            + f"\nresponse: {status} content-type={headers.get('Content-Type', '')}\n  body: "
            + resp[:1500].decode(errors="replace"))


def wait_ready(url: str, proc: Proc, timeout: float) -> None:
    """Poll url until it answers 200; fail clearly if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with code {proc.popen.returncode} before it was ready."
                               f"\n--- last lines of {proc.log} ---\n{proc.log_tail()}")
        status, _, body = http("GET", url, timeout=2.0)
        if status == 200:
            return
        last = f"{status} {body[:200]!r}"
        time.sleep(0.2)
    raise RuntimeError(f"{proc.name} not ready after {timeout:.0f}s at {url} (last answer: {last})"
                       f"\n--- last lines of {proc.log} ---\n{proc.log_tail()}")


def request_body(stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "user": "bench",
                            "messages": [{"role": "user", "content": "Say hello to the benchmark."}]}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def check_chat(ctx: Context, target: Target, stream: bool, label: str, expect_ok: bool = True) -> bool:
    """One real request; checks the answer is a well-formed completion (or stream)."""
    url, body = target.base_url + CHAT_PATH, request_body(stream)
    status, headers, resp = http("POST", url, body, target.auth, timeout=30.0)
    ok = status == 200
    if ok and not stream:
        try:
            ok = bool(orjson.loads(resp)["choices"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            ok = False
    elif ok:
        events = [ln[6:] for ln in resp.decode(errors="replace").split("\n") if ln.startswith("data: ")]
        try:
            parsed = [orjson.loads(e) for e in events if e != "[DONE]"]
        except orjson.JSONDecodeError:
            parsed, ok = [], False
        chunks = [e for e in parsed if isinstance(e, dict) and e.get("choices")]
        ok = ok and bool(events) and events[-1] == "[DONE]" and len(chunks) == STREAM_CHUNKS
        if ok and not any(isinstance(e, dict) and e.get("usage") for e in parsed):
            ctx.problems.append(f"{target.name}: stream with stream_options.include_usage has no usage chunk\n"
                                + describe("POST", url, body, target.auth, status, headers, resp))
    if ok != expect_ok:
        what = "failed" if expect_ok else "was expected to be refused but answered"
        ctx.problems.append(f"{target.name}: check '{label}' {what}\n"
                            + describe("POST", url, body, target.auth, status, headers, resp))
        return False
    return True


# --------------------------------------------------------------------------- measurement

def proc_tree(pid: int) -> list[int]:
    """pid and all its descendants (a proxy may run worker processes)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process tree, from /proc/<pid>/stat."""
    ticks = 0
    for p in proc_tree(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # fields[0] is field 3 (state)
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")


def memory_mib(pid: int) -> tuple[float, float]:
    """(peak RSS = VmHWM, current RSS = VmRSS) in MiB, summed over the process tree."""
    hwm = rss = 0
    for p in proc_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    hwm += int(line.split()[1])
                elif line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
        except OSError:
            continue
    return hwm / 1024, rss / 1024


def system_busy_seconds() -> float:
    """Busy CPU time of the whole machine (all cores) from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds(ctx: Context, target: Target) -> float:
    """CPU of everything the benchmark runs: this script, reaped load generators, upstream, process under test."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    for pid in {ctx.upstream_pid, target.pid}:
        if pid:
            total += cpu_seconds(pid)
    return total


def other_load_pct(ctx: Context, target: Target, seconds: float) -> float:
    """CPU used by processes outside the benchmark over the next `seconds`, in % of one core."""
    sys0, own0, wall0 = system_busy_seconds(), own_cpu_seconds(ctx, target), time.monotonic()
    time.sleep(seconds)
    other = (system_busy_seconds() - sys0) - (own_cpu_seconds(ctx, target) - own0)
    return max(0.0, 100 * other / (time.monotonic() - wall0))


def wait_for_quiet(ctx: Context, target: Target) -> None:
    """Wait (at most --wait-idle s) until other processes leave the machine nearly idle."""
    deadline = time.monotonic() + ctx.args.wait_idle
    waited = False
    while time.monotonic() < deadline:
        pct = other_load_pct(ctx, target, 0.5)
        if pct < 10:
            return
        if not waited:
            log(f"  waiting up to {ctx.args.wait_idle:.0f}s for other load ({pct:.0f}% of a core) to settle")
            waited = True


def parse_tagged(output: str, tag: str) -> dict[str, Any]:
    for line in output.splitlines():
        if line.startswith(tag + " "):
            result: dict[str, Any] = orjson.loads(line[len(tag) + 1:])
            return result
    raise RuntimeError(f"no {tag} line in load generator output:\n{output[-2000:]}")


def run_wrk(ctx: Context, target: Target, wl: Workload, stop_after: int, max_seconds: int) -> dict[str, Any]:
    """One wrk run (one thread, so stop_after is the whole run's request count; 0 = timed run)."""
    body_file = ctx.tmp / ("body-stream.json" if wl.stream else "body-chat.json")
    cmd = ctx.client_core + ["wrk", "-t1", f"-c{wl.concurrency}", f"-d{max_seconds}s", "--timeout", "10s",
                             "-s", str(BENCH / "wrk_post.lua"), target.base_url + CHAT_PATH,
                             "--", str(stop_after), str(body_file), target.auth]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=max_seconds + 30)
    r = parse_tagged(out.stdout, "WRK_RESULT")
    sock = r["err_connect"] + r["err_read"] + r["err_write"] + r["err_timeout"]
    secs = r["duration_us"] / 1e6
    return {"requests": r["requests"], "non2xx": r["non2xx"], "socket_errors": sock,
            "rps": r["requests"] / secs if secs > 0 else 0.0, "duration_s": secs,
            "p50_ms": r["p50_us"] / 1e3, "p99_ms": r["p99_us"] / 1e3}


def run_loadgen(ctx: Context, target: Target, wl: Workload, requests: int, warmup: int,
                max_seconds: int, duration: float | None = None) -> dict[str, Any]:
    body_file = ctx.tmp / ("body-stream.json" if wl.stream else "body-chat.json")
    cmd = ctx.client_core + [sys.executable, str(BENCH / "loadgen.py"), "--url", target.base_url + CHAT_PATH,
                             "--body-file", str(body_file), "--concurrency", str(wl.concurrency),
                             "--requests", str(requests), "--warmup", str(warmup)]
    if target.auth:
        cmd += ["--auth", target.auth]
    if duration:
        cmd += ["--duration", str(duration)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=max_seconds + 30)
    r = parse_tagged(out.stdout, "LOADGEN_RESULT")
    return {"requests": r["requests"], "non2xx": r["non2xx"], "socket_errors": r["errors"], "rps": r["rps"],
            "duration_s": r["duration_s"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
            "ttfb_p50_ms": r["ttfb_p50_ms"]}


def case_seconds(ctx: Context, n: int) -> int:
    """Time ceiling for one run of n requests: generous (>= 100 req/s), capped by --max-case-seconds."""
    return int(min(ctx.args.max_case_seconds, max(30, n / 100 + 10)))


def run_case(ctx: Context, target: Target, wl: Workload) -> CaseResult:
    args = ctx.args
    res = CaseResult(target.name, wl)
    n = args.requests
    # Warm-up is a separate run so that the CPU readings below cover only the measured requests.
    if ctx.use_wrk:
        run_wrk(ctx, target, wl, args.warmup, case_seconds(ctx, args.warmup))
    else:
        run_loadgen(ctx, target, wl, args.warmup, 0, case_seconds(ctx, args.warmup))
    runs: list[tuple[dict[str, Any], float]] = []  # (load generator result, CPU seconds under test)
    for _ in range(args.repeat):
        wait_for_quiet(ctx, target)
        cpu0 = cpu_seconds(target.pid) if target.pid else 0.0
        # Other work on the machine (a test suite, an editor) skews a 2-core benchmark: measure it
        # as machine-wide busy time minus the benchmark's own processes.
        sys0, own0, wall0 = system_busy_seconds(), own_cpu_seconds(ctx, target), time.monotonic()
        if ctx.use_wrk:
            r = run_wrk(ctx, target, wl, n, case_seconds(ctx, n))
        else:
            r = run_loadgen(ctx, target, wl, n, 0, case_seconds(ctx, n))
        other = (system_busy_seconds() - sys0) - (own_cpu_seconds(ctx, target) - own0)
        r["other_pct"] = max(0.0, 100 * other / max(1e-9, time.monotonic() - wall0))
        runs.append((r, cpu_seconds(target.pid) - cpu0 if target.pid else 0.0))
    # With --repeat > 1 report the run with the median req/s: other load on a small machine
    # shows up as single slow runs, and the median keeps them out.
    runs.sort(key=lambda rc: rc[0]["rps"])
    r, cpu = runs[len(runs) // 2]
    res.other_pct = r["other_pct"]
    if len(runs) > 1:
        res.note = "req/s of the runs: " + ", ".join(f"{x['rps']:.0f}" for x, _ in runs) + "; "
    if target.pid:
        res.cpu_ms_per_req = cpu * 1e3 / max(1, r["requests"])
        # Share of one core the process under test used: ~100% means it was the bottleneck.
        res.busy_pct = 100 * cpu / r["duration_s"] if r["duration_s"] > 0 else None
        res.hwm_mib, res.rss_mib = memory_mib(target.pid)
    res.requests, res.rps, res.p50_ms, res.p99_ms = r["requests"], r["rps"], r["p50_ms"], r["p99_ms"]
    res.errors = r["non2xx"] + r["socket_errors"]
    if res.errors:
        res.error_detail = f"{r['non2xx']} non-2xx, {r['socket_errors']} socket"
    if r["requests"] + r["socket_errors"] < n:
        res.note += f"time-capped: {r['requests']} of {n} requests"
    if wl.stream:
        # wrk has no time-to-first-byte: measure it with a small separate aiohttp client.
        t = run_loadgen(ctx, target, wl, args.ttfb_requests, min(50, args.ttfb_requests),
                        case_seconds(ctx, args.ttfb_requests * 2))
        res.ttfb_p50_ms = t["ttfb_p50_ms"]
        if t["non2xx"] or t["socket_errors"]:
            res.note += f" TTFB run: {t['non2xx']} non-2xx, {t['socket_errors']} socket errors"
    log(f"  {target.name:17} {wl.name:9} {res.requests:6d} req  {res.rps:8.0f} req/s  p50 {res.p50_ms:6.2f} ms"
        f"  p99 {res.p99_ms:6.2f} ms  errors {res.errors}"
        + (f"  TTFB {res.ttfb_p50_ms:.2f} ms" if res.ttfb_p50_ms is not None else "")
        + (f"  CPU {res.cpu_ms_per_req:.3f} ms/req ({res.busy_pct:.0f}% busy)" if res.cpu_ms_per_req is not None
           and res.busy_pct is not None else "")
        + (f"  other load {res.other_pct:.0f}%" if res.other_pct is not None else ""))
    return res


# --------------------------------------------------------------------------- services

def start_upstream(ctx: Context, procs: list[Proc]) -> str:
    port = free_port()
    p = Proc("upstream", ctx.client_core + [sys.executable, str(BENCH / "upstream.py"), "--port", str(port)],
             ctx.tmp / "upstream.log")
    procs.append(p)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base + "/v1/models", p, 30)
    ctx.upstream_pid = p.pid
    return base


def start_passthrough(ctx: Context, procs: list[Proc], upstream: str) -> tuple[Target, Proc]:
    port = free_port()
    p = Proc("passthrough", ctx.proxy_core + [sys.executable, str(BENCH / "passthrough.py"), "--port", str(port),
                                              "--upstream", upstream], ctx.tmp / "passthrough.log")
    procs.append(p)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:  # no GET route to poll: wait for the port to accept connections
        if not p.alive():
            raise RuntimeError(f"passthrough exited early:\n{p.log_tail()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"passthrough not listening after 30s:\n{p.log_tail()}") from None
            time.sleep(0.1)
    return Target("passthrough", base, "", p.pid), p


@dataclass
class Keystile:
    proc: Proc
    base: str
    master: str
    keys: dict[str, str]  # alias -> raw virtual key


def start_keystile(ctx: Context, procs: list[Proc], upstream: str) -> Keystile:
    if not (REPO / "proxy.py").exists():
        raise RuntimeError(f"{REPO / 'proxy.py'} does not exist yet")
    master = "sk-bench-" + secrets.token_hex(16)  # 41 chars
    cfg = ctx.tmp / "keystile-config.yaml"
    cfg.write_text(f"""model_list:
  - model_name: {MODEL}
    litellm_params:
      model: openai/{MODEL}
      api_base: {upstream}/v1
      api_key: sk-upstream-fake
general_settings:
  master_key: os.environ/KEYSTILE_MASTER_KEY
  service_account_settings:
    enforced_params: ["user"]
""")
    port = free_port()
    db = ctx.tmp / f"keystile-{port}.db"
    env = dict(os.environ, KEYSTILE_MASTER_KEY=master)
    cmd = ctx.proxy_core + [sys.executable, "proxy.py", "--config", str(cfg), "--port", str(port),
                            "--host", "127.0.0.1", "--db", str(db)]
    p = Proc("keystile", cmd, ctx.tmp / "keystile.log", env=env, cwd=REPO)
    procs.append(p)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base + "/health/readiness", p, ctx.args.startup_timeout)
    log(f"Keystile ready at {base} (pid {p.pid}, log {p.log})")
    ctx.notes.append("Keystile runs with its default log level; its log (access lines included) goes to a "
                     "file in the temp dir, and that cost is part of the Keystile figures.")

    keys: dict[str, str] = {}
    wanted = [("bench-user", {"key_alias": "bench-user"}),
              ("bench-sa", {"key_alias": "bench-sa", "account_type": "service_account"}),
              ("bench-limited", {"key_alias": "bench-limited", "rpm_limit": 100_000_000,
                                 "tpm_limit": 1_000_000_000, "max_parallel_requests": 100_000})]
    for alias, body in wanted:
        url = base + "/key/generate"
        status, headers, resp = http("POST", url, body, "Bearer " + master)
        key = None
        if status == 200:
            try:
                key = orjson.loads(resp).get("key")
            except orjson.JSONDecodeError:
                pass
        if key:
            keys[alias] = key
        elif alias == "bench-limited" and status == 400:
            ctx.notes.append("POST /key/generate with rpm_limit/tpm_limit/max_parallel_requests answered 400 "
                             "(limits not supported yet): no keystile-limited case. Answer: "
                             + resp[:300].decode(errors="replace"))
            log("  limits not supported yet (400): running without the keystile-limited case")
        else:
            ctx.problems.append(f"keystile: POST /key/generate for {alias} gave no key\n"
                                + describe("POST", url, body, "Bearer " + master, status, headers, resp))
    if "bench-limited" in keys:
        probe_limits(ctx, base, master)
    return Keystile(p, base, master, keys)


def probe_limits(ctx: Context, base: str, master: str) -> None:
    """Say whether limits are enforced or only stored: a key with rpm_limit 1 gets two requests."""
    status, _, resp = http("POST", base + "/key/generate", {"key_alias": "bench-rpm-probe", "rpm_limit": 1},
                           "Bearer " + master)
    key = orjson.loads(resp).get("key") if status == 200 else None
    if not key:
        return
    codes = [http("POST", base + CHAT_PATH, request_body(False), "Bearer " + key, timeout=30.0)[0]
             for _ in range(2)]
    verdict = "enforced" if codes[1] == 429 else "NOT enforced"
    ctx.notes.append(f"limit probe: key with rpm_limit 1 answered {codes[0]} then {codes[1]} "
                     f"within a minute: rpm_limit {verdict}.")
    log(f"  {ctx.notes[-1]}")


def scan_log(ctx: Context, proc: Proc) -> None:
    """Report ERROR lines and tracebacks in the proxy's log: they cost time and hint at bugs."""
    try:
        lines = proc.log.read_text(errors="replace").splitlines()
    except OSError:
        return
    errors = [i for i, ln in enumerate(lines) if " ERROR " in ln or " CRITICAL " in ln]
    if not errors:
        return
    first = errors[0]
    end = next((j for j in range(first + 1, min(len(lines), first + 60))
                if lines[j][:4].isdigit()), min(len(lines), first + 60))  # up to the next log record
    ctx.problems.append(f"{proc.name} log: {len(errors)} ERROR lines "
                        f"({sum('Traceback' in ln for ln in lines)} tracebacks) during the run; the first:\n"
                        + "\n".join(lines[first:end]))


def keystile_checks(ctx: Context, ks: Keystile) -> list[Target]:
    """Sanity checks on Keystile's answers; returns the targets that work."""
    targets = []
    if "bench-user" in ks.keys:
        check_chat(ctx, Target("keystile(user key)", ks.base, "Bearer " + ks.keys["bench-user"], None),
                   False, "user key, chat")
    if "bench-sa" in ks.keys:
        sa = Target("keystile", ks.base, "Bearer " + ks.keys["bench-sa"], ks.proc.pid)
        # enforced_params: ["user"] means a service-account request without "user" must be refused.
        status, headers, resp = http("POST", ks.base + CHAT_PATH, {"model": MODEL, "messages": [
            {"role": "user", "content": "hi"}]}, sa.auth, timeout=30.0)
        if not 400 <= status < 500:
            ctx.problems.append("keystile: service-account request without \"user\" was not refused "
                                "(enforced_params: [\"user\"])\n" + describe(
                                    "POST", ks.base + CHAT_PATH, {"model": MODEL, "messages": [
                                        {"role": "user", "content": "hi"}]}, sa.auth, status, headers, resp))
        if check_chat(ctx, sa, False, "service-account key + user, chat") and \
                check_chat(ctx, sa, True, "service-account key + user, stream"):
            targets.append(sa)
    if "bench-limited" in ks.keys:
        lim = Target("keystile-limited", ks.base, "Bearer " + ks.keys["bench-limited"], ks.proc.pid)
        if check_chat(ctx, lim, False, "limited key, chat") and check_chat(ctx, lim, True, "limited key, stream"):
            targets.append(lim)
    return targets


# --------------------------------------------------------------------------- report

def machine_lines(ctx: Context, pin_note: str) -> list[str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gen = "bench/loadgen.py (aiohttp client, one process)"
    if ctx.use_wrk:
        v = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10)
        gen = (v.stdout or v.stderr).splitlines()[0].split(" Copyright")[0] + " — 1 thread, bench/wrk_post.lua"
    return [f"- Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}",
            f"- Machine: nproc {len(os.sched_getaffinity(0))}, CPU {cpu}, Python {platform.python_version()}, "
            f"aiohttp {aiohttp.__version__}, load average at start {ctx.load_at_start:.2f}",
            f"- Load generator: {gen}; {pin_note}",
            f"- Per case: {ctx.args.requests} requests after {ctx.args.warmup} warm-up requests"
            + (f", median-req/s run of {ctx.args.repeat}" if ctx.args.repeat > 1 else "") + "; streaming = "
            f"{STREAM_CHUNKS} SSE chunks + usage chunk; TTFB = p50 time to first body byte over "
            f"{ctx.args.ttfb_requests} streaming requests at 16 connections (bench/loadgen.py)",
            "- Columns: *added* = minus `direct` at the same concurrency; *CPU busy %* = share of one core the "
            "process under test used during the run (~100% = it was the bottleneck); *other load %* = CPU used "
            "by processes outside the benchmark during the run, in % of one core (much above 5% = disturbed)"]


def fmt(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def render(ctx: Context, results: list[CaseResult], header: list[str]) -> str:
    direct = {r.workload: r for r in results if r.target == "direct"}
    rows = ["| case | workload | conc | requests | errors | req/s | p50 ms | p99 ms | p50 added ms "
            "| TTFB p50 ms | TTFB added ms | CPU ms/req | CPU busy % | peak RSS MiB | RSS MiB | other load % |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in results:
        base = direct.get(r.workload)
        added = r.p50_ms - base.p50_ms if base and r.target != "direct" else None
        ttfb_added = (r.ttfb_p50_ms - base.ttfb_p50_ms if base and r.target != "direct"
                      and r.ttfb_p50_ms is not None and base.ttfb_p50_ms is not None else None)
        errors = f"{r.errors} ({r.error_detail})" if r.errors else "0"
        rows.append(f"| {r.target} | {'stream' if r.workload.stream else 'chat'} | {r.workload.concurrency} "
                    f"| {r.requests} | {errors} | {r.rps:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {fmt(added)} "
                    f"| {fmt(r.ttfb_p50_ms)} | {fmt(ttfb_added)} | {fmt(r.cpu_ms_per_req, 3)} | {fmt(r.busy_pct, 0)} "
                    f"| {fmt(r.hwm_mib, 1)} | {fmt(r.rss_mib, 1)} | {fmt(r.other_pct, 0)} |")
    out = ["# Keystile benchmark", "", *header, "", *rows, ""]
    out += summary_lines(results)
    disturbed = [f"{r.target} {r.workload.name}" for r in results if (r.other_pct or 0) > 10]
    if disturbed:
        out.append(f"- Warning: other processes used more than 10% of a core during: {', '.join(disturbed)}; "
                   "rerun on an idle machine (or with --repeat 3) before comparing these rows.")
    for r in results:
        if r.note:
            out.append(f"- Note {r.target} {r.workload.name}: {r.note.strip().rstrip(';')}")
    out += [f"- Note: {n}" for n in ctx.notes]
    if ctx.problems:
        out += ["", "## Problems seen", ""]
        for p in ctx.problems:
            out += ["```", p, "```"]
    return "\n".join(out) + "\n"


def summary_lines(results: list[CaseResult]) -> list[str]:
    def get(target: str, wl_name: str) -> CaseResult | None:
        return next((r for r in results if r.target == target and r.workload.name == wl_name), None)

    lines = []
    for name in ("keystile", "keystile-limited"):
        k16, p16 = get(name, "chat-16"), get("passthrough", "chat-16")
        k1, d1 = get(name, "chat-1"), get("direct", "chat-1")
        ks, ds = get(name, "stream-16"), get("direct", "stream-16")
        if not (k16 or k1 or ks):
            continue
        parts = []
        if k16 and p16 and p16.rps:
            parts.append(f"{k16.rps:.0f} req/s at 16 = {100 * k16.rps / p16.rps:.0f}% of passthrough "
                         f"({p16.rps:.0f} req/s)")
        elif k16:
            parts.append(f"{k16.rps:.0f} req/s at 16")
        if k16 and k16.cpu_ms_per_req is not None:
            # CPU per request hardly moves when other processes share the machine, unlike req/s.
            cmp = ""
            if p16 and p16.cpu_ms_per_req:
                cmp = (f" vs passthrough {p16.cpu_ms_per_req:.3f} (one-core capacity "
                       f"{100 * p16.cpu_ms_per_req / k16.cpu_ms_per_req:.0f}% of passthrough)")
            parts.append(f"CPU {k16.cpu_ms_per_req:.3f} ms/request (chat, 16){cmp}")
        if k1 and d1:
            parts.append(f"p50 added latency at 1 client {k1.p50_ms - d1.p50_ms:.2f} ms")
        if ks and ds and ks.ttfb_p50_ms is not None and ds.ttfb_p50_ms is not None:
            parts.append(f"TTFB added (stream, 16) {ks.ttfb_p50_ms - ds.ttfb_p50_ms:.2f} ms")
        peak = max((r.hwm_mib or 0.0) for r in results if r.target.startswith("keystile"))
        parts.append(f"peak RSS {peak:.1f} MiB")
        lines.append(f"**Summary ({name}):** " + "; ".join(parts) + ".")
    return lines


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- modes

def benchmark(ctx: Context, procs: list[Proc], pin_note: str) -> str:
    args = ctx.args
    chosen = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else []
    unknown = [c for c in chosen if c not in TARGETS and c not in {w.name for w in WORKLOADS}]
    if unknown:
        sys.exit(f"unknown --cases {unknown}; targets: {TARGETS}; workloads: {[w.name for w in WORKLOADS]}")
    targets = [t for t in TARGETS if t in chosen] or TARGETS
    workloads = [w for w in WORKLOADS if w.name in chosen] or WORKLOADS

    upstream = start_upstream(ctx, procs)
    log(f"fake upstream at {upstream}")
    results: list[CaseResult] = []

    def run_all(target: Target) -> None:
        for wl in workloads:
            try:
                results.append(run_case(ctx, target, wl))
            except (RuntimeError, subprocess.TimeoutExpired) as e:  # one broken case must not hide the rest
                ctx.problems.append(f"{target.name} {wl.name}: load run failed: {e}")
                log(f"  {target.name:17} {wl.name:9} FAILED: {e}")

    if "direct" in targets:
        direct = Target("direct", upstream, "", None)
        if check_chat(ctx, direct, False, "chat") and check_chat(ctx, direct, True, "stream"):
            run_all(direct)
    if "passthrough" in targets:
        pt, pt_proc = start_passthrough(ctx, procs, upstream)
        if check_chat(ctx, pt, False, "chat") and check_chat(ctx, pt, True, "stream"):
            run_all(pt)
        pt_proc.stop()  # only one process under test at a time
    if "keystile" in targets or "keystile-limited" in targets:
        try:
            ks = start_keystile(ctx, procs, upstream)
        except RuntimeError as e:
            ctx.problems.append(f"keystile did not start: {e}")
            log(f"Keystile not benchmarked: {e}")
        else:
            for t in keystile_checks(ctx, ks):
                if t.name in targets:
                    run_all(t)
            if "keystile-limited" in targets and "bench-limited" not in ks.keys and not any(
                    "limits not supported" in n for n in ctx.notes):
                ctx.notes.append("no keystile-limited case: the limited key could not be created")
            if not ks.proc.alive():
                ctx.problems.append(f"keystile exited during the benchmark (code {ks.proc.popen.returncode})"
                                    f"\n{ks.proc.log_tail()}")
            scan_log(ctx, ks.proc)
    return render(ctx, results, machine_lines(ctx, pin_note))


def soak(ctx: Context, procs: list[Proc], pin_note: str) -> str:
    args = ctx.args
    upstream = start_upstream(ctx, procs)
    ks = start_keystile(ctx, procs, upstream)
    sa = next((t for t in keystile_checks(ctx, ks) if t.name == args.soak_key), None)
    if sa is None:
        raise RuntimeError(f"no working {args.soak_key} key; see problems:\n" + "\n\n".join(ctx.problems))
    wl = Workload("chat-16", 16, False)
    if ctx.use_wrk:
        run_wrk(ctx, sa, wl, args.warmup, case_seconds(ctx, args.warmup))
    else:
        run_loadgen(ctx, sa, wl, args.warmup, 0, case_seconds(ctx, args.warmup))
    hwm, rss = memory_mib(ks.proc.pid)
    samples: list[tuple[float, int, float, float, int]] = [(0.0, 0, rss, hwm, 0)]  # (s, requests, RSS, peak, errors)
    log(f"  t=     0s  after warm-up: RSS {rss:.1f} MiB  peak {hwm:.1f} MiB")
    total = errors = 0
    t0 = time.monotonic()
    # Runs of <= 10 s back to back: RSS is sampled between them (every ~10 s).
    while (left := args.soak - (time.monotonic() - t0)) >= 1:
        secs = int(min(10, left))
        if ctx.use_wrk:
            r = run_wrk(ctx, sa, wl, 0, secs)
        else:
            r = run_loadgen(ctx, sa, wl, 10**9, 0, secs, duration=secs)
        total += r["requests"]
        errors += r["non2xx"] + r["socket_errors"]
        hwm, rss = memory_mib(ks.proc.pid)
        samples.append((time.monotonic() - t0, total, rss, hwm, errors))
        log(f"  t={samples[-1][0]:6.0f}s  requests={total:9d}  {r['rps']:7.0f} req/s  RSS {rss:7.1f} MiB"
            f"  peak {hwm:7.1f} MiB  errors {errors}")
        if not ks.proc.alive():
            ctx.problems.append(f"keystile exited during the soak:\n{ks.proc.log_tail()}")
            break
    scan_log(ctx, ks.proc)
    rows = ["| t (s) | requests | RSS MiB | peak RSS MiB | errors |", "|--:|--:|--:|--:|--:|"]
    rows += [f"| {t:.0f} | {n} | {rss:.1f} | {hwm:.1f} | {e} |" for t, n, rss, hwm, e in samples]
    out = ["# Keystile soak", "", *machine_lines(ctx, pin_note)[:3],
           f"- Soak: {args.soak} s at 16 connections, {args.soak_key} key ("
           + ("service account" if args.soak_key == "keystile" else "rpm/tpm/parallel limits")
           + ") + user, chat (non-streaming)", "",
           *rows, ""]
    after_1min = next((s for s in samples if s[0] >= 60), None)
    at_100k = next((s for s in samples if s[1] >= 100_000), None)
    if samples:
        end = samples[-1]
        if after_1min and after_1min is not end:
            out.append(f"**RSS after the first minute:** {after_1min[2]:.1f} MiB (t={after_1min[0]:.0f} s); "
                       f"**at the end:** {end[2]:.1f} MiB (t={end[0]:.0f} s); change "
                       f"{100 * (end[2] - after_1min[2]) / after_1min[2]:+.1f}%.")
        else:
            out.append(f"RSS at the end: {end[2]:.1f} MiB (t={end[0]:.0f} s); soak too short for a "
                       "first-minute vs end comparison (needs > 70 s).")
        out.append(f"**RSS after 100,000 requests:** {at_100k[2]:.1f} MiB (sampled at {at_100k[1]} requests)."
                   if at_100k else f"Fewer than 100,000 requests in the soak ({end[1]}).")
        out.append(f"Total: {end[1]} requests, {end[4]} errors, {end[1] / max(end[0], 1e-9):.0f} req/s on average.")
    if ctx.problems:
        out += ["", "## Problems seen", ""]
        for p in ctx.problems:
            out += ["```", p, "```"]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20000, help="measured requests per case")
    ap.add_argument("--warmup", type=int, default=2000, help="warm-up requests before each case")
    ap.add_argument("--repeat", type=int, default=1, help="measured runs per case; the median req/s run is shown")
    ap.add_argument("--ttfb-requests", type=int, default=500, help="streaming requests for the TTFB measurement")
    ap.add_argument("--quick", action="store_true", help="small smoke run (1000 requests, 200 warm-up, 100 TTFB)")
    ap.add_argument("--cases", default="", help=f"comma list of targets {TARGETS} and/or workloads "
                                                f"{[w.name for w in WORKLOADS]}")
    ap.add_argument("--out", type=Path, help="also write the Markdown report to this file")
    ap.add_argument("--soak", type=int, metavar="SECONDS", help="soak mode: constant load at 16 connections")
    ap.add_argument("--soak-key", choices=["keystile", "keystile-limited"], default="keystile",
                    help="key the soak uses: service account (default) or the key with limits")
    ap.add_argument("--max-case-seconds", type=int, default=600, help="time ceiling of one load run")
    ap.add_argument("--startup-timeout", type=float, default=60.0, help="seconds to wait for Keystile readiness")
    ap.add_argument("--wait-idle", type=float, default=20.0, metavar="SECONDS",
                    help="before each measured run, wait up to this long for other load to drop under 10%% "
                         "of a core (0 = do not wait)")
    ap.add_argument("--no-wrk", action="store_true", help="use bench/loadgen.py even if wrk is installed")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs, db)")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.warmup, args.ttfb_requests = 1000, 200, 100
    if args.soak is not None and args.soak < 1:
        sys.exit("--soak needs a positive number of seconds")
    if args.repeat < 1 or args.requests < 1 or args.warmup < 1 or args.ttfb_requests < 1:
        sys.exit("--repeat, --requests, --warmup and --ttfb-requests must be at least 1")

    # SIGTERM/SIGHUP -> SystemExit, so the finally below still stops every child.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))

    use_wrk = shutil.which("wrk") is not None and not args.no_wrk
    if not use_wrk and not args.no_wrk:
        log("wrk not found on PATH; install it with:  apt-get install -y wrk\n"
            "falling back to the aiohttp load generator (bench/loadgen.py); its numbers are client-bound.")
    proxy_core, client_core, pin_note = pin_prefixes()
    tmp = Path(tempfile.mkdtemp(prefix="keystile-bench-"))
    ctx = Context(args, tmp, proxy_core, client_core, use_wrk)
    if not use_wrk:
        ctx.notes.append("wrk not used: numbers come from bench/loadgen.py, an aiohttp client that is slower "
                         "than wrk, so req/s and latency are partly client-bound.")
    for stream in (False, True):  # the POST bodies wrk and loadgen send
        (tmp / ("body-stream.json" if stream else "body-chat.json")).write_bytes(orjson.dumps(request_body(stream)))
    procs: list[Proc] = []  # every process started, stopped in the finally below
    report = ""
    try:
        report = soak(ctx, procs, pin_note) if args.soak else benchmark(ctx, procs, pin_note)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        log(f"benchmark failed: {e}")
        sys.exit(1)
    finally:
        for p in reversed(procs):
            p.stop()
        if args.keep_tmp or not report:
            log(f"temp files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(report, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
        log(f"report written to {args.out}")


if __name__ == "__main__":
    main()
