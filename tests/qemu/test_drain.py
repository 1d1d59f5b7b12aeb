"""Host maintenance with real QEMU: `whimbrelctl host drain --wait` empties a host into the
others by free capacity, under the migration limits, and the audit finds the log clean."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.qemu.test_ctl import ctl
from tools.audit.cli import main as audit_main
from tools.cluster import Cluster

pytestmark = pytest.mark.qemu

CAPACITY = ["--capacity-memory-mib", "1024", "--capacity-vcpus", "4"]


def test_drain_moves_every_vm_and_leaves_the_host_empty(tmp_path: Path) -> None:
    hosts = ("host-a", "host-b", "host-c")
    cluster = Cluster(tmp_path, hostd_args={h: CAPACITY for h in hosts})
    try:
        cluster.start(*hosts)
        for name in ("vm-1", "vm-2", "vm-3"):
            cluster.define_and_start(name, "host-a")
        # One migration out of a host at a time: the third waits in the queue.
        limits = ctl(cluster, "limits", "set", "--per-host-outbound", "1", "--reason", "test")
        assert limits.returncode == 0, limits.stderr
        listed = json.loads(ctl(cluster, "--json", "hosts").stdout)["hosts"]
        free = {h["host_id"]: h["free"]["memory_mib"] for h in listed}
        assert free == {"host-a": 1024 - 3 * 64, "host-b": 1024, "host-c": 1024}

        drained = ctl(cluster, "host", "drain", "host-a", "--reason", "kernel 6.1", "--wait")
        assert drained.returncode == 0, drained.stdout + drained.stderr
        out = drained.stdout
        assert out.startswith("draining host-a: 3 migrations"), out
        assert "queued" in out  # progress showed the queue at work
        # Each VM to the host with the most free memory, the plan's own moves counted (ties
        # by id): host-b, then host-c, then host-b again.
        assert "vm-1: moved to host-b" in out and "vm-2: moved to host-c" in out
        assert "vm-3: moved to host-b" in out and out.rstrip().endswith("host-a is empty")

        vms = json.loads(ctl(cluster, "--json", "vm", "list").stdout)["vms"]
        assert {vm["spec"]["name"]: vm["host"] for vm in vms} == {
            "vm-1": "host-b",
            "vm-2": "host-c",
            "vm-3": "host-b",
        }
        # A drained host stays cordoned: nothing is placed on it until uncordoned.
        back = ctl(cluster, "migrate", "vm-1", "--to", "host-a")
        assert back.returncode == 1 and "cordoned (drain: kernel 6.1)" in back.stderr
        assert ctl(cluster, "host", "uncordon", "host-a").returncode == 0
    finally:
        cluster.teardown()
    assert audit_main(["verify", str(cluster.db), "--final"]) == 0


def test_draining_two_hosts_at_once_sends_nothing_to_either(tmp_path: Path) -> None:
    """`host drain host-a host-b` cordons both before planning: host-a's VM cannot be sent to
    host-b (the roomiest host, ties by id) only to be stranded there; both VMs end on host-c."""
    hosts = ("host-a", "host-b", "host-c")
    cluster = Cluster(tmp_path, hostd_args={h: CAPACITY for h in hosts})
    try:
        cluster.start(*hosts)
        cluster.define_and_start("vm-1", "host-a")
        cluster.define_and_start("vm-2", "host-b")
        drained = ctl(cluster, "host", "drain", "host-a", "host-b", "--wait")
        assert drained.returncode == 0, drained.stdout + drained.stderr
        assert "host-a is empty" in drained.stdout and "host-b is empty" in drained.stdout
        vms = json.loads(ctl(cluster, "--json", "vm", "list").stdout)["vms"]
        assert {vm["spec"]["name"]: vm["host"] for vm in vms} == {
            "vm-1": "host-c",
            "vm-2": "host-c",
        }
    finally:
        cluster.teardown()
    assert audit_main(["verify", str(cluster.db), "--final"]) == 0
