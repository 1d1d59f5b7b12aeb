"""kill -9 of the coordinator in the middle of real migrations: the restarted coordinator (new
epoch, same address) replays the log, takes the hosts' hellos, re-sends what was unanswered,
and drives each migration to its end."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.core.invariants import InvariantChecker
from hostd import qemu
from tests.qemu.conftest import Cluster
from tests.qemu.scenario import crash_and_restart
from tools.audit.cli import main as audit
from tools.guest import random_ram
from whimbrel.v1 import common_pb2, events_pb2, migration_pb2, vm_pb2

pytestmark = pytest.mark.qemu


def assert_runs_once_on(cluster: Cluster, host: str) -> None:
    vm = cluster.vms.GetVm(vm_pb2.GetVmRequest(name="vm-1"))
    assert (vm.host, vm.status, vm.lease_holder) == (host, vm_pb2.VM_STATUS_RUNNING, host)
    # A killed QEMU may linger as a zombie until PID 1 reaps it: that is not running.
    alive = [
        pidfile.parts[-4]
        for pidfile in cluster.root.glob("*/vms/vm-1/qemu.pid")
        if qemu.alive(int(pidfile.read_text()))
    ]
    assert alive == [host]
    events = cluster.events()
    assert InvariantChecker().check_quiescent(events) == []
    assert [
        e.payload.epoch for e in events if isinstance(e.payload, events_pb2.CoordinatorStarted)
    ] == [1, 2]
    assert audit(["verify", str(cluster.db), "--final"]) == 0


def test_coordinator_killed_during_precopy_transfer(cluster: Cluster) -> None:
    """Killed while pre-copy transfers: after the restart the migration completes."""
    cluster.define_and_start("vm-1", "host-a")
    head = cluster.head()
    policy = events_pb2.MigrationPolicy(parameters=events_pb2.MigrationParameters(
        max_bandwidth=100_000))  # fmt: skip
    cluster.migrations.StartMigration(migration_pb2.StartMigrationRequest(
        vm="vm-1", destination="host-b", mode=common_pb2.MIGRATION_MODE_PRECOPY, policy=policy,
        migration_id="m-1"))  # fmt: skip
    cluster.wait_event(
        lambda e: (
            isinstance(e.payload, events_pb2.QmpEventReceived)
            and e.payload.event == "MIGRATION_PASS"
        ),
        from_seq=head,
    )
    crash_and_restart(cluster)
    assert cluster.watch("m-1").phase == common_pb2.MIGRATION_PHASE_COMPLETED
    assert_runs_once_on(cluster, "host-b")


def test_coordinator_killed_after_destination_resumed_in_postcopy(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Killed past the point of no return while post-copy pages flow: driven forward."""
    ram = random_ram(tmp_path / "ram.bin", 64)
    cluster.define_and_start("vm-1", "host-a", ram_file=ram)
    head = cluster.head()
    policy = events_pb2.MigrationPolicy(parameters=events_pb2.MigrationParameters(
        max_bandwidth=100_000, max_postcopy_bandwidth=10 << 20))  # fmt: skip
    cluster.migrations.StartMigration(migration_pb2.StartMigrationRequest(
        vm="vm-1", destination="host-b", mode=common_pb2.MIGRATION_MODE_POSTCOPY, policy=policy,
        migration_id="m-1"))  # fmt: skip
    cluster.wait_event(
        lambda e: (
            isinstance(e.payload, events_pb2.QmpEventReceived)
            and e.origin_host == "host-b"
            and e.payload.event == "RESUME"
        ),
        from_seq=head,
    )
    crash_and_restart(cluster)
    final = cluster.watch("m-1")
    assert final.phase == common_pb2.MIGRATION_PHASE_COMPLETED and final.postcopy
    assert_runs_once_on(cluster, "host-b")


def test_coordinator_dies_after_cont_intent_committed_before_sending_it(cluster: Cluster) -> None:
    """The worst moment: the destination's cont is decided and durable, not yet sent. The
    restarted coordinator re-sends it from the log; the migration completes, the source never
    resumes."""
    cluster.define_and_start("vm-1", "host-a")
    address, before_restart = cluster.address, cluster.head()
    cluster.processes["coordinator"].stop()
    cluster.start_coordinator(listen=address, failpoints="coordinator.after-cont-intent")
    cluster.wait_hosts("host-a", "host-b", from_seq=before_restart + 1)
    policy = events_pb2.MigrationPolicy(parameters=events_pb2.MigrationParameters(
        max_bandwidth=100_000))  # fmt: skip
    cluster.migrations.StartMigration(migration_pb2.StartMigrationRequest(
        vm="vm-1", destination="host-b", mode=common_pb2.MIGRATION_MODE_POSTCOPY, policy=policy,
        migration_id="m-1"))  # fmt: skip
    assert cluster.processes["coordinator"].popen.wait(60) == 97  # died at the failpoint
    cont = [
        e
        for e in cluster.events()
        if isinstance(e.payload, events_pb2.CommandIssued)
        and e.payload.kind == events_pb2.COMMAND_KIND_RESUME_VM
    ]
    assert [e.payload.host_id for e in cont] == ["host-b"]  # durable before anything was sent
    cluster.processes["coordinator"].stop()
    cluster.start_coordinator(listen=address)
    final = cluster.watch("m-1")
    assert final.phase == common_pb2.MIGRATION_PHASE_COMPLETED and final.point_of_no_return_passed
    events = cluster.events()
    assert InvariantChecker().check_quiescent(events) == []
    assert audit(["verify", str(cluster.db), "--final"]) == 0
    vm = cluster.vms.GetVm(vm_pb2.GetVmRequest(name="vm-1"))
    assert (vm.host, vm.status) == ("host-b", vm_pb2.VM_STATUS_RUNNING)
