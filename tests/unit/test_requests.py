"""Operator requests: each refusal raises the right typed error and decides nothing."""

from __future__ import annotations

import ast
import pathlib

import pytest

from coordinator.core import (
    AlreadyExists,
    HostUnavailable,
    IllegalTransition,
    InvalidRequest,
    NotFound,
    decide,
)
from coordinator.core import inputs as I
from coordinator.core.state import VmStatus
from tests.unit.helpers import answer, decisions, fresh
from tools.sim import Observation
from whimbrel.v1 import common_pb2 as C
from whimbrel.v1 import events_pb2 as E

NOW = 1


def migrate(vm="vm-1", dest="host-b", mid="m-1", mode=1):
    return I.StartMigration(mid, vm, dest, mode, E.MigrationPolicy(), NOW)


@pytest.mark.parametrize(
    ("request_", "error", "text"),
    [
        (migrate(vm="nope"), NotFound, "VM 'nope' not found"),
        (migrate(dest="host-z"), NotFound, "host 'host-z' not found"),
        (migrate(dest="host-a"), InvalidRequest, "source and destination are the same"),
        (migrate(mid="bad id!"), InvalidRequest, "migration id"),
        (migrate(vm="Bad_Name"), InvalidRequest, "VM name"),
        (migrate(mode=7), InvalidRequest, "mode"),
        (I.AbortMigration("m-9", "", NOW), NotFound, "migration 'm-9' not found"),
        (I.AbortMigration("m-9", "x" * 513, NOW), InvalidRequest, "reason is 513 characters"),
        (I.AbortMigration("m-9", "ok\nm-2 completed", NOW), InvalidRequest, "control char"),
        (
            I.StartMigration("m-1", "vm-1", "host-b", 1, E.MigrationPolicy(name="fast"), NOW),
            InvalidRequest,
            "policy.name 'fast' is not for requests",
        ),
        (
            I.StartMigration(
                "m-1",
                "vm-1",
                "host-b",
                1,
                E.MigrationPolicy(
                    max_downtime_ms=1,
                    parameters=E.MigrationParameters(downtime_limit_ms=2000),
                ),
                NOW,
            ),
            InvalidRequest,
            "at most max_downtime_ms",
        ),
        (
            I.StartMigration(
                "m-1", "vm-1", "host-b", 1, E.MigrationPolicy(max_recovery_attempts=2**32 - 1), NOW
            ),
            InvalidRequest,
            "max_recovery_attempts at most 100",
        ),
        (I.StartVm("vm-1", "host-b", NOW), IllegalTransition, "running"),
        (I.StopVm("nope", False, NOW), NotFound, "VM"),
    ],
)
def test_bad_requests_raise_typed_errors_and_decide_nothing(request_, error, text):
    """Malformed or impossible requests raise, with the offending value in the message."""
    driver, _ = fresh()
    before = driver.world.copy()
    with pytest.raises(error, match=text):
        decide(driver.world, request_)
    assert driver.world == before


def test_migrating_vm_cannot_migrate_again_or_stop():
    """A VM with an open migration refuses a second one and a stop."""
    driver, _ = fresh()
    driver.request(migrate())
    with pytest.raises(IllegalTransition, match=r"migrating \(m-1\)"):
        decide(driver.world, migrate(mid="m-2"))
    with pytest.raises(IllegalTransition, match="migrating"):
        decide(driver.world, I.StopVm("vm-1", False, NOW))
    with pytest.raises(AlreadyExists):
        decide(driver.world, migrate())


@pytest.mark.parametrize("holder", ["", "host-b"])
def test_a_vm_whose_host_does_not_hold_its_lease_cannot_migrate(holder):
    """A migration hands over the lease its source holds: a VM paused at home without it (a
    rollback that could not take it back from its destination) is refused, naming the holder,
    until home holds it again."""
    driver, _ = fresh()
    driver.observe(Observation("host-a", E.LeaseReleased(vm="vm-1", holder="host-a", generation=1)))
    if holder:
        driver.observe(Observation(holder, E.LeaseAcquired(vm="vm-1", holder=holder, generation=2)))
    before = driver.world.copy()
    with pytest.raises(IllegalTransition, match=f"its lease held by {holder or 'no host'}"):
        decide(driver.world, migrate())
    assert driver.world == before


def test_disconnected_destination_is_unavailable():
    """A destination without an open stream makes StartMigration fail as unavailable."""
    driver, _ = fresh()
    driver.observe(Observation("host-b", E.HostDisconnected(host_id="host-b", generation=1)))
    with pytest.raises(HostUnavailable, match="host-b"):
        decide(driver.world, migrate())


