#!/usr/bin/env python3
"""Soak test (not in the default suite): mixed load with faults for a while, then the books.

    python3 benches/soak/run.py [--minutes 10] [--rate 200] [--out benches/soak/results.json]

Starts the mock provider and the release proxy (budgets, run limits, audit log with
fsync) and, for `--minutes`, drives it with `oha` at a steady rate of chat requests and
streams while a second client injects faults: upstream resets before headers and mid
stream, stalls cut by the idle limit, malformed SSE, invalid UTF-8, 10 MB lines, provider
429/529, clients that leave mid-stream. Every 10 s it samples the proxy's RSS. At the end
it checks the books: what the budget gauge says is left equals the budget minus the spend
of every audit line, nothing stays reserved, and `tokenwarden audit verify` passes.
Traffic goes to loopback only.
"""

import argparse
import hashlib
import http.client
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "target" / "release" / "tokenwarden"
KEY = "tw-soak-virtual-key"
BUDGET_TOKENS = 10**12
CHAT = '{"model":"gpt-4o-mini","max_tokens":20,"messages":[{"role":"user","content":"soak"}]}'
STREAM = ('{"model":"gpt-4o-mini","max_tokens":50,"stream":true,'
          '"messages":[{"role":"user","content":"soak stream"}]}')
FAULTS = [
    ({"x-mock-fault": "reset"}, STREAM),
    ({"x-mock-fault": "drop-mid-stream", "x-mock-chunks": "20"}, STREAM),
    ({"x-mock-fault": "stall-mid-stream", "x-mock-chunks": "20"}, STREAM),
    ({"x-mock-fault": "malformed-sse"}, STREAM),
    ({"x-mock-fault": "invalid-utf8"}, STREAM),
    ({"x-mock-fault": "huge-line"}, STREAM),
    ({"x-mock-status": "429"}, CHAT),
    ({"x-mock-status": "529"}, CHAT),
    ({"x-mock-chunks": "200", "x-mock-delay-ms": "5", "leave": "1"}, STREAM),
]


def start(args, env=None, log=None):
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log or subprocess.DEVNULL,
                            env={**os.environ, "RUST_LOG": "warn", **(env or {})}, text=True)
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"{args} printed no startup line")
    parts = line.split("://")
    return proc, parts[1].split(" ")[0].strip(), (parts[2].split(")")[0].strip() if len(parts) > 2 else None)


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fault_loop(addr, stop, counts):
    host, port = addr.rsplit(":", 1)
    while not stop.is_set():
        headers, body = random.choice(FAULTS)
        headers = dict(headers)
        leave = headers.pop("leave", None)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request("POST", "/openai/v1/chat/completions", body=body, headers={
                "authorization": f"Bearer {KEY}", "content-type": "application/json", **headers})
            response = conn.getresponse()
            counts[str(response.status)] = counts.get(str(response.status), 0) + 1
            if leave:
                response.read(200)
                conn.close()
                counts["left mid-stream"] = counts.get("left mid-stream", 0) + 1
            else:
                response.read()
        except Exception as e:  # a cut stream is an expected fault
            counts[type(e).__name__] = counts.get(type(e).__name__, 0) + 1
        finally:
            conn.close()
        time.sleep(0.05)


