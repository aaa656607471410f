#!/usr/bin/env python3
"""Load benchmark: the mock provider called directly and through tokenwarden, side by side.

    python3 benches/load/run.py [--rounds 3] [--seconds 5] [--out benches/load/results.json]
                                [--only SCENARIO] [--no-budgets] [--redis]

Builds the release binary, installs `oha` from crates.io when missing, configures the
proxy with every feature on (metering, audit log with fsync, agent and team budgets, so
each request is reserved, clamped and settled), pins the load
generator and the mock to core 0 and the proxy to core 1 (`taskset`), and runs every
scenario against both targets in alternation, `--rounds` times. It prints one table of
medians (latency in ms) with the overhead the proxy adds, and writes the same as JSON.
`--no-budgets` adds a second proxy whose agent has no budgets (what budgets cost);
`--redis` adds one that keeps its budgets in a redis-server started on core 0 (what a
shared ledger costs per request). Traffic goes to loopback only; every run is bounded in
time.
"""

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "target" / "release" / "tokenwarden"
KEY = "tw-bench-virtual-key"

CHAT = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in five words."}]}'
CHAT_STREAM = (
    '{"model":"gpt-4o-mini","stream":true,'
    '"messages":[{"role":"user","content":"Say hello in fifty words."}]}'
)

# name, oha arguments, body, extra headers
SCENARIOS = [
    ("chat, 1 connection", ["-c", "1"], CHAT, []),
    ("chat, 32 connections", ["-c", "32"], CHAT, []),
    ("chat, 1000 req/s", ["-c", "32", "-q", "1000", "--latency-correction"], CHAT, []),
    ("stream 50 chunks, 1 conn", ["-c", "1"], CHAT_STREAM, ["x-mock-chunks: 50"]),
    ("stream 50 chunks, 32 conn", ["-c", "32"], CHAT_STREAM, ["x-mock-chunks: 50"]),
]


def sh(*args, **kw):
    return subprocess.run(args, check=True, **kw)


def ensure_oha():
    if shutil.which("oha"):
        return "oha"
    cargo_oha = Path.home() / ".cargo" / "bin" / "oha"
    if not cargo_oha.exists():
        print("installing oha from crates.io ...", file=sys.stderr)
        sh("cargo", "install", "oha", "--locked", "--quiet")
    return str(cargo_oha)


def pinned(core):
    return ["taskset", "-c", str(core)] if shutil.which("taskset") and os.cpu_count() >= 2 else []


