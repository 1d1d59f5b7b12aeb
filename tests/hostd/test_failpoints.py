"""Failpoints in a real process: a plain one exits with 97 at once; `NAME=stop` freezes the
process there until SIGCONT, fires once, and the process goes on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from whimbrel import failpoints

PROGRAM = """
from whimbrel import failpoints
failpoints.hit("first")
print("after first", flush=True)
failpoints.hit("first")
print("first fires once", flush=True)
failpoints.hit("second")
print("not reached", flush=True)
"""


def state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_stop_freezes_until_sigcont_then_an_exit_failpoint_exits() -> None:
    """The process stops at `first` (state T, nothing printed), goes on after SIGCONT past a
    second hit of `first`, and exits with 97 at `second`."""
    env = dict(os.environ, WHIMBREL_FAILPOINTS="first=stop, second")
    process = subprocess.Popen(
        [sys.executable, "-c", PROGRAM], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
    )
    deadline = time.monotonic() + 30
    while state(process.pid) != "T":
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.01)
    process.send_signal(signal.SIGCONT)
    out, _ = process.communicate(timeout=30)
    assert process.returncode == failpoints.EXIT_CODE
    assert out.decode().splitlines() == ["after first", "first fires once"]