def metric(text, name, labels):
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--rate", type=int, default=200, help="steady requests per second")
    ap.add_argument("--out", default=str(ROOT / "benches" / "soak" / "results.json"))
    opts = ap.parse_args()

    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "tokenwarden"], cwd=ROOT, check=True)
    oha = shutil.which("oha") or str(Path.home() / ".cargo" / "bin" / "oha")
    if not Path(oha).exists():
        subprocess.run(["cargo", "install", "oha", "--locked", "--quiet"], check=True)

    tmp = Path(tempfile.mkdtemp())
    mock, mock_addr, _ = start([str(BIN), "mock", "--listen", "127.0.0.1:0", "--no-record"])
    config = tmp / "soak.toml"
    config.write_text(f"""
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[storage]
dir = "{tmp}/data"
[upstream]
idle_timeout = "2s"
total_timeout = "60s"
[[providers]]
name = "openai"
kind = "openai"
base_url = "http://{mock_addr}"
prefix = "/openai"
api_key_env = "SOAK_OPENAI_KEY"
[[agents]]
id = "soak-agent"
key_sha256 = "{hashlib.sha256(KEY.encode()).hexdigest()}"
[[agents.budgets]]
period = "total"
tokens = {BUDGET_TOKENS}
[agents.runs]
max_requests = 1000000000
max_error_streak = 1000000
""")
    log = open(tmp / "proxy.log", "w")
    proxy, addr, admin = start([str(BIN), "serve", "--config", str(config)],
                               env={"SOAK_OPENAI_KEY": "sk-soak"}, log=log)
    seconds = int(opts.minutes * 60)
    url = f"http://{addr}/openai/v1/chat/completions"
    chat_body, stream_body = tmp / "chat.json", tmp / "stream.json"
    chat_body.write_text(CHAT)
    stream_body.write_text(STREAM)
    loads = [subprocess.Popen(
        [oha, "--no-tui", "--output-format", "json", "-z", f"{seconds}s", "-c", "16",
         "-q", str(rate), "-m", "POST", "-H", "content-type: application/json",
         "-H", f"authorization: Bearer {KEY}", "-D", str(body), url],
        stdout=subprocess.PIPE, text=True)
        for body, rate in ((chat_body, opts.rate * 3 // 4), (stream_body, opts.rate // 4))]
    stop, counts = threading.Event(), {}
    faults = threading.Thread(target=fault_loop, args=(addr, stop, counts))
    faults.start()
    samples = []
    started = time.time()
    while time.time() - started < seconds:
        samples.append((round(time.time() - started), rss_kib(proxy.pid)))
        print(f"{samples[-1][0]:5d}s  RSS {samples[-1][1] / 1024:7.1f} MiB", file=sys.stderr)
        time.sleep(10)
    stop.set()
    faults.join()
    steady = [json.loads(load.communicate()[0]) for load in loads]
    time.sleep(3)  # the last settlements (a stall is cut after 2 s)

    conn = http.client.HTTPConnection(admin, timeout=10)
    conn.request("GET", "/metrics")
    metrics = conn.getresponse().read().decode()
    labels = {"agent": "soak-agent", "period": "total", "unit": "tokens"}
    remaining = metric(metrics, "tokenwarden_budget_remaining", labels)
    reserved = metric(metrics, "tokenwarden_budget_reserved", labels)
    proxy.terminate()
    proxy.wait(timeout=60)
    mock.terminate()
    spent, lines = 0, 0
    for f in sorted((tmp / "data" / "audit").glob("audit-*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            lines += 1
            if rec.get("agent") == "soak-agent":
                spent += sum(rec.get(k, 0) for k in
                             ("input_tokens", "cached_input_tokens", "cache_write_tokens", "output_tokens"))
    verify = subprocess.run([str(BIN), "audit", "verify", str(tmp / "data" / "audit")],
                            capture_output=True, text=True)
    steady_codes = {}
    for s in steady:
        for code, n in s.get("statusCodeDistribution", {}).items():
            steady_codes[code] = steady_codes.get(code, 0) + n
    rss = [kib for _, kib in samples]
    result = {
        "minutes": opts.minutes,
        "steady_rate": opts.rate,
        "steady_status_codes": steady_codes,
        "steady_errors": sum(s.get("errorDistribution", {}).get(k, 0) for s in steady
                             for k in s.get("errorDistribution", {})),
        "fault_client": counts,
        "audit_lines": lines,
        "rss_mib": {"first": rss[0] / 1024, "max": max(rss) / 1024, "last": rss[-1] / 1024},
        "rss_samples_kib": samples,
        "ledger": {"budget": BUDGET_TOKENS, "audited_spend": spent, "gauge_remaining": remaining,
                   "reserved": reserved, "matches": remaining == BUDGET_TOKENS - spent and reserved == 0},
        "audit_verify": verify.stdout.strip() or verify.stderr.strip(),
        "audit_verify_ok": verify.returncode == 0,
    }
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({k: v for k, v in result.items() if k != "rss_samples_kib"}, indent=2))
    if not (result["ledger"]["matches"] and result["audit_verify_ok"]):
        raise SystemExit("the books do not balance")


if __name__ == "__main__":
    main()
