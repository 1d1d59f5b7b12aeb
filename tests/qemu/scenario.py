"""Shared checks for crash scenarios: the outcome a scenario must end in, and the safety
properties every scenario must leave behind."""

from __future__ import annotations

import signal
from collections.abc import Callable

from coordinator.core import Event
from coordinator.core.invariants import InvariantChecker
from hostd import qemu
from tools.audit.cli import main as audit
from tools.cluster import Cluster
from whimbrel.v1 import common_pb2, events_pb2, migration_pb2, vm_pb2

PHASE = common_pb2.MigrationPhase


def start_migration(
    cluster: Cluster,
    mode: int,
    recovery_attempt_timeout_ms: int = 0,
    max_recovery_attempts: int = 0,
    progress_timeout_s: int = 0,
    **parameters: int,
) -> None:
    """Migration m-1 of vm-1 to host-b, with these QEMU parameters (bandwidths, ...)."""
    policy = events_pb2.MigrationPolicy(
        parameters=events_pb2.MigrationParameters(**parameters),
        recovery_attempt_timeout_ms=recovery_attempt_timeout_ms,
        max_recovery_attempts=max_recovery_attempts,
        progress_timeout_s=progress_timeout_s,
    )
    cluster.migrations.StartMigration(migration_pb2.StartMigrationRequest(
        vm="vm-1", destination="host-b", mode=mode, policy=policy, migration_id="m-1"))  # fmt: skip


def qmp_event(host: str, name: str) -> Callable[[Event], bool]:
    def test(e: Event) -> bool:
        return (
            isinstance(e.payload, events_pb2.QmpEventReceived)
            and e.origin_host == host
            and e.payload.event == name
        )

    return test


def migration_status(host: str, status: str) -> Callable[[Event], bool]:
    """A QMP MIGRATION event of `status` from `host`."""

    def test(e: Event) -> bool:
        return qmp_event(host, "MIGRATION")(e) and f'"{status}"' in e.payload.data_json

    return test


def crash_and_restart(cluster: Cluster) -> None:
    """kill -9 of the coordinator, and a new one on the same log and address."""
    address = cluster.address
    cluster.processes["coordinator"].stop(signal.SIGKILL)
    cluster.start_coordinator(listen=address)


def wait_destination_running(cluster: Cluster, from_seq: int) -> None:
    """Until host-b's QEMU resumed: past the point of no return, post-copy pages still flow."""
    cluster.wait_event(qmp_event("host-b", "RESUME"), from_seq=from_seq)


def live_qemus(cluster: Cluster, vm: str = "vm-1") -> list[str]:
    """Hosts with a live QEMU for `vm` (a killed QEMU may linger as a zombie: not alive)."""
    return sorted(
        pidfile.parts[-4]
        for pidfile in cluster.root.glob(f"*/vms/{vm}/qemu.pid")
        if qemu.alive(int(pidfile.read_text()))
    )


def assert_outcome(cluster: Cluster, outcome: int, runs_on: str | None) -> migration_pb2.Migration:
    """The migration ended in `outcome`; the VM runs on exactly `runs_on` (holding the lease),
    or, when None, is recorded lost with no QEMU left anywhere; the log is settled and clean."""
    final = cluster.watch("m-1")
    assert final.phase == outcome, (PHASE.Name(final.phase), final.reason)
    vm = cluster.vms.GetVm(vm_pb2.GetVmRequest(name="vm-1"))
    if runs_on is None:
        assert vm.status == vm_pb2.VM_STATUS_LOST and vm.lost_reason
        assert live_qemus(cluster) == []
    else:
        assert (vm.host, vm.status, vm.lease_holder) == (
            runs_on, vm_pb2.VM_STATUS_RUNNING, runs_on)  # fmt: skip
        assert live_qemus(cluster) == [runs_on]
    events = cluster.events()
    assert InvariantChecker().check_quiescent(events) == []
    assert audit(["verify", str(cluster.db), "--final"]) == 0
    return final
