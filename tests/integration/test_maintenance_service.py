"""Cordon and drain through the real coordinator's gRPC API: roles, status codes, the
capacity a host reports in its hello, and the plan a drain returns."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from tests.integration.conftest import Running, SimHostd, serving, wait_until
from tools.sim import SimHosts
from whimbrel.v1 import common_pb2, events_pb2, host_pb2, host_pb2_grpc, vm_pb2, vm_pb2_grpc

C = grpc.StatusCode
CAPACITY = common_pb2.HostCapacity(memory_mib=1024, vcpus=2)


async def _two_hosts(running: Running) -> list[SimHostd]:
    """host-a and host-b connected, each offering CAPACITY."""
    sim_hosts = SimHosts()
    hosts = [
        SimHostd(h, running.channel, sim_hosts, capacity=CAPACITY) for h in ("host-a", "host-b")
    ]
    for host in hosts:
        await host.start()
    return hosts


async def test_cordon_and_drain_over_grpc(tmp_path: Path, pki_dir: Path) -> None:
    async with serving(tmp_path, pki_dir) as running:
        hosts = await _two_hosts(running)
        vms = vm_pb2_grpc.VmServiceStub(running.channel)
        for name, memory in (("vm-1", 256), ("vm-2", 2048)):
            spec = common_pb2.VmSpec(name=name, memory_mib=memory, vcpus=1)
            await vms.DefineVm(vm_pb2.DefineVmRequest(spec=spec))
            await vms.StartVm(vm_pb2.StartVmRequest(name=name, host="host-a"))
        await wait_until(
            lambda: all(vm.status == 3 for vm in running.app.world.vms.values()),
            running.app,
            *hosts,
        )
        as_admin = host_pb2_grpc.HostServiceStub(running.channel)
        listed = {
            h.host_id: h for h in (await as_admin.ListHosts(host_pb2.ListHostsRequest())).hosts
        }
        assert listed["host-b"].capacity == CAPACITY
        assert listed["host-a"].free == common_pb2.HostCapacity(memory_mib=0, vcpus=0)

        head = running.app.store.head()[0]
        viewer = host_pb2_grpc.HostServiceStub(running.channel_as("user", "viewer"))
        for call, code in (
            (viewer.CordonHost(host_pb2.CordonHostRequest(host_id="host-b")), C.PERMISSION_DENIED),
            (as_admin.CordonHost(host_pb2.CordonHostRequest(host_id="host-z")), C.NOT_FOUND),
            (as_admin.DrainHost(host_pb2.DrainHostRequest(host_id="Bad!")), C.INVALID_ARGUMENT),
            (
                as_admin.DrainHost(host_pb2.DrainHostRequest(host_id="host-a", mode=99)),  # type: ignore[arg-type]
                C.INVALID_ARGUMENT,
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == code
        assert running.app.store.head()[0] == head  # refusals append nothing

        operator = host_pb2_grpc.HostServiceStub(running.channel_as("user", "operator"))
        plan = await operator.DrainHost(
            host_pb2.DrainHostRequest(host_id="host-a", reason="firmware")
        )
        assert plan.host.cordoned and plan.host.cordon_reason == "drain: firmware"
        (migration_id,) = plan.migration_ids
        assert running.app.world.migrations[migration_id].vm == "vm-1"
        assert [(n.vm, n.reason) for n in plan.not_moved] == [
            ("vm-2", "no host has 2048 MiB and 1 vCPU free (most: host-b with 768 MiB, 1 vCPU)")
        ]
        again = operator.DrainHost(host_pb2.DrainHostRequest(host_id="host-a"))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await again
        assert refused.value.code() == C.FAILED_PRECONDITION
        uncordoned = await operator.UncordonHost(host_pb2.UncordonHostRequest(host_id="host-a"))
        assert not uncordoned.cordoned
        for host in hosts:
            await host.stop()


async def test_a_capacity_change_reaches_placement_and_a_zero_capacity_is_refused(
    tmp_path: Path, pki_dir: Path
) -> None:
    """A host reports more memory while connected: ListHosts shows it and a drain places on it
    the VM that did not fit before. A host offering nothing is refused and nothing is logged."""
    async with serving(tmp_path, pki_dir) as running:
        hosts = await _two_hosts(running)
        vms = vm_pb2_grpc.VmServiceStub(running.channel)
        spec = common_pb2.VmSpec(name="vm-2", memory_mib=2048, vcpus=1)
        await vms.DefineVm(vm_pb2.DefineVmRequest(spec=spec))
        await vms.StartVm(vm_pb2.StartVmRequest(name="vm-2", host="host-a"))
        await wait_until(lambda: running.app.world.vms["vm-2"].status == 3, running.app, *hosts)

        grown = common_pb2.HostCapacity(memory_mib=4096, vcpus=4)
        hosts[1].report(events_pb2.HostCapacityChanged(capacity=grown))
        await wait_until(lambda: running.app.world.hosts["host-b"].memory_mib == 4096, *hosts)
        as_admin = host_pb2_grpc.HostServiceStub(running.channel)
        listed = {
            h.host_id: h for h in (await as_admin.ListHosts(host_pb2.ListHostsRequest())).hosts
        }
        assert listed["host-b"].capacity == grown
        async with running.app.reading():
            (changed,) = [
                e
                for e in running.app.store.read()
                if e.type == "HostCapacityChanged"  # the host's own stream, with its origin
            ]
        assert (changed.stream, changed.origin_host) == ("host/host-b", "host-b")
        plan = await as_admin.DrainHost(host_pb2.DrainHostRequest(host_id="host-a"))
        (migration_id,) = plan.migration_ids
        assert running.app.world.migrations[migration_id].destination == "host-b"

        head = running.app.store.head()[0]
        nothing = common_pb2.HostCapacity(memory_mib=0, vcpus=4)
        hosts[1].report(events_pb2.HostCapacityChanged(capacity=nothing))
        await wait_until(lambda: hosts[1].error is not None, running.app, hosts[1])
        assert hosts[1].error is not None
        assert hosts[1].error.code() == C.PERMISSION_DENIED
        assert "a host offers at least 1 of each" in str(hosts[1].error.details())
        assert running.app.world.hosts["host-b"].memory_mib == 4096
        async with running.app.reading():
            after = [e.type for e in running.app.store.read(from_seq=head + 1)]
        assert "HostCapacityChanged" not in after
        for host in hosts:
            await host.stop()
