"""Cordons and drains (coordinator.core.maintenance): placement by free capacity, the plan
recorded in one decision, and what a cordoned host refuses."""

from __future__ import annotations

import pytest

from coordinator.core import IllegalTransition, NotFound, Phase
from coordinator.core import inputs as I
from coordinator.core.invariants import InvariantChecker
from coordinator.core.maintenance import free
from tools.sim import Driver, Observation, SimHosts
from whimbrel.v1 import common_pb2 as C
from whimbrel.v1 import events_pb2 as E


def connect(driver: Driver, host: str, memory_mib: int, vcpus: int = 8) -> None:
    capacity = C.HostCapacity(memory_mib=memory_mib, vcpus=vcpus)
    driver.observe(
        Observation(
            host,
            E.HostConnected(
                host_id=host, generation=1, migration_address="127.0.0.1", capacity=capacity
            ),
        )
    )


def cluster(capacities: dict[str, int], vms: dict[str, tuple[str, int]]) -> Driver:
    """Hosts with their memory (MiB), and VMs (name -> (host, memory MiB)) running on them."""
    driver = Driver()
    for host, memory in capacities.items():
        connect(driver, host, memory)
    for name, (host, memory) in vms.items():
        spec = C.VmSpec(name=name, memory_mib=memory, vcpus=1)
        driver.request(I.DefineVm(spec, driver.now_us))
        (start,) = driver.request(I.StartVm(name, host, driver.now_us))
        driver.observe(*SimHosts().answer(start.payload))
    return driver


def drain(driver: Driver, host: str, reason: str = "kernel upgrade") -> E.HostDrainStarted:
    decided = driver.request(I.DrainHost(host, C.MIGRATION_MODE_PRECOPY, reason, driver.now_us))
    (plan,) = [e.payload for e in decided if isinstance(e.payload, E.HostDrainStarted)]
    return plan


def destinations(driver: Driver, plan: E.HostDrainStarted) -> dict[str, str]:
    return {
        driver.world.migrations[m].vm: driver.world.migrations[m].destination
        for m in plan.migration_ids
    }


def test_free_capacity_counts_vms_and_incoming_migrations():
    driver = cluster({"host-a": 4096, "host-b": 4096}, {"vm-1": ("host-a", 1024)})
    assert free(driver.world, "host-a").memory_mib == 3072
    driver.request(
        I.StartMigration(
            "m-1", "vm-1", "host-b", C.MIGRATION_MODE_PRECOPY, E.MigrationPolicy(), driver.now_us
        )
    )
    # Until it is done, the migrating VM takes room on both ends.
    assert free(driver.world, "host-a").memory_mib == 3072
    assert free(driver.world, "host-b").memory_mib == 3072
    assert free(driver.world, "host-b").vcpus == 7


def test_a_drain_spreads_vms_by_free_memory_and_names_what_cannot_move():
    """Largest free memory first, the plan's own placements counted: vm-1 (2 GiB) and vm-2
    (1 GiB) go where most room is left at each step; vm-3 (8 GiB) fits nowhere."""
    driver = cluster(
        {"host-a": 16384, "host-b": 4096, "host-c": 3072},
        {"vm-1": ("host-a", 2048), "vm-2": ("host-a", 1024), "vm-3": ("host-a", 8192)},
    )
    # Never a destination: a host reporting no capacity, a cordoned one (however roomy).
    connect(driver, "host-d", 0)
    connect(driver, "host-e", 65536)
    driver.request(I.CordonHost("host-e", True, "", driver.now_us))
    head = len(driver.log)
    plan = drain(driver, "host-a")
    types = [e.type for e in driver.log[head:]]
    assert types == ["HostCordoned", "HostDrainStarted", "MigrationRequested", "MigrationRequested"]
    assert destinations(driver, plan) == {"vm-1": "host-b", "vm-2": "host-c"}
    (not_moved,) = plan.not_moved
    assert not_moved.vm == "vm-3"
    assert not_moved.reason == (
        "no host has 8192 MiB and 1 vCPU free (most: host-c with 2048 MiB, 7 vCPUs)"
    )
    host = driver.world.hosts["host-a"]
    assert host.cordoned and host.cordon_reason == "drain: kernel upgrade"


def test_a_drain_while_the_last_is_open_is_refused_and_records_nothing():
    driver = cluster({"host-a": 4096, "host-b": 4096}, {"vm-1": ("host-a", 1024)})
    drain(driver, "host-a")
    head = len(driver.log)
    with pytest.raises(IllegalTransition, match="cannot drain host host-a: it is draining"):
        drain(driver, "host-a")
    with pytest.raises(NotFound):
        drain(driver, "host-z")
    assert len(driver.log) == head


def test_a_cordoned_host_takes_no_new_vm_until_uncordoned():
    driver = cluster({"host-a": 4096, "host-b": 4096}, {"vm-1": ("host-a", 1024)})
    driver.request(I.CordonHost("host-b", True, "disk swap", driver.now_us))
    assert driver.request(I.CordonHost("host-b", True, "again", driver.now_us)) == []
    with pytest.raises(IllegalTransition, match=r"host host-b: it is cordoned \(disk swap\)"):
        driver.request(
            I.StartMigration(
                "m-1", "vm-1", "host-b", C.MIGRATION_MODE_PRECOPY, E.MigrationPolicy(), 0
            )
        )
    spec = C.VmSpec(name="vm-2", memory_mib=128, vcpus=1)
    driver.request(I.DefineVm(spec, driver.now_us))
    with pytest.raises(IllegalTransition, match="cannot start VM vm-2 on host host-b"):
        driver.request(I.StartVm("vm-2", "host-b", driver.now_us))
    driver.request(I.CordonHost("host-b", False, "done", driver.now_us))
    assert driver.request(I.StartVm("vm-2", "host-b", driver.now_us))


def test_a_drained_host_ends_empty_under_the_migration_limits():
    """Five VMs drained with one outbound migration at a time: they queue, each starts when
    the one before ends, all reach host-b or host-c, and the checker sees no limit broken."""
    vms = {f"vm-{i}": ("host-a", 512) for i in range(5)}
    driver = cluster({"host-a": 8192, "host-b": 8192, "host-c": 8192}, vms)
    hosts = SimHosts()
    for name in vms:
        hosts.leases[name] = ("host-a", 1)
    limits = C.MigrationLimits(cluster=5, per_host_outbound=1, per_host_inbound=2)
    driver.request(I.SetMigrationLimits(limits, "", driver.now_us))
    plan = drain(driver, "host-a")
    assert len(plan.migration_ids) == 5 and not plan.not_moved
    for migration_id in plan.migration_ids:
        m = driver.world.migrations[migration_id]
        driver.advance(migration_id)
        assert m.phase == Phase.PREPARING  # the one before it has ended: its turn
        driver.run(migration_id, hosts)
        assert m.phase == Phase.COMPLETED
    assert {vm.host for vm in driver.world.vms.values()} == {"host-b", "host-c"}
    assert InvariantChecker().check_quiescent(driver.log) == []
