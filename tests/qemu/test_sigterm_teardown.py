"""A benchmark or a test run stopped by SIGTERM (a timeout, a cancelled CI job) leaves nothing
running: the QEMUs they start run in sessions of their own, so only their teardowns can kill
them. Before, one such QEMU kept a core busy for 25 minutes and skewed the measurements taken
after it."""

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


def left_under(root: Path) -> list[tuple[int, str]]:
    """What is still alive under `root` once a run has exited. Its teardown killed every QEMU
    before it exited; a killed one may take a moment to be reaped by init, and counts as gone
    once it is a zombie (qemu.alive)."""
    deadline = time.monotonic() + 5
    while (left := processes_under(root)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


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
    assert left_under(tmp_path) == []


def test_a_test_run_stopped_by_sigterm_tears_its_cluster_down(tmp_path: Path) -> None:
    """A real-QEMU test stopped by SIGTERM once its cluster's QEMU runs: pytest exits through
    the test's teardown, and nothing it started is left."""
    inner = tmp_path / "inner"
    test = (
        "tests/qemu/test_postcopy_recovery.py::"
        "test_a_healthy_post_copy_is_not_taken_for_a_wedged_one"
    )
    with subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(inner),
         test],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    ) as run:  # fmt: skip
        try:
            # No event to await from another process's test: its QEMU is looked for.
            deadline = time.monotonic() + 60
            while not any("qemu-system" in a for _, a in processes_under(inner)):
                assert run.poll() is None, "the test ended before its QEMU was seen"
                assert time.monotonic() < deadline, "no QEMU of the test's cluster in 60 s"
                time.sleep(0.05)
            run.send_signal(signal.SIGTERM)
            assert run.wait(60) != 0
            assert left_under(inner) == []
        finally:
            run.kill()
            for pid, _ in processes_under(inner):
                os.kill(pid, signal.SIGKILL)