def start(args, env=None):
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "RUST_LOG": "warn", **(env or {})},
        text=True,
    )
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"{args} printed no startup line")
    addr = line.split("://")[1].split(" ")[0].strip()
    return proc, addr


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def run_oha(oha, url, args, body, headers, seconds, auth):
    cmd = pinned(0) + [oha, "--no-tui", "--output-format", "json", "-z", f"{seconds}s",
                       "-m", "POST", "-H", "content-type: application/json", "-d", body, *args]
    if auth:
        cmd += ["-H", f"authorization: Bearer {KEY}"]
    for h in headers:
        cmd += ["-H", h]
    out = subprocess.run(cmd + [url], check=True, capture_output=True, text=True).stdout
    d = json.loads(out)
    codes = d.get("statusCodeDistribution", {})
    ok = codes.get("200", 0)
    total = sum(codes.values())
    if total == 0 or ok != total:
        raise SystemExit(f"non-200 answers from {url}: {codes} {d.get('errorDistribution')}")
    lat, fb = d["latencyPercentiles"], d.get("firstBytePercentiles") or {}
    return {
        "rps": d["summary"]["requestsPerSec"],
        "p50_ms": lat["p50"] * 1e3,
        "p99_ms": lat["p99"] * 1e3,
        "p99.9_ms": lat["p99.9"] * 1e3,
        "ttfb_p50_ms": (fb.get("p50") or 0) * 1e3,
    }


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proxy_config(mock_addr, data, budgets, redis_url):
    """The bench proxy: one agent in one team, with day and month budgets unless not."""
    limits = """
[[agents.budgets]]
period = "day"
usd = 1000000.0
tokens = 100000000000
[[teams]]
id = "bench"
[[teams.budgets]]
period = "month"
usd = 1000000.0
""" if budgets else ""
    redis = f'redis_url = "{redis_url}"' if redis_url else ""
    return f"""
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[storage]
dir = "{data}"
{redis}
[[providers]]
name = "openai"
kind = "openai"
base_url = "http://{mock_addr}"
prefix = "/openai"
api_key_env = "BENCH_OPENAI_KEY"
[[agents]]
id = "bench-agent"
team = "bench"
key_sha256 = "{hashlib.sha256(KEY.encode()).hexdigest()}"
{limits}"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benches" / "load" / "results.json"))
    ap.add_argument("--only", help="run only scenarios whose name contains this")
    ap.add_argument("--no-budgets", action="store_true",
                    help="also run a proxy whose agent has no budgets")
    ap.add_argument("--redis", action="store_true",
                    help="also run a proxy that keeps its budgets in Redis")
    opts = ap.parse_args()

    sh("cargo", "build", "--release", "--quiet", "--bin", "tokenwarden", cwd=ROOT)
    oha = ensure_oha()

    mock, mock_addr = start(pinned(0) + [str(BIN), "mock", "--listen", "127.0.0.1:0", "--no-record"])
    tmp = Path(tempfile.mkdtemp())
    procs = [mock]
    redis_url = None
    if opts.redis:
        port = free_port()
        procs.append(subprocess.Popen(
            pinned(0) + ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                         "--save", "", "--appendonly", "no", "--dir", str(tmp)],
            stdout=subprocess.DEVNULL))
        time.sleep(0.5)
        redis_url = f"redis://127.0.0.1:{port}/0"

    def proxy(name, budgets=True, redis=None):
        config = tmp / f"{name}.toml"
        config.write_text(proxy_config(mock_addr, tmp / name, budgets, redis))
        proc, addr = start(pinned(1) + [str(BIN), "serve", "--config", str(config)],
                           env={"BENCH_OPENAI_KEY": "sk-bench"})
        procs.append(proc)
        return proc, addr

    main_proxy, proxy_addr = proxy("tokenwarden")
    time.sleep(0.2)
    idle_rss = rss_kib(main_proxy.pid)
    targets = {
        "direct": (f"http://{mock_addr}/v1/chat/completions", False),
        "tokenwarden": (f"http://{proxy_addr}/openai/v1/chat/completions", True),
    }
    if opts.no_budgets:
        addr = proxy("no-budgets", budgets=False)[1]
        targets["no budgets"] = (f"http://{addr}/openai/v1/chat/completions", True)
    if redis_url:
        addr = proxy("redis", redis=redis_url)[1]
        targets["redis"] = (f"http://{addr}/openai/v1/chat/completions", True)
    results = []
    try:
        for name, args, body, headers in SCENARIOS:
            if opts.only and opts.only not in name:
                continue
            runs = {t: [] for t in targets}
            for _ in range(opts.rounds):
                for target, (url, auth) in targets.items():
                    runs[target].append(run_oha(oha, url, args, body, headers, opts.seconds, auth))
            med = {t: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for t, rs in runs.items()}
            d, p = med["direct"], med["tokenwarden"]
            result = {
                "scenario": name,
                "direct": d,
                "tokenwarden": p,
                "added_p50_ms": p["p50_ms"] - d["p50_ms"],
                "added_p99_ms": p["p99_ms"] - d["p99_ms"],
                "rps_ratio": p["rps"] / d["rps"] if d["rps"] else 0,
            }
            for other in ("no budgets", "redis"):
                if other in med:
                    o = med[other]
                    result[other] = o
                    result[f"{other} added_p50_ms"] = o["p50_ms"] - d["p50_ms"]
                    result[f"{other} added_p99_ms"] = o["p99_ms"] - d["p99_ms"]
            results.append(result)
            print(f"done: {name}", file=sys.stderr)
        busy_rss = rss_kib(main_proxy.pid)
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=30)

    header = f"{'scenario':28} {'direct p50':>10} {'proxy p50':>10} {'added p50':>10} " \
             f"{'direct p99':>10} {'proxy p99':>10} {'added p99':>10} {'direct rps':>10} {'proxy rps':>10}"
    print(header)
    print("-" * len(header))
    for r in results:
        d, p = r["direct"], r["tokenwarden"]
        print(f"{r['scenario']:28} {d['p50_ms']:10.3f} {p['p50_ms']:10.3f} {r['added_p50_ms']:10.3f} "
              f"{d['p99_ms']:10.3f} {p['p99_ms']:10.3f} {r['added_p99_ms']:10.3f} "
              f"{d['rps']:10.0f} {p['rps']:10.0f}")
    for other in ("no budgets", "redis"):
        if other not in targets:
            continue
        print(f"\n{other}: " + "; ".join(
            f"{r['scenario']}: added p50 {r[f'{other} added_p50_ms']:.3f}, "
            f"p99 {r[f'{other} added_p99_ms']:.3f}, {r[other]['rps']:.0f} rps" for r in results))
    print(f"\nlatency in ms, medians of {opts.rounds} rounds of {opts.seconds}s; "
          f"proxy RSS idle {idle_rss / 1024:.1f} MiB, after load {busy_rss / 1024:.1f} MiB")
    Path(opts.out).write_text(json.dumps({
        "rounds": opts.rounds,
        "seconds": opts.seconds,
        "cpus": os.cpu_count(),
        "proxy_rss_idle_kib": idle_rss,
        "proxy_rss_after_kib": busy_rss,
        "scenarios": results,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
