"""whimbrelctl under faults: a SIGSTOPped coordinator costs an operator --timeout seconds and exit
3, never a hang; --json prints the same error object for an unreachable coordinator as for a
refusal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.integration.test_coordinator_process import start
from tools.cluster import BIN


def ctl(address: str, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run(
        [str(BIN / "whimbrelctl"), "--coordinator", address, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result, time.monotonic() - started


def test_a_stopped_coordinator_gives_exit_3_within_the_timeout(tmp_path: Path) -> None:
    """Unary calls hit the deadline; watch and events --follow give up connecting; once the
    coordinator continues, the same commands work."""
    process, address = start(tmp_path, tmp_path / "w.db")
    os.kill(process.popen.pid, signal.SIGSTOP)
    try:
        hosts, took = ctl(address, "--timeout", "1", "hosts")
        assert hosts.returncode == 3, hosts.stderr
        assert "did not answer within 1 s" in hosts.stderr and took < 10
        as_json, _ = ctl(address, "--json", "--timeout", "1", "vm", "list")
        assert as_json.returncode == 3
        error = json.loads(as_json.stdout)["error"]
        assert error["code"] == "DEADLINE_EXCEEDED" and address in error["message"]
        for stream in (["migration", "watch", "m-1"], ["events", "--follow"]):
            watched, took = ctl(address, "--timeout", "1", *stream)
            assert watched.returncode == 3, (stream, watched.stderr)
            assert "cannot reach the coordinator" in watched.stderr and took < 10
    finally:
        os.kill(process.popen.pid, signal.SIGCONT)
    try:
        hosts, _ = ctl(address, "--json", "--timeout", "5", "hosts")
        assert hosts.returncode == 0, hosts.stderr
        assert json.loads(hosts.stdout) == {}  # no hosts yet: an empty ListHostsResponse
        refused, _ = ctl(address, "--json", "vm", "get", "nope")
        assert refused.returncode == 1
        assert json.loads(refused.stdout)["error"]["code"] == "NOT_FOUND"
    finally:
        assert process.stop(signal.SIGTERM) == 0


def test_an_unreachable_coordinator_prints_the_error_object_with_json() -> None:
    """Nothing listening: exit 3, and with --json the error object a refusal would print."""
    gone, _ = ctl("127.0.0.1:1", "--json", "hosts")
    assert gone.returncode == 3 and "cannot reach" in gone.stderr
    error = json.loads(gone.stdout)["error"]
    assert error["code"] == "UNAVAILABLE" and "127.0.0.1:1" in error["message"]
    usage, _ = ctl("127.0.0.1:1", "--timeout", "0", "hosts")
    assert usage.returncode == 2 and "positive number of seconds" in usage.stderr
