"""Start the real tokenwarden binary (mock provider and proxy) on free ports."""

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("TOKENWARDEN_BIN", str(ROOT / "target" / "debug" / "tokenwarden"))

VIRTUAL_KEY = "tw-sdk-test-virtual-key"
RUNAWAY_KEY = "tw-sdk-test-runaway-key"
OPENAI_KEY = "sk-sdk-test-real-openai"
ANTHROPIC_KEY = "sk-ant-sdk-test-real"


def _start(args, env=None, log=None):
    proc = subprocess.Popen(
        [BIN, *args],
        stdout=subprocess.PIPE,
        stderr=log or subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        text=True,
    )
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise RuntimeError(f"{args[0]} printed no startup line")
    return proc, line


def _addr(line, n=0):
    part = line.split("://")[n + 1]
    return part.split(" ")[0].split(")")[0].strip()


@pytest.fixture(scope="session")
def mock():
    proc, line = _start(["mock", "--listen", "127.0.0.1:0"])
    yield f"http://{_addr(line)}"
    proc.kill()
    proc.wait()


@pytest.fixture(scope="session")
def proxy(mock):
    tmp = tempfile.mkdtemp()
    config = Path(tmp) / "tokenwarden.toml"
    digest = hashlib.sha256(VIRTUAL_KEY.encode()).hexdigest()
    config.write_text(
        f"""
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[[providers]]
name = "openai"
kind = "openai"
base_url = "{mock}"
prefix = "/openai"
api_key_env = "SDK_OPENAI_KEY"
[[providers]]
name = "anthropic"
kind = "anthropic"
base_url = "{mock}"
prefix = "/anthropic"
api_key_env = "SDK_ANTHROPIC_KEY"
[[agents]]
id = "sdk-agent"
key_sha256 = "{digest}"
[[agents]]
id = "sdk-runaway"
key_sha256 = "{hashlib.sha256(RUNAWAY_KEY.encode()).hexdigest()}"
[agents.runs]
max_tokens = 40
"""
    )
    log = open(Path(tmp) / "proxy.log", "w")
    proc, line = _start(
        ["serve", "--config", str(config)],
        env={"SDK_OPENAI_KEY": OPENAI_KEY, "SDK_ANTHROPIC_KEY": ANTHROPIC_KEY},
        log=log,
    )
    yield f"http://{_addr(line)}"
    proc.terminate()
    proc.wait(timeout=15)
    log.close()
