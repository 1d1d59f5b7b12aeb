"""A benchmark stopped by SIGTERM (a timeout, a cancelled CI job) leaves nothing running: its
QEMUs run in sessions of their own, so only its teardown can kill them. Before, one such QEMU
kept a core busy for 25 minutes and skewed the measurements taken after it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hostd import qemu
from tools.bench.switchover import RUNS_ENV

pytestmark = pytest.mark.qemu

ROOT = Path(__file__).resolve().parents[2]


def processes_under(root: Path) -> list[tuple[int, str]]:
    """Live processes whose command line names a path under `root`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(root) in args and qemu.alive(int(proc.name)):
            found.append((int(proc.name), args[:120]))
    return found


def test_a_switchover_bench_stopped_by_sigterm_tears_its_clusters_down(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path), RUNS_ENV: "1000"}
    with subprocess.Popen(
        [sys.executable, "-m", "tools.bench", "switchover.pause.precopy"],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
    ) as bench:  # fmt: skip
        try:
            stopped_and_clean(bench, tmp_path)
        finally:
            bench.kill()
            for pid, _ in processes_under(tmp_path):
                os.kill(pid, signal.SIGKILL)


def stopped_and_clean(bench: subprocess.Popen[str], tmp_path: Path) -> None:
    """Once the bench has taken its first sample, SIGTERM: it exits, and nothing it started
    is left."""
    assert bench.stderr is not None
    # Its first baseline sample: both sides' processes and QEMUs are up.
    for line in bench.stderr:
        if line.strip().startswith("direct 0:"):
            break
    else:
        pytest.fail(f"the bench ended before its first sample ({bench.wait()})")
    assert any("qemu-system" in args for _, args in processes_under(tmp_path))
    bench.send_signal(signal.SIGTERM)
    bench.stderr.read()  # until it exits (its teardown may print)
    assert bench.wait(60) != 0
    # The teardown kills every QEMU before the bench exits; a killed one may take a moment
    # to be reaped, and counts as gone already (qemu.alive).
    deadline = time.monotonic() + 5
    while (left := processes_under(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == []
