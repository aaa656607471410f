#!/usr/bin/env python3
"""Heap allocations per request, which machine noise does not move.

    python3 benches/load/allocs.py [-n 1000] [--body chat|stream] [--bin PATH] [--top 30]

Runs the release tokenwarden under `valgrind --tool=dhat` with the load script's config
(20 agents, budgets, clamping, run limits, the audit log), sends `-n` requests on one
connection (the mock provider and `oha` run natively), and prints the allocations per
request and the sites that allocate at least once per two requests, each named by the
first frame outside the allocator and the standard library. Startup allocations count
too (the time zone database, the config), so a small `-n` reads high. Allocations cost
more on a loaded core than their instructions say: each is a malloc on a tokio worker
and, for the audit record's, a free on the writer thread.
"""

import argparse
import collections
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as load  # noqa: E402  (the load script's config, bodies and helpers)
from callgrind import release_binary, under_valgrind  # noqa: E402  (the same valgrind run)

BODIES = {"chat": load.CHAT, "stream": load.CHAT_STREAM}
INTERNAL = re.compile(r"(library/(alloc|core|std)|raw_vec|/alloc/src|__rust|malloc|calloc|"
                      r"realloc|memalign)")


def site(frames):
    """The first frame that is not the allocator or the standard library."""
    for frame in frames[1:]:
        frame = re.sub(r"^0x[0-9A-F]+: ", "", frame)
        if not INTERNAL.search(frame):
            return re.sub(r"<[^()]*>", "", frame)[:150]
    return "?"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=1000, help="requests")
    ap.add_argument("--body", choices=sorted(BODIES), default="chat")
    ap.add_argument("--bin", help="the tokenwarden binary (default: build the release one)")
    ap.add_argument("--top", type=int, default=30, help="sites to list")
    opts = ap.parse_args()

    binary = release_binary(opts.bin)
    oha = load.ensure_oha()
    tmp = Path(tempfile.mkdtemp(prefix="tw-allocs-"))
    out = tmp / "dhat.json"
    mock, mock_addr = load.start([str(binary), "mock", "--listen", "127.0.0.1:0", "--no-record"])
    try:
        config = tmp / "tw.toml"
        config.write_text(load.proxy_config(mock_addr, tmp / "data", True, None))
        under_valgrind(["--tool=dhat", f"--dhat-out-file={out}"], binary, config, opts.n,
                       BODIES[opts.body], oha)
        profile = json.loads(out.read_text())
    finally:
        mock.terminate()
        mock.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
        for path in load.BODIES.values():
            Path(path).unlink(missing_ok=True)

    blocks = collections.Counter()
    size = collections.Counter()
    for point in profile["pps"]:
        where = site([profile["ftbl"][i] for i in point["fs"]])
        blocks[where] += point["tbk"]
        size[where] += point["tb"]
    total = sum(blocks.values())
    print(f"{opts.n} requests ({opts.body}): {total / opts.n:.1f} allocations per request "
          f"(startup included)")
    for where, count in blocks.most_common(opts.top):
        if count < opts.n / 2:
            break
        print(f"{count / opts.n:6.2f} per request {size[where] / count:8.0f} B  {where}")


if __name__ == "__main__":
    main()
