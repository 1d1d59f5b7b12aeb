"""The control plane runs above the VMs: hostd and the coordinator at the default CPU priority
(and their session's scheduling group with them), the QEMU processes hostd starts at nice 0
in sessions of their own. Lowering a nice value needs root, as CI has."""

from __future__ import annotations

import os
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


def test_daemons_run_above_the_qemu_they_start(cluster: Cluster) -> None:
    if os.geteuid() != 0:
        if os.environ.get("WHIMBREL_REQUIRE_QEMU"):
            pytest.fail("the priority test needs root (WHIMBREL_REQUIRE_QEMU is set)")
        pytest.skip("lowering a nice value needs root")
    cluster.define_and_start("vm-1", "host-a")
    qemu = int((cluster.root / "host-a" / "vms" / "vm-1" / "qemu.pid").read_text())
    daemons = [cluster.processes[name].popen.pid for name in ("coordinator", "host-a", "host-b")]
    for pid in daemons:
        # Every thread, the gRPC ones started after the priority was set included, except the
        # one that checkpoints the SQLite log in the background, 10 levels below the others.
        values = sorted(nice(t) for t in threads(pid))
        assert values.count(priority.DEFAULT + 10) == 1
        assert set(values) == {priority.DEFAULT, priority.DEFAULT + 10}
    assert {nice(t) for t in threads(qemu)} == {0}
    # A daemon in a session group of its own raised the group too; one in the root group (started
    # by init without a session, as CI's runner does) has no group value to raise.
    for pid in daemons:
        assert priority.group_nice(pid) in {priority.DEFAULT, None}
    assert priority.group_nice(qemu) in {0, None}
    assert os.getsid(qemu) not in {os.getsid(pid) for pid in daemons}


def test_an_empty_autogroup_line_is_the_root_group() -> None:
    assert priority.parse_group_nice("/autogroup-33346 nice -10\n") == -10
    assert priority.parse_group_nice("") is None
