"""Host maintenance: cordoning a host out of placement, and draining it (every VM migrated off,
each to the host with the most free memory that fits it).

A drain is one decision, recorded at once: the host cordoned, the plan (HostDrainStarted: the
migrations, and the VMs that cannot move with why), and each migration's request. The
migrations then wait in the queue under the migration limits like any other (`scheduling`).
"""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.core import inputs as I
from coordinator.core import lifecycle
from coordinator.core.errors import CoreError, IllegalTransition
from coordinator.core.events import NewEvent
from coordinator.core.lookup import find_host
from coordinator.core.scheduling import counted
from coordinator.core.state import HostState, VmState, VmStatus, World
from coordinator.core.validate import check_reason
from whimbrel.protocol import host_stream
from whimbrel.v1 import events_pb2

# A VM in these states has (or is about to have) a QEMU on its host, using its memory and CPUs.
_PRESENT = frozenset(
    {VmStatus.STARTING, VmStatus.RUNNING, VmStatus.PAUSED, VmStatus.MIGRATING, VmStatus.STOPPING}
)


@dataclass(frozen=True)
class Free:
    memory_mib: int
    vcpus: int

    def fits(self, vm: VmState) -> bool:
        return self.memory_mib >= vm.spec.memory_mib and self.vcpus >= vm.spec.vcpus

    def minus(self, vm: VmState) -> Free:
        return Free(self.memory_mib - vm.spec.memory_mib, self.vcpus - vm.spec.vcpus)


def free(world: World, host_id: str) -> Free:
    """What is left of a host: its capacity minus its VMs and the migrations coming in (a
    migrating VM counts on both ends until it is done)."""
    host = world.hosts[host_id]
    left = Free(host.memory_mib, host.vcpus)
    for vm in world.vms.values():
        if vm.host == host_id and vm.status in _PRESENT:
            left = left.minus(vm)
    for migration_id in world.open_migrations:
        m = world.migrations[migration_id]
        if m.destination == host_id:
            left = left.minus(world.vms[m.vm])
    return left


def placeable(host: HostState) -> bool:
    """A host new VMs may go to: connected, not cordoned, its capacity reported."""
    return host.connected and not host.cordoned and host.memory_mib > 0


def place(world: World, vm: VmState, left: dict[str, Free]) -> tuple[str, str]:
    """(host, "") for the placeable host other than the VM's with the most free memory that
    fits it (ties: by id), or ("", why not). `left`: free capacity, as the plan so far leaves
    it (updated by the caller)."""
    candidates = sorted(h for h, host in world.hosts.items() if h != vm.host and placeable(host))
    if not candidates:
        return "", "no other host is connected, uncordoned and reporting its capacity"
    fitting = [h for h in candidates if left[h].fits(vm)]
    if not fitting:
        roomiest = max(candidates, key=lambda h: (left[h].memory_mib, h))
        most = left[roomiest]
        return "", (
            f"no host has {vm.spec.memory_mib} MiB and {counted(vm.spec.vcpus, 'vCPU')} free "
            f"(most: {roomiest} with {most.memory_mib} MiB, {counted(most.vcpus, 'vCPU')})"
        )
    return min(fitting, key=lambda h: (-left[h].memory_mib, h)), ""


def cordon(world: World, req: I.CordonHost) -> list[NewEvent]:
    """Take a host out of placement, or put it back; nothing is recorded when nothing changes."""
    check_reason(req.reason)
    host = find_host(world, req.host)
    if host.cordoned == req.cordoned:
        return []
    changed = events_pb2.HostCordoned(
        host_id=host.host_id, cordoned=req.cordoned, reason=req.reason,
        requested_by=req.principal,
    )  # fmt: skip
    return [NewEvent(host_stream(host.host_id), changed, req.now_us)]


def drain(world: World, req: I.DrainHost) -> list[NewEvent]:
    check_reason(req.reason)
    host = find_host(world, req.host)
    still_open = [m for m in host.drain_migrations if m in world.open_migrations]
    if still_open:
        raise IllegalTransition(
            f"host {host.host_id}", "drain", f"draining ({', '.join(still_open)} open)",
            ["no drain open"],
        )  # fmt: skip
    left = {h: free(world, h) for h, state in world.hosts.items() if placeable(state)}
    plan = events_pb2.HostDrainStarted(
        host_id=host.host_id, reason=req.reason, requested_by=req.principal
    )
    requests: list[NewEvent] = []
    next_seq = world.last_seq + 1
    for vm in sorted(world.vms.values(), key=lambda v: v.name):
        if vm.host != host.host_id or vm.status not in _PRESENT:
            continue
        why = _why_not_movable(vm)
        destination = ""
        if not why:
            destination, why = place(world, vm, left)
        if not why:
            migration_id = f"drain-{next_seq}-{len(requests) + 1}"
            try:
                requests += lifecycle.start_migration(
                    world,
                    I.StartMigration(
                        migration_id, vm.name, destination, req.mode,
                        events_pb2.MigrationPolicy(), req.now_us, req.principal,
                    ),
                )  # fmt: skip
            except CoreError as err:
                why = str(err)
        if why:
            plan.not_moved.add(vm=vm.name, reason=why)
            continue
        plan.migration_ids.append(migration_id)
        left[destination] = left[destination].minus(vm)
    stream = host_stream(host.host_id)
    out = []
    if not host.cordoned:
        cordoned = events_pb2.HostCordoned(
            host_id=host.host_id, cordoned=True,
            reason=f"drain: {req.reason}" if req.reason else "drain",
            requested_by=req.principal,
        )  # fmt: skip
        out.append(NewEvent(stream, cordoned, req.now_us))
    return [*out, NewEvent(stream, plan, req.now_us), *requests]


def _why_not_movable(vm: VmState) -> str:
    if vm.migration_id:
        return f"already migrating ({vm.migration_id})"
    if vm.status not in (VmStatus.RUNNING, VmStatus.PAUSED):
        return f"{vm.status.name.lower()}: only a running or paused VM can migrate"
    return ""
