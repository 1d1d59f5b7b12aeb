"""The control plane runs above the VMs: hostd and the coordinator with real-time round-robin
scheduling and the default nice value (their session's scheduling group with them), the QEMU
processes hostd starts as ordinary processes at nice 0 in sessions of their own. Both need
root (CAP_SYS_NICE), as CI has; without it a daemon warns and runs as it is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.cluster import Cluster
from whimbrel import priority


def nice(tid: int) -> int:
    # /proc/TID/stat: field 19 is the nice value (after the parenthesised command name).
    stat = Path(f"/proc/{tid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


def threads(pid: int) -> list[int]:
    return [int(t) for t in os.listdir(f"/proc/{pid}/task")]


def scheduling(tid: int) -> tuple[str, int]:
    """(policy, its priority or the nice value) of one thread."""
    policy = os.sched_getscheduler(tid)
    if policy == os.SCHED_RR:
        return "rr", os.sched_getparam(tid).sched_priority
    assert policy == os.SCHED_OTHER, policy
    return "other", nice(tid)


def need_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("WHIMBREL_REQUIRE_QEMU"):
            pytest.fail("the priority tests need root (WHIMBREL_REQUIRE_QEMU is set)")
        pytest.skip("raising a priority needs root")


def test_daemons_run_above_the_qemu_they_start(cluster: Cluster) -> None:
    need_root()
    cluster.define_and_start("vm-1", "host-a")
    qemu = int((cluster.root / "host-a" / "vms" / "vm-1" / "qemu.pid").read_text())
    daemons = [cluster.processes[name].popen.pid for name in ("coordinator", "host-a", "host-b")]
    for pid in daemons:
        # Every thread, the gRPC ones started after the priority was set included, except the
        # one that checkpoints the SQLite log in the background, an ordinary thread 10 nice
        # levels below the daemon's.
        found = sorted(scheduling(t) for t in threads(pid))
        background = ("other", priority.DEFAULT + 10)
        assert found.count(background) == 1
        assert set(found) == {("rr", priority.DEFAULT_REALTIME), background}
        assert all(nice(t) == priority.DEFAULT for t in threads(pid) if scheduling(t)[0] == "rr")
    assert {scheduling(t) for t in threads(qemu)} == {("other", 0)}
    assert priority.group_nice(qemu) in {0, None}  # None: no autogroups
    assert os.getsid(qemu) not in {os.getsid(pid) for pid in daemons}


def apply_in_new_process(realtime: int, *wrapper: str) -> subprocess.CompletedProcess[str]:
    """priority.apply(DEFAULT, realtime) in a new Python under `wrapper`; it prints whether
    the nice value was set, its policy, its nice value and its session group's."""
    code = (
        "import logging, os; from whimbrel import priority; logging.basicConfig(); "
        f"raised = priority.apply({priority.DEFAULT}, {realtime}); "
        "print(raised, os.sched_getscheduler(0) == os.SCHED_RR, os.getpriority(0, 0), "
        "priority.group_nice('self'))"
    )
    return subprocess.run(
        [*wrapper, sys.executable, "-c", code],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip


def test_only_a_daemon_at_its_nice_value_alone_raises_its_session_group() -> None:
    need_root()
    # Each in a session of its own (setsid), so in a new scheduling group at 0 where the kernel
    # has autogroups: a real-time daemon leaves it there, one at its nice value alone raises it.
    realtime = apply_in_new_process(1, "setsid", "--wait").stdout.split()
    alone = apply_in_new_process(0, "setsid", "--wait").stdout.split()
    assert realtime[:3] == ["True", "True", str(priority.DEFAULT)]
    assert alone[:3] == ["True", "False", str(priority.DEFAULT)]
    if realtime[3] != "None":
        assert (realtime[3], alone[3]) == ("0", str(priority.DEFAULT))


def test_a_daemon_without_cap_sys_nice_warns_and_runs_as_it_is() -> None:
    need_root()
    # Root without CAP_SYS_NICE (dropped from the bounding set, so the exec'd Python lacks it)
    # may neither use real-time scheduling nor lower its nice value.
    done = apply_in_new_process(1, "setpriv", "--bounding-set=-sys_nice")
    assert done.stdout.split()[:3] == ["False", "False", "0"]
    assert "cannot run with real-time priority 1 (Operation not permitted)" in done.stderr
    assert "cannot run at CPU priority -10" in done.stderr


def test_an_empty_autogroup_line_is_the_root_group() -> None:
    assert priority.parse_group_nice("/autogroup-33346 nice -10\n") == -10
    assert priority.parse_group_nice("") is None
