#!/usr/bin/env python3
"""Load benchmark: the mock provider called directly, through nginx and through tokenwarden.

    python3 benches/load/run.py [--rounds 3] [--seconds 5] [--out benches/load/results.json]
                                [--only SCENARIO] [--no-nginx] [--no-budgets] [--redis]
                                [--no-slow-streams] [--bin PATH]

Builds the release binary, installs `oha` from crates.io when missing, and starts:
- the project's mock provider;
- tokenwarden with a realistic config: 20 agents in 4 teams, day and month budgets,
  run limits, pricing, the audit log with fsync; every request is reserved, clamped,
  counted into its run, settled and audited;
- nginx (1 worker, buffering off, keep-alive to the upstream) in front of the same mock,
  when `nginx` is installed (`apt-get install nginx`; `--no-nginx` skips it);
- with `--no-budgets`, a second tokenwarden whose agent has no limits (what limits cost);
  with `--redis`, one that keeps its limits in a redis-server (what a shared ledger costs).

The load generator and the mock run on core 0, the proxies on core 1 (`taskset`). Every
scenario runs against every target in alternation, `--rounds` times; the table shows
medians, the latency each proxy adds over the direct call, and the ratio of
tokenwarden's added latency to nginx's. The same goes to a JSON file for comparison
across commits. Traffic goes to loopback only; every run is bounded in time.
"""

import argparse
import hashlib
import json
import os
import shutil
import socket
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


def prompt_of(size):
    """A chat request whose prompt makes the body about `size` bytes."""
    filler = "lorem ipsum " * (size // 12)
    return json.dumps({"model": "gpt-4o-mini", "max_tokens": 5,
                       "messages": [{"role": "user", "content": filler}]})


# name, oha arguments, body, extra headers, what to report
SCENARIOS = [
    ("chat, 1 connection", ["-c", "1"], CHAT, [], "latency"),
    ("chat, 32 connections", ["-c", "32"], CHAT, [], "throughput"),
    ("chat, 500 req/s", ["-c", "32", "-q", "500", "--latency-correction"], CHAT, [], "latency"),
    ("chat, 1000 req/s", ["-c", "32", "-q", "1000", "--latency-correction"], CHAT, [], "latency"),
    ("chat, 2000 req/s", ["-c", "64", "-q", "2000", "--latency-correction"], CHAT, [], "latency"),
    ("stream 50 chunks, 1 conn", ["-c", "1"], CHAT_STREAM, ["x-mock-chunks: 50"], "stream"),
    ("stream 50 chunks, 32 conn", ["-c", "32"], CHAT_STREAM, ["x-mock-chunks: 50"], "stream"),
    ("stream 50 chunks, 200/s", ["-c", "32", "-q", "200", "--latency-correction"], CHAT_STREAM,
     ["x-mock-chunks: 50"], "stream"),
    ("1 KB prompt, 1 conn", ["-c", "1"], prompt_of(1024), [], "latency"),
    ("1 MB prompt, 1 conn", ["-c", "1"], prompt_of(1 << 20), [], "latency"),
]
SLOW_STREAMS = 2000
# `--only slow` runs this memory test alone.
SLOW_STREAMS_NAME = "slow streams"


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


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def children(pid):
    """`pid` and every process under it (nginx's master and workers)."""
    out = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids = (task / "children").read_text().split()
        for kid in kids:
            out.extend(children(int(kid)))
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port):
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return
        except OSError:
            time.sleep(0.025)
    raise SystemExit(f"nothing listens on {port}")


BODIES = {}


def body_file(body):
    """The body in a file (a 1 MB body does not fit on a command line)."""
    if body not in BODIES:
        path = Path(tempfile.mkstemp(suffix=".json")[1])
        path.write_text(body)
        BODIES[body] = str(path)
    return BODIES[body]


def run_oha(oha, url, args, body, headers, seconds, auth):
    cmd = pinned(0) + [oha, "--no-tui", "--output-format", "json", "-z", f"{seconds}s",
                       "-m", "POST", "-H", "content-type: application/json",
                       "-D", body_file(body), *args]
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
        "ttfb_p99_ms": (fb.get("p99") or 0) * 1e3,
    }


def proxy_config(mock_addr, data, limits, redis_url):
    """20 agents in 4 teams; `bench-agent` is the one the load uses. With `limits`, each
    agent has budgets and run limits as a production config would."""
    agents = []
    for i in range(20):
        key = KEY if i == 0 else f"tw-bench-other-{i}"
        name = "bench-agent" if i == 0 else f"agent-{i}"
        agent = f"""
[[agents]]
id = "{name}"
team = "team-{i % 4}"
key_sha256 = "{hashlib.sha256(key.encode()).hexdigest()}"
"""
        if limits:
            agent += """max_tokens_cap = 4096
[[agents.budgets]]
period = "day"
usd = 1000000.0
tokens = 100000000000
[agents.limits]
requests_per_minute = 100000000
[agents.runs]
max_requests = 1000000000
max_tokens = 1000000000000
max_usd = 1000000.0
max_duration = "24h"
max_error_streak = 100
max_tokens_per_minute = 1000000000000
"""
        agents.append(agent)
    teams = "".join(
        f'\n[[teams]]\nid = "team-{t}"\n' + ('[[teams.budgets]]\nperiod = "month"\nusd = 1000000.0\n' if limits else "")
        for t in range(4))
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
[pricing."gpt-4o-mini"]
input_per_mtok = 0.15
cached_input_per_mtok = 0.075
output_per_mtok = 0.60
{"".join(agents)}{teams}"""


def nginx_config(tmp, port, mock_addr):
    return f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    client_max_body_size 8m;
    upstream mock {{ server {mock_addr}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port};
        location /openai/ {{
            proxy_pass http://mock/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"""


