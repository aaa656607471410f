#!/usr/bin/env python3
"""CPU per request in instructions, which machine noise does not move.

    python3 benches/load/callgrind.py [-n 2000] [--body chat|stream|1k|1m] [--no-limits]
                                      [--bin PATH] [--top 25] [--keep DIR]

Runs the release tokenwarden under `valgrind --tool=callgrind` twice with the load
script's config (20 agents; with budgets, clamping and run limits unless --no-limits):
once with no request, once with `-n` requests on one connection (the mock provider and
`oha` run natively). The difference divided by `-n` is the proxy's instructions per
request, startup and shutdown left out; the top functions of the loaded run follow, by
self cost and by inclusive cost. Work done once on first use (the rate limiter's clock
calibrates itself) stays in, so a small `-n` reads high: 2,000 gives 186k for a chat
request where 300 gives 221k. Everything runs on loopback and stops by itself.

Under valgrind, sha2 runs its portable code (valgrind has no SHA extensions), so SHA-256
weighs much more here than on a CPU with them: read its share with that in mind.
`callgrind_annotate --inclusive=yes FILE` on a kept profile shows the rest.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as load  # noqa: E402  (the load script's config, bodies and helpers)

BODIES = {
    "chat": load.CHAT,
    "stream": load.CHAT_STREAM,
    "1k": load.prompt_of(1024),
    # No output limit, so with limits the proxy splices one into a 1 MB body.
    "1m": json.dumps({"model": "gpt-4o-mini",
                      "messages": [{"role": "user", "content": "lorem ipsum " * ((1 << 20) // 12)}]}),
}


def release_binary(path):
    """The binary at `path`, or the release build (built now) when none is given."""
    if not shutil.which("valgrind"):
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    if path:
        return Path(path).resolve()
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "tokenwarden"],
                   cwd=load.ROOT, check=True)
    return load.BIN


def under_valgrind(tool, binary, config, requests, body, oha):
    """Runs the proxy with `config` under valgrind (`tool`: its arguments), sends it
    `requests` requests on one connection, and stops it, so the tool writes its output."""
    proc = subprocess.Popen(
        ["valgrind", *tool, str(binary), "serve", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "RUST_LOG": "warn", "BENCH_OPENAI_KEY": "sk-bench"})
    try:
        line = proc.stdout.readline()
        while line and "://" not in line:
            line = proc.stdout.readline()
        if not line:
            raise SystemExit("the proxy under valgrind printed no address")
        addr = line.split("://")[1].split(" ")[0].strip()
        if requests:
            cmd = [oha, "--no-tui", "--output-format", "json", "-n", str(requests), "-c", "1",
                   "-m", "POST", "-H", "content-type: application/json",
                   "-H", f"authorization: Bearer {load.KEY}", "-D", load.body_file(body),
                   f"http://{addr}/openai/v1/chat/completions"]
            result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                               timeout=600).stdout)
            codes = result.get("statusCodeDistribution", {})
            if codes.get("200", 0) != requests:
                raise SystemExit(f"non-200 answers: {codes}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)


def profile(binary, mock_addr, tmp, limits, requests, body, out, oha):
    """Runs one proxy under callgrind, sends `requests` requests, returns total instructions."""
    config = tmp / f"tw-{requests}.toml"
    config.write_text(load.proxy_config(mock_addr, tmp / f"data-{requests}", limits, None))
    under_valgrind(["--tool=callgrind", f"--callgrind-out-file={out}"], binary, config,
                   requests, body, oha)
    for line in Path(out).read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise SystemExit(f"no totals in {out}")


def top(out, inclusive, count):
    """The costliest functions; by inclusive cost, only the proxy's own (the runtime's
    wrappers include everything)."""
    args = ["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}", str(out)]
    text = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    rows = [l for l in text.splitlines() if "%)" in l and "PROGRAM TOTALS" not in l
            and (not inclusive or "tokenwarden::" in l.split(":", 1)[-1])]
    return rows[:count]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=2000, help="requests in the loaded run")
    ap.add_argument("--body", choices=sorted(BODIES), default="chat")
    ap.add_argument("--no-limits", action="store_true", help="agents without any limit")
    ap.add_argument("--bin", help="the tokenwarden binary (default: build the release one)")
    ap.add_argument("--top", type=int, default=25, help="functions to list")
    ap.add_argument("--keep", help="keep both profiles in this directory")
    opts = ap.parse_args()

    binary = release_binary(opts.bin)
    oha = load.ensure_oha()
    tmp = Path(tempfile.mkdtemp(prefix="tw-callgrind-"))
    keep = Path(opts.keep) if opts.keep else tmp
    keep.mkdir(parents=True, exist_ok=True)
    mock, mock_addr = load.start([str(binary), "mock", "--listen", "127.0.0.1:0", "--no-record"])
    try:
        limits = not opts.no_limits
        body = BODIES[opts.body]
        try:
            idle = profile(binary, mock_addr, tmp, limits, 0, body, keep / "idle.out", oha)
            loaded = profile(binary, mock_addr, tmp, limits, opts.n, body, keep / "loaded.out",
                             oha)
        finally:
            mock.terminate()
            mock.wait(timeout=30)
        per_request = (loaded - idle) / opts.n
        print(f"{opts.n} requests ({opts.body}, {'with' if limits else 'without'} limits): "
              f"{per_request:,.0f} instructions per request "
              f"(loaded {loaded:,}, startup and shutdown {idle:,})", flush=True)
        print("\nby self cost:")
        print("\n".join(r[:180] for r in top(keep / "loaded.out", False, opts.top)))
        print("\nthe proxy's functions by inclusive cost:")
        print("\n".join(r[:180] for r in top(keep / "loaded.out", True, opts.top)))
        if opts.keep:
            print(f"\nprofiles kept in {keep}")
    finally:
        # Also when the output pipe closed early (`| head`).
        for leftover in tmp.glob("*"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
        if not opts.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        for path in load.BODIES.values():
            Path(path).unlink(missing_ok=True)

if __name__ == "__main__":
    main()
