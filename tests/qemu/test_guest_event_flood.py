"""A guest that resets itself in a loop, on real QEMU: its RESET events reach the log within
hostd's record budget, the rest counted, and the VM is left alone."""

from __future__ import annotations

import json

import pytest

from hostd.event_budget import BURST, DROPPED_EVENT, RATE_PER_S
from tests.qemu.conftest import Cluster
from tools.guest import reset_disk
from whimbrel.v1 import common_pb2, events_pb2, vm_pb2

pytestmark = pytest.mark.qemu


def test_a_reset_loop_is_logged_within_the_budget(cluster: Cluster) -> None:
    disk = reset_disk(cluster.shared / "vm-1.img")
    spec = common_pb2.VmSpec(
        name="vm-1",
        memory_mib=64,
        vcpus=1,
        disks=[common_pb2.Disk(path=str(disk), format="raw")],
    )
    cluster.define_spec_and_start(spec, "host-a")
    report = cluster.wait_event(
        lambda e: (
            isinstance(e.payload, events_pb2.QmpEventReceived) and e.payload.event == DROPPED_EVENT
        ),
        timeout=60,
    )
    dropped = json.loads(report.payload.data_json)["dropped"]
    assert report.origin_host == "host-a" and dropped["RESET"] > 0, dropped
    resets = [
        e
        for e in cluster.events()
        if e.seq < report.seq
        and isinstance(e.payload, events_pb2.QmpEventReceived)
        and e.payload.event == "RESET"
    ]
    # QEMU's own timestamps: what the budget let through in the time the resets took.
    span_s = (resets[-1].time_us - resets[0].time_us) / 1e6
    assert BURST <= len(resets) <= BURST + RATE_PER_S * span_s + 1, (len(resets), span_s)
    vm = cluster.vms.GetVm(vm_pb2.GetVmRequest(name="vm-1"))
    assert vm.status == vm_pb2.VM_STATUS_RUNNING