def slow_streams_rss(oha, url, auth, pids):
    """RSS added per open stream: `SLOW_STREAMS` streams of 50 chunks 100 ms apart.

    RSS is sampled until every stream has ended and the peak is taken, so each stream is
    counted at its fullest (all its chunks through). The figure after the first 4 s,
    what earlier versions reported, is kept too; it depends on how many chunks went
    through by then, and so on CPU load."""
    # The processes as they are now: nginx forks its worker after it starts listening.
    pids = [p for root in pids for p in children(root)]
    before = rss_kib(pids)
    cmd = pinned(0) + [oha, "--no-tui", "--output-format", "json", "-n", str(SLOW_STREAMS),
                       "-c", str(SLOW_STREAMS), "-m", "POST", "-H", "content-type: application/json",
                       "-H", "x-mock-chunks: 50", "-H", "x-mock-delay-ms: 100",
                       "-D", body_file(CHAT_STREAM)]
    if auth:
        cmd += ["-H", f"authorization: Bearer {KEY}"]
    load = subprocess.Popen(cmd + [url], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    peak = peak_4s = before
    started = time.monotonic()
    while load.poll() is None and time.monotonic() - started < 60:
        time.sleep(0.1)
        rss = rss_kib(pids)
        peak = max(peak, rss)
        if time.monotonic() - started <= 4:
            peak_4s = peak
    out, _ = load.communicate(timeout=60)
    codes = json.loads(out).get("statusCodeDistribution", {})
    if codes.get("200", 0) != SLOW_STREAMS:
        raise SystemExit(f"slow streams through {url}: {codes}")
    return {"rss_before_kib": before, "rss_peak_kib": peak,
            "kib_per_stream": (peak - before) / SLOW_STREAMS,
            "kib_per_stream_4s": (peak_4s - before) / SLOW_STREAMS}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benches" / "load" / "results.json"))
    ap.add_argument("--only", help="run only scenarios whose name contains this "
                    "('slow streams' names the memory test)")
    ap.add_argument("--no-nginx", action="store_true", help="leave nginx out even if installed")
    ap.add_argument("--no-budgets", action="store_true",
                    help="also run a proxy whose agent has no limits")
    ap.add_argument("--redis", action="store_true",
                    help="also run a proxy that keeps its limits in Redis")
    ap.add_argument("--bin", help="a tokenwarden binary to run instead of building the "
                    "release one (to compare two builds)")
    ap.add_argument("--also", action="append", default=[], metavar="NAME=BIN[@CONFIG]",
                    help="also run another build side by side, e.g. an older commit's; "
                    "CONFIG is a config template for a build that cannot read today's "
                    "({mock} and {data} are filled in)")
    ap.add_argument("--no-slow-streams", action="store_true",
                    help="skip the memory test with 2,000 open streams")
    opts = ap.parse_args()

    global BIN
    if opts.bin:
        BIN = Path(opts.bin).resolve()
    else:
        sh("cargo", "build", "--release", "--quiet", "--bin", "tokenwarden", cwd=ROOT)
    oha = ensure_oha()

    mock, mock_addr = start(pinned(0) + [str(BIN), "mock", "--listen", "127.0.0.1:0", "--no-record"])
    tmp = Path(tempfile.mkdtemp())
    procs = [mock]
    targets = {"direct": (f"http://{mock_addr}/v1/chat/completions", False, [mock.pid])}
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx and not opts.no_nginx:
        port = free_port()
        conf = tmp / "nginx.conf"
        conf.write_text(nginx_config(tmp, port, mock_addr))
        proc = subprocess.Popen(pinned(1) + [nginx, "-c", str(conf), "-p", str(tmp)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        wait_port(port)
        targets["nginx"] = (f"http://127.0.0.1:{port}/openai/v1/chat/completions", False,
                            [proc.pid])

    def proxy(name, limits=True, redis=None, binary=None, template=None):
        config = tmp / f"{name}.toml"
        if template:
            text = Path(template).read_text().replace("{mock}", mock_addr)
            config.write_text(text.replace("{data}", str(tmp / name)))
        else:
            config.write_text(proxy_config(mock_addr, tmp / name, limits, redis))
        proc, addr = start(pinned(1) + [str(binary or BIN), "serve", "--config", str(config)],
                           env={"BENCH_OPENAI_KEY": "sk-bench"})
        procs.append(proc)
        targets[name] = (f"http://{addr}/openai/v1/chat/completions", True, [proc.pid])
        return proc

    main_proxy = proxy("tokenwarden")
    if opts.no_budgets:
        proxy("no limits", limits=False)
    if opts.redis:
        port = free_port()
        procs.insert(1, subprocess.Popen(
            pinned(0) + ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                         "--save", "", "--appendonly", "no", "--dir", str(tmp)],
            stdout=subprocess.DEVNULL))
        wait_port(port)
        proxy("redis", redis=f"redis://127.0.0.1:{port}/0")
    for also in opts.also:
        name, _, rest = also.partition("=")
        binary, _, template = rest.partition("@")
        if not name or not binary:
            ap.error(f"--also {also!r}: expected NAME=BIN[@CONFIG]")
        proxy(name, binary=Path(binary).resolve(), template=template or None)
    time.sleep(0.3)
    idle_rss = rss_kib([main_proxy.pid])

    results = []
    memory = {}
    try:
        for name, args, body, headers, kind in SCENARIOS:
            if opts.only and opts.only not in name:
                continue
            runs = {t: [] for t in targets}
            for _ in range(opts.rounds):
                for target, (url, auth, _) in targets.items():
                    runs[target].append(run_oha(oha, url, args, body, headers, opts.seconds, auth))
            med = {t: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for t, rs in runs.items()}
            d = med["direct"]
            result = {"scenario": name, "kind": kind, "targets": med, "added": {}}
            for t, m in med.items():
                if t != "direct":
                    result["added"][t] = {
                        "p50_ms": m["p50_ms"] - d["p50_ms"],
                        "p99_ms": m["p99_ms"] - d["p99_ms"],
                        "p99.9_ms": m["p99.9_ms"] - d["p99.9_ms"],
                        "ttfb_p50_ms": m["ttfb_p50_ms"] - d["ttfb_p50_ms"],
                        "rps_ratio": m["rps"] / d["rps"] if d["rps"] else 0,
                    }
            if "nginx" in result["added"]:
                tw, ng = result["added"]["tokenwarden"], result["added"]["nginx"]
                result["overhead_ratio_p50"] = tw["p50_ms"] / ng["p50_ms"] if ng["p50_ms"] > 0 else None
                result["overhead_ratio_p99"] = tw["p99_ms"] / ng["p99_ms"] if ng["p99_ms"] > 0 else None
            results.append(result)
            print(f"done: {name}", file=sys.stderr)
        if not opts.no_slow_streams and (not opts.only or opts.only in SLOW_STREAMS_NAME):
            for target in ("nginx", "tokenwarden"):
                if target in targets:
                    url, auth, pids = targets[target]
                    memory[target] = slow_streams_rss(oha, url, auth, pids)
            print("done: slow streams", file=sys.stderr)
        busy_rss = rss_kib([main_proxy.pid])
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=30)
        # The proxies' audit logs and the body files: a run leaves nothing behind.
        shutil.rmtree(tmp, ignore_errors=True)
        for path in BODIES.values():
            Path(path).unlink(missing_ok=True)

    names = [t for t in targets if t != "direct"]
    header = f"{'scenario':27} {'direct p50/p99':>15}" + "".join(
        f" {t + ' +p50/+p99':>24}" for t in names) + f" {'tw/nginx p50':>12} {'rps d/' + '/'.join(n[:5] for n in names):>22}"
    print(header)
    print("-" * len(header))
    for r in results:
        d = r["targets"]["direct"]
        line = f"{r['scenario']:27} {d['p50_ms']:7.3f}/{d['p99_ms']:7.3f}"
        for t in names:
            a = r["added"][t]
            line += f" {a['p50_ms']:11.3f}/{a['p99_ms']:11.3f}" + " " * 0
        ratio = r.get("overhead_ratio_p50")
        line += f" {ratio:12.2f}" if ratio is not None else f" {'-':>12}"
        line += " " + "/".join(f"{r['targets'][t]['rps']:.0f}" for t in targets)
        print(line)
    if memory:
        print()
        for t, m in memory.items():
            print(f"{SLOW_STREAMS} open streams, {t}: RSS {m['rss_before_kib'] / 1024:.1f} -> "
                  f"{m['rss_peak_kib'] / 1024:.1f} MiB, {m['kib_per_stream']:.1f} KiB per stream "
                  f"({m['kib_per_stream_4s']:.1f} after 4 s)")
    print(f"\nlatency in ms (added over direct), medians of {opts.rounds} rounds of {opts.seconds}s; "
          f"tokenwarden RSS idle {idle_rss / 1024:.1f} MiB, after load {busy_rss / 1024:.1f} MiB")
    Path(opts.out).write_text(json.dumps({
        "rounds": opts.rounds,
        "seconds": opts.seconds,
        "cpus": os.cpu_count(),
        "proxy_rss_idle_kib": idle_rss,
        "proxy_rss_after_kib": busy_rss,
        "slow_streams": memory,
        "scenarios": results,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
