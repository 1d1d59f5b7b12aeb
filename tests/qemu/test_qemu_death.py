"""A QEMU killed under a running VM: the host's networking hears it, and the VM is lost."""

from __future__ import annotations

import os
import signal

import pytest

from tests.qemu.conftest import Cluster
from whimbrel.v1 import events_pb2, vm_pb2

pytestmark = pytest.mark.qemu


def test_killed_qemu_releases_networking_and_loses_the_vm(cluster: Cluster) -> None:
    """kill -9 of a running VM's QEMU: hostd runs the network hook's release for it (a dead
    copy must not keep the VM's networking enabled), and the coordinator records the VM lost,
    with the exit in the reason, rather than quietly stopped."""
    cluster.define_and_start("vm-1", "host-a")
    pid = int((cluster.root / "host-a" / "vms" / "vm-1" / "qemu.pid").read_text())
    head = cluster.head()
    os.kill(pid, signal.SIGKILL)
    cluster.wait_event(
        lambda e: (
            isinstance(e.payload, events_pb2.NetworkChanged)
            and e.origin_host == "host-a"
            and e.payload.state == events_pb2.NETWORK_STATE_RELEASED
        ),
        from_seq=head,
    )
    calls = [line.split()[:3] for line in cluster.hook_log.read_text().splitlines()]
    assert calls[-1] == ["release", "vm-1", "host-a"]
    vm = cluster.vms.GetVm(vm_pb2.GetVmRequest(name="vm-1"))
    assert vm.status == vm_pb2.VM_STATUS_LOST
    assert "QEMU exited unexpectedly on host-a" in vm.lost_reason
