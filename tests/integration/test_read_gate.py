"""The read gate over real gRPC: while a migration is in its switchover (here: the destination's
cont issued, its answer held back), reads and watches wait at the gate and are served, with the
state after it, once the destination runs; a switchover that does not end opens the gate after
its bound, once; watchers still get the terminal state."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc
import pytest

from coordinator.read_gate import ReadGate
from tests.integration.conftest import SPEC, Running, SimHostd, wait_until
from tools.sim import SimHosts, migration
from whimbrel.v1 import (
    common_pb2,
    events_pb2,
    host_pb2,
    migration_pb2,
    migration_pb2_grpc,
    vm_pb2,
    vm_pb2_grpc,
)

PHASE = common_pb2.MigrationPhase


@dataclass
class ContHeld(SimHostd):
    """A simulated host that answers every command but the destination's cont, until told."""

    held: list[host_pb2.Command] = field(default_factory=list)

    def execute(self, command: host_pb2.Command) -> None:
        if command.kind == events_pb2.COMMAND_KIND_RESUME_VM:
            self.held.append(command)
            return
        super().execute(command)

    def release(self) -> None:
        for command in self.held:
            super().execute(command)
        self.held.clear()


class HeldReaders:
    """Counts the reads that found the gate shut and waited at it."""

    def __init__(self, gate: ReadGate, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        self._arrived = asyncio.Condition()
        opened = gate.opened

        async def counted() -> None:
            if not gate.is_open:
                async with self._arrived:
                    self.count += 1
                    self._arrived.notify_all()
            await opened()

        monkeypatch.setattr(gate, "opened", counted)

    async def until(self, n: int) -> None:
        async with asyncio.timeout(10), self._arrived:
            await self._arrived.wait_for(lambda: self.count >= n)


async def _in_switchover(running: Running, sim_hosts: SimHosts) -> tuple[SimHostd, ContHeld]:
    """vm-1 migrating host-a -> host-b in post-copy, held with the destination's cont issued
    and unanswered: in its switchover until host-b is released."""
    source = SimHostd("host-a", running.channel, sim_hosts)
    destination = ContHeld("host-b", running.channel, sim_hosts)
    for host in (source, destination):
        await host.start()
    vms = vm_pb2_grpc.VmServiceStub(running.channel)
    await vms.DefineVm(vm_pb2.DefineVmRequest(spec=SPEC))
    await vms.StartVm(vm_pb2.StartVmRequest(name="vm-1", host="host-a"))
    await wait_until(lambda: running.app.world.vms["vm-1"].status == 3, running.app, source)
    migrations = migration_pb2_grpc.MigrationServiceStub(running.channel)
    await migrations.StartMigration(
        migration_pb2.StartMigrationRequest(
            vm="vm-1",
            destination="host-b",
            mode=common_pb2.MIGRATION_MODE_POSTCOPY,
            migration_id="m-1",
        )
    )
    await wait_until(lambda: bool(destination.held), running.app, destination)
    # The cont's intent is committed once it was sent: the gate has judged that world.
    assert running.app.world.migrations["m-1"].in_switchover
    return source, destination


def _transfer_completes(*hosts: SimHostd) -> None:
    """Both QEMUs report the post-copy transfer completed (the simulation leaves it to the
    test): the migration can finish."""
    for host in hosts:
        host.report(migration(host.host_id, "vm-1", "completed").payload)


async def _updates(call: grpc.aio.UnaryStreamCall) -> list[migration_pb2.Migration]:
    return [update async for update in call]


async def test_reads_wait_out_a_switchover_and_see_its_end(coordinator, sim_hosts, monkeypatch):
    """With the destination's cont issued and not yet answered, ListMigrations, GetMigration,
    ListVms and a new WatchMigration all wait at the gate; once the destination runs they are
    served with the state after the switchover, and the watcher goes on to the end."""
    gate = coordinator.app.read_gate
    gate.hold_s = 60.0  # only the switchover's end can open it within this test
    held = HeldReaders(gate, monkeypatch)
    source, destination = await _in_switchover(coordinator, sim_hosts)
    assert not gate.is_open
    migrations = migration_pb2_grpc.MigrationServiceStub(coordinator.channel)
    vms = vm_pb2_grpc.VmServiceStub(coordinator.channel)
    listed = asyncio.ensure_future(migrations.ListMigrations(migration_pb2.ListMigrationsRequest()))
    got = asyncio.ensure_future(
        migrations.GetMigration(migration_pb2.GetMigrationRequest(migration_id="m-1"))
    )
    vm_list = asyncio.ensure_future(vms.ListVms(vm_pb2.ListVmsRequest()))
    watched = asyncio.ensure_future(
        _updates(migrations.WatchMigration(migration_pb2.WatchMigrationRequest(migration_id="m-1")))
    )
    await held.until(4)
    assert not any(call.done() for call in (listed, got, vm_list, watched))

    destination.release()
    (m,) = (await asyncio.wait_for(listed, 5)).migrations
    assert m.migration_id == "m-1" and m.point_of_no_return_passed
    assert m.phase in (PHASE.MIGRATION_PHASE_FINISHING, PHASE.MIGRATION_PHASE_COMPLETED)
    assert m.pause_us > 0  # the destination's RESUME is in the state served
    assert (await asyncio.wait_for(got, 5)).pause_us > 0
    assert [vm.spec.name for vm in (await asyncio.wait_for(vm_list, 5)).vms] == ["vm-1"]
    _transfer_completes(source, destination)
    updates = await asyncio.wait_for(watched, 10)
    assert updates[0].pause_us > 0, "the watcher's first update came from inside the switchover"
    assert updates[-1].phase == PHASE.MIGRATION_PHASE_COMPLETED
    assert held.count == 4
    for host in (source, destination):
        await host.stop()


async def test_a_switchover_that_does_not_end_holds_reads_for_the_bound_once(
    coordinator, sim_hosts, monkeypatch
):
    """A switchover that does not end (the cont's answer never comes) holds a read for the
    gate's bound, not longer; then it is served with the state as it is, and the gate stays
    open for that switchover: the next read is not held. Watchers still get the end."""
    gate = coordinator.app.read_gate
    gate.hold_s = 0.3
    held = HeldReaders(gate, monkeypatch)
    source, destination = await _in_switchover(coordinator, sim_hosts)
    migrations = migration_pb2_grpc.MigrationServiceStub(coordinator.channel)
    watched = asyncio.ensure_future(
        _updates(migrations.WatchMigration(migration_pb2.WatchMigrationRequest(migration_id="m-1")))
    )
    loop = asyncio.get_running_loop()
    asked = loop.time()
    listed = await asyncio.wait_for(
        migrations.ListMigrations(migration_pb2.ListMigrationsRequest()), 5
    )
    waited = loop.time() - asked
    # The bound counts from the shutting (the cont's commit), a little before the read came.
    assert 0 < waited <= gate.hold_s + 1
    assert held.count >= 1
    (m,) = listed.migrations
    assert m.phase == PHASE.MIGRATION_PHASE_FINISHING and m.pause_us == 0
    assert gate.is_open and coordinator.app.world.migrations["m-1"].in_switchover

    count = held.count
    await asyncio.wait_for(migrations.ListMigrations(migration_pb2.ListMigrationsRequest()), 5)
    assert held.count == count, "a read was held again by a switchover past its bound"

    destination.release()
    _transfer_completes(source, destination)
    updates = await asyncio.wait_for(watched, 10)
    assert updates[-1].phase == PHASE.MIGRATION_PHASE_COMPLETED and updates[-1].pause_us > 0
    for host in (source, destination):
        await host.stop()


async def test_shared_list_answers_follow_each_change_and_filters(coordinator, sim_hosts):
    """ListMigrations' shared answers (all, open only) are rebuilt after each change, and a
    VM filter still selects: an open migration is listed by both, then only by `all` once it
    completed; another VM's filter lists none."""
    coordinator.app.read_gate.hold_s = 0.05  # the held cont must not slow the reads down
    source, destination = await _in_switchover(coordinator, sim_hosts)
    migrations = migration_pb2_grpc.MigrationServiceStub(coordinator.channel)

    async def listed(**request: object) -> list[tuple[str, int]]:
        answer = await migrations.ListMigrations(migration_pb2.ListMigrationsRequest(**request))
        return [(m.migration_id, m.phase) for m in answer.migrations]

    finishing = [("m-1", PHASE.MIGRATION_PHASE_FINISHING)]
    assert await listed() == finishing
    assert await listed(open_only=True) == finishing
    assert await listed(vm="vm-1") == finishing
    assert await listed(vm="vm-2") == []
    destination.release()
    _transfer_completes(source, destination)
    await wait_until(
        lambda: coordinator.app.world.migrations["m-1"].phase.terminal, coordinator.app
    )
    assert await listed() == [("m-1", PHASE.MIGRATION_PHASE_COMPLETED)]
    assert await listed(open_only=True) == []
    assert await listed(vm="vm-1", open_only=True) == []
    for host in (source, destination):
        await host.stop()
