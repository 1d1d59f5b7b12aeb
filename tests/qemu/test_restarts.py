"""Restarts with real processes: QEMU outlives hostd, and nothing a host saw is lost while the
coordinator is down."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from tests.qemu.conftest import Cluster
from tools.audit.cli import main as audit
from tools.guest import random_ram
from whimbrel.v1 import common_pb2, events_pb2, migration_pb2, vm_pb2

pytestmark = pytest.mark.qemu


def qemu_pid(cluster: Cluster, host: str, vm: str) -> int:
    return int((cluster.root / host / "vms" / vm / "qemu.pid").read_text())


def test_restarted_hostd_reattaches_to_its_running_qemu(cluster: Cluster) -> None:
    """kill -9 hostd: its QEMU keeps running; the new hostd (generation 2) re-attaches over QMP
    and the VM then migrates normally."""
    cluster.define_and_start("vm-1", "host-a")
    pid = qemu_pid(cluster, "host-a", "vm-1")
    head = cluster.head()
    cluster.processes["host-a"].stop(signal.SIGKILL)
    cluster.wait_event(
        lambda e: (
            isinstance(e.payload, events_pb2.HostDisconnected) and e.payload.host_id == "host-a"
        ),
        from_seq=head,
    )
    os.kill(pid, 0)  # QEMU outlived hostd
    cluster.start_hostd("host-a")
    cluster.wait_event(
        lambda e: (
            isinstance(e.payload, events_pb2.HostConnected)
            and e.payload.host_id == "host-a"
            and e.payload.generation == 2
        ),
        from_seq=head,
    )
    cluster.wait_event(
        lambda e: (
            isinstance(e.payload, events_pb2.VmObserved)
            and e.origin_host == "host-a"
            and e.origin_generation == 2
            and e.payload.observation.runstate == "running"
        ),
        from_seq=head,
    )
    vm = cluster.vms.GetVm(vm_pb2.GetVmRequest(name="vm-1"))
    assert (vm.host, vm.status) == ("host-a", vm_pb2.VM_STATUS_RUNNING)
    cluster.migrations.StartMigration(migration_pb2.StartMigrationRequest(
        vm="vm-1", destination="host-b", mode=common_pb2.MIGRATION_MODE_PRECOPY,
        migration_id="m-1"))  # fmt: skip
    assert cluster.watch("m-1").phase == common_pb2.MIGRATION_PHASE_COMPLETED
    assert audit(["verify", str(cluster.db), "--final"]) == 0


def test_observation_during_coordinator_outage_arrives_once(cluster: Cluster) -> None:
    """QEMU dies while the coordinator is down: hostd keeps the event in its outbox and
    delivers it, exactly once, to the restarted coordinator."""
    cluster.define_and_start("vm-1", "host-a")
    address = cluster.address
    assert cluster.processes["coordinator"].stop() == 0
    os.kill(qemu_pid(cluster, "host-a", "vm-1"), signal.SIGKILL)
    cluster.start_coordinator(listen=address)
    cluster.wait_event(
        lambda e: isinstance(e.payload, events_pb2.QemuExited) and e.payload.vm == "vm-1"
    )
    vm = cluster.vms.GetVm(vm_pb2.GetVmRequest(name="vm-1"))
    # Killed unasked: lost (its on_lost policy applies), from the hello that found it gone.
    assert vm.status == vm_pb2.VM_STATUS_LOST
    assert vm.lost_reason == "QEMU on host-a found gone, unasked (hello)"
    exits = [e for e in cluster.events() if isinstance(e.payload, events_pb2.QemuExited)]
    assert len(exits) == 1 and exits[0].origin_host == "host-a"
    epochs = [
        e.payload.epoch
        for e in cluster.events()
        if isinstance(e.payload, events_pb2.CoordinatorStarted)
    ]
    assert epochs == [1, 2]
    assert audit(["verify", str(cluster.db), "--final"]) == 0


def test_hosts_return_to_a_coordinator_restarted_after_an_outage(cluster: Cluster) -> None:
    """A coordinator down for 4 s and restarted with --host-wait 2 finds both hosts back in
    time (hostd's reconnect gaps stay under 1.25 s): none is declared missing, and the open
    migration goes on instead of being rolled back."""
    from tests.qemu.scenario import qmp_event, start_migration

    cluster.define_and_start("vm-1", "host-a")
    head = cluster.head()
    start_migration(cluster, common_pb2.MIGRATION_MODE_AUTO, max_bandwidth=4 << 20)
    cluster.wait_event(qmp_event("host-a", "MIGRATION_PASS"), from_seq=head)
    address = cluster.address
    cluster.processes["coordinator"].stop(signal.SIGKILL)
    time.sleep(4.0)  # the outage itself: hostd's backoff grows meanwhile
    cluster.coordinator_args = ["--host-wait", "2"]
    cluster.start_coordinator(listen=address)
    finished = cluster.wait_event(
        lambda e: isinstance(e.payload, events_pb2.RecoveryFinished), from_seq=head
    )
    assert list(finished.payload.missing_hosts) == []
    with contextlib.suppress(grpc.RpcError):  # (unless the policy already asked for it)
        cluster.migrations.SwitchToPostcopy(
            migration_pb2.SwitchToPostcopyRequest(migration_id="m-1")
        )
    assert cluster.watch("m-1").phase == common_pb2.MIGRATION_PHASE_COMPLETED


def test_a_source_hostd_restarted_during_precopy_still_releases_at_the_switch(
    cluster: Cluster, tmp_path: Path
) -> None:
    """kill -9 of the source's hostd while pre-copy runs: the restarted hostd arms again the
    lease release START_MIGRATION asked for, so the later switch releases the lease at once
    (no coordinator release command after its one-second grace, no 1 s pause)."""
    from tests.qemu.scenario import qmp_event, start_migration

    # Random RAM at 8 MiB/s: pre-copy is still on its first pass when hostd is back.
    cluster.define_and_start("vm-1", "host-a", ram_file=random_ram(tmp_path / "ram", 64))
    head = cluster.head()
    start_migration(cluster, common_pb2.MIGRATION_MODE_AUTO, max_bandwidth=8 << 20)
    cluster.wait_event(qmp_event("host-a", "MIGRATION_PASS"), from_seq=head)
    cluster.processes["host-a"].stop(signal.SIGKILL)
    cluster.start_hostd("host-a")
    cluster.wait_event(
        lambda e: (
            isinstance(e.payload, events_pb2.HostConnected)
            and e.payload.host_id == "host-a"
            and e.payload.generation == 2
        ),
        from_seq=head,
    )
    with contextlib.suppress(grpc.RpcError):  # (unless the policy already asked for it)
        cluster.migrations.SwitchToPostcopy(
            migration_pb2.SwitchToPostcopyRequest(migration_id="m-1")
        )
    final = cluster.watch("m-1")
    assert final.phase == common_pb2.MIGRATION_PHASE_COMPLETED, final.reason
    events = cluster.events()
    releases = [
        e
        for e in events
        if isinstance(e.payload, events_pb2.CommandIssued)
        and e.payload.kind == events_pb2.COMMAND_KIND_RELEASE_LEASE
    ]
    assert releases == []
    released = [e for e in events if isinstance(e.payload, events_pb2.LeaseReleased)]
    assert [(e.origin_host, e.origin_generation) for e in released][:1] == [("host-a", 2)]
    assert 0 < final.pause_us < 500_000