def test_stale_disconnect_does_not_mark_newer_stream_down():
    """HostDisconnected of an older generation leaves the newer stream connected."""
    driver, _ = fresh()
    driver.observe(Observation("host-b", E.HostConnected(host_id="host-b", generation=2)))
    driver.observe(Observation("host-b", E.HostDisconnected(host_id="host-b", generation=1)))
    assert driver.world.hosts["host-b"].connected


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        (C.VmSpec(name="vm-2", memory_mib=1, vcpus=1), "memory_mib"),
        (C.VmSpec(name="vm-2", memory_mib=128, vcpus=0), "vcpus"),
        (C.VmSpec(name="vm-2", memory_mib=128, vcpus=1, machine="isapc"), "machine"),
        (
            C.VmSpec(
                name="vm-2", memory_mib=128, vcpus=1, disks=[C.Disk(path="rel.img", format="raw")]
            ),
            "absolute",
        ),
        (C.VmSpec(name="vm-2", memory_mib=128, vcpus=1, nics=[C.Nic(mac="zz")]), "MAC"),
        # A multicast address (the first octet odd) or all zeros is no NIC's own: QEMU takes
        # it, and the guest's network breaks.
        (
            C.VmSpec(name="vm-2", memory_mib=128, vcpus=1, nics=[C.Nic(mac="01:00:5e:00:00:01")]),
            "not a unicast MAC",
        ),
        (
            C.VmSpec(name="vm-2", memory_mib=128, vcpus=1, nics=[C.Nic(mac="00:00:00:00:00:00")]),
            "not a unicast MAC",
        ),
        (C.VmSpec(name="vm-2", memory_mib=128, vcpus=1, kernel="vmlinuz"), "kernel path"),
        (
            C.VmSpec(name="vm-2", memory_mib=128, vcpus=1, kernel="/k", initrd="initrd"),
            "initrd path",
        ),
        (C.VmSpec(name="vm-2", memory_mib=128, vcpus=1, initrd="/i"), "need a kernel"),
        (C.VmSpec(name="vm-2", memory_mib=128, vcpus=1, kernel="/k", append="a\nb"), "append"),
        (C.VmSpec(name="vm-1", memory_mib=128, vcpus=1), "already exists"),
        # Paths reach QEMU's command line, logs and terminals: printable, bounded.
        (
            C.VmSpec(name="vm-2", memory_mib=128, vcpus=1, disks=[C.Disk(path="/a\n\x1b[31m")]),
            "control characters",
        ),
        (C.VmSpec(name="vm-2", memory_mib=128, vcpus=1, kernel="/k\x00"), "control characters"),
        (
            C.VmSpec(name="vm-2", memory_mib=128, vcpus=1, disks=[C.Disk(path="/" + "d" * 4096)]),
            "longer than 4096",
        ),
        (
            C.VmSpec(
                name="vm-2",
                memory_mib=128,
                vcpus=1,
                disks=[C.Disk(path=f"/d{i}", format="raw") for i in range(33)],
            ),
            "at most 32",
        ),
        (C.VmSpec(name="vm-2", memory_mib=128, vcpus=1, on_lost=99), "on_lost 99"),
        (
            C.VmSpec(
                name="vm-2", memory_mib=128, vcpus=1, memory_backing=C.MemoryBacking(path="/m")
            ),
            "needs kind file",
        ),
    ],
)
def test_define_vm_validates_spec(spec, text):
    """DefineVm rejects a bad or duplicate spec."""
    driver, _ = fresh()
    with pytest.raises((InvalidRequest, AlreadyExists), match=text):
        decide(driver.world, I.DefineVm(spec, NOW))


def test_stop_vm_then_start_elsewhere_with_higher_lease_generation():
    """Stop releases the VM; a new start gets a lease generation above every earlier one."""
    driver, hosts = fresh()
    events = driver.request(I.StopVm("vm-1", False, NOW))
    assert decisions(events) == ["VmStopRequested", "stop-vm@host-a"]
    answer(driver, hosts, events)
    assert driver.world.vms["vm-1"].status == VmStatus.STOPPED
    (start,) = driver.request(I.StartVm("vm-1", "host-b", NOW))
    assert start.payload.args.lease_generation == 2


def test_core_imports_nothing_with_io():
    """The pure core imports no asyncio, grpc, sqlite, QEMU, OpenTelemetry, sockets or clocks."""
    forbidden = {
        "asyncio",
        "grpc",
        "sqlite3",
        "sqlite_utils",
        "qemu",
        "opentelemetry",
        "socket",
        "subprocess",
        "os",
        "time",
        "datetime",
        "threading",
        "random",
        "logging",
    }
    core = pathlib.Path(__file__).parents[2] / "coordinator" / "core"
    found = []
    for path in core.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in forbidden]
    assert found == []


def test_a_policy_capping_the_downtime_lowers_the_default_limit_to_its_cap():
    """max_downtime_ms below the built-in default downtime limit: the migration starts at the
    cap rather than being refused for a limit the operator never set."""
    driver, _ = fresh()
    policy = E.MigrationPolicy(max_downtime_ms=50)
    decided = decide(driver.world, I.StartMigration("m-1", "vm-1", "host-b", 1, policy, NOW))
    requested = next(e.payload for e in decided if type(e.payload).__name__ == "MigrationRequested")
    assert requested.policy.parameters.downtime_limit_ms == 50
