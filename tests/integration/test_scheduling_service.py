"""Migration limits and the queue through the real coordinator: gRPC with roles, the SQLite log,
a restart on the same log, and the audit's verdict on what was written."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from coordinator.core import Phase
from tests.integration.conftest import SimHostd, serving, wait_until
from tools.audit.cli import main as audit_main
from tools.sim import SimHosts
from whimbrel.v1 import common_pb2, migration_pb2, migration_pb2_grpc, vm_pb2, vm_pb2_grpc

C = grpc.StatusCode
HOSTS = ("host-a", "host-b", "host-c")


def stub(running, user: str = "admin") -> migration_pb2_grpc.MigrationServiceStub:  # type: ignore[no-untyped-def]
    channel = running.channel if user == "admin" else running.channel_as("user", user)
    return migration_pb2_grpc.MigrationServiceStub(channel)


async def connect(running, sim_hosts: SimHosts, snapshots=None, generation=1) -> list[SimHostd]:  # type: ignore[no-untyped-def]
    """The three hosts' streams (`generation` 2: hostd restarted too, its seqs begin anew)."""
    snapshots = snapshots or {}
    hosts = [
        SimHostd(h, running.channel, sim_hosts, generation, vms=snapshots.get(h, [])) for h in HOSTS
    ]
    for host in hosts:
        await host.start()
    return hosts


async def migrate(running, vm: str, to: str, migration_id: str) -> migration_pb2.Migration:  # type: ignore[no-untyped-def]
    request = migration_pb2.StartMigrationRequest(vm=vm, destination=to, migration_id=migration_id)
    return await stub(running).StartMigration(request)


async def test_limits_queue_and_survive_a_restart(tmp_path: Path, pki_dir: Path) -> None:
    sim_hosts = SimHosts()
    async with serving(tmp_path, pki_dir) as running:
        hosts = await connect(running, sim_hosts)
        vms = vm_pb2_grpc.VmServiceStub(running.channel)
        for name in ("vm-1", "vm-2", "vm-3"):
            await vms.DefineVm(
                vm_pb2.DefineVmRequest(spec=common_pb2.VmSpec(name=name, memory_mib=128, vcpus=1))
            )
            await vms.StartVm(vm_pb2.StartVmRequest(name=name, host="host-a"))
            sim_hosts.leases[name] = ("host-a", 1)
        await wait_until(
            lambda: all(vm.status == 3 for vm in running.app.world.vms.values()),
            running.app,
            *hosts,
        )
        # Anyone may read the limits; only an admin may change them, and only sensibly.
        limits = await stub(running, "viewer").GetMigrationLimits(
            migration_pb2.GetMigrationLimitsRequest()
        )
        assert (limits.cluster, limits.per_host_outbound, limits.per_host_inbound) == (5, 2, 2)
        head = running.app.store.head()[0]
        one_out = common_pb2.MigrationLimits(cluster=5, per_host_outbound=1, per_host_inbound=2)
        for user, limits, code in (
            ("operator", one_out, C.PERMISSION_DENIED),
            ("admin", common_pb2.MigrationLimits(cluster=10_001), C.INVALID_ARGUMENT),
        ):
            request = migration_pb2.SetMigrationLimitsRequest(limits=limits)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub(running, user).SetMigrationLimits(request)
            assert refused.value.code() == code
        assert running.app.store.head()[0] == head  # a refusal appends nothing
        await stub(running).SetMigrationLimits(
            migration_pb2.SetMigrationLimitsRequest(limits=one_out, reason="maintenance window")
        )
        first = await migrate(running, "vm-1", "host-b", "m-1")
        second = await migrate(running, "vm-2", "host-c", "m-2")
        third = await migrate(running, "vm-3", "host-b", "m-3")
        assert first.phase != common_pb2.MIGRATION_PHASE_QUEUED
        assert (second.phase, second.queue_position) == (common_pb2.MIGRATION_PHASE_QUEUED, 1)
        assert second.waiting_for == "host-a: 1 outbound migration running (limit 1)"
        assert (third.phase, third.queue_position) == (common_pb2.MIGRATION_PHASE_QUEUED, 2)
        listed = await stub(running, "viewer").ListMigrations(
            migration_pb2.ListMigrationsRequest(open_only=True)
        )
        assert {m.migration_id: m.queue_position for m in listed.migrations} == {
            "m-1": 0,
            "m-2": 1,
            "m-3": 2,
        }
        for host in hosts:
            await host.stop()

    # A new coordinator on the same log: the limits and the queue are the log's, not memory's.
    # The hosts' hellos list their QEMUs: the three VMs on host-a, m-1's incoming one on host-b.
    def qemu(vm: str, runstate: str, status: str = "", role: str = "") -> common_pb2.VmObservation:
        return common_pb2.VmObservation(
            vm=vm, process_alive=True, pid=1000, runstate=runstate, qmp_reachable=True,
            migration_status=status, migration_role=role,
        )  # fmt: skip

    snapshots = {
        "host-a": [qemu("vm-1", "running", "active", "source"), qemu("vm-2", "running"),
                   qemu("vm-3", "running")],
        "host-b": [qemu("vm-1", "inmigrate", "active", "destination")],
    }  # fmt: skip
    async with serving(tmp_path, pki_dir) as running:
        hosts = await connect(running, sim_hosts, snapshots, generation=2)
        await running.app.recovered.wait()
        world = running.app.world
        assert world.migration_limits is not None and world.migration_limits.per_host_outbound == 1
        assert [world.migrations[m].phase for m in ("m-2", "m-3")] == [Phase.QUEUED] * 2
        # The running one ends (aborted): the next in the queue starts with no request.
        await stub(running).AbortMigration(migration_pb2.AbortMigrationRequest(migration_id="m-1"))
        await wait_until(
            lambda: running.app.world.migrations["m-2"].phase != Phase.QUEUED,
            running.app,
            *hosts,
        )
        third = await stub(running).GetMigration(
            migration_pb2.GetMigrationRequest(migration_id="m-3")
        )
        assert (third.phase, third.queue_position) == (common_pb2.MIGRATION_PHASE_QUEUED, 1)
        assert third.waiting_for == "host-a: 1 outbound migration running (limit 1)"
        for host in hosts:
            await host.stop()
    # The audit's independent checker finds no limit exceeded in what was written.
    assert audit_main(["verify", str(tmp_path / "whimbrel.db")]) == 0
