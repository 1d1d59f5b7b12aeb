"""Decisions on VMs outside migrations: define, start, stop, and reconciling stray copies and
lost VMs. A migration's decisions are in `lifecycle`."""

from __future__ import annotations

from google.protobuf.message import Message

from coordinator.core import inputs as I
from coordinator.core.errors import AlreadyExists, IllegalTransition
from coordinator.core.events import NewEvent
from coordinator.core.lookup import find_vm, is_connected, refuse_cordoned, require_connected
from coordinator.core.state import Kind, VmState, VmStatus, World, vm_command_id
from coordinator.core.validate import check_spec
from whimbrel.protocol import vm_stream
from whimbrel.v1 import common_pb2, events_pb2


def define_vm(world: World, req: I.DefineVm) -> list[NewEvent]:
    check_spec(req.spec)
    if req.spec.name in world.vms:
        raise AlreadyExists("VM", req.spec.name)
    spec = common_pb2.VmSpec()
    spec.CopyFrom(req.spec)
    spec.machine = spec.machine or "pc"
    defined = events_pb2.VmDefined(spec=spec, requested_by=req.principal)
    return [NewEvent(vm_stream(spec.name), defined, req.now_us)]


def _vm_command(
    vm: VmState,
    host: str,
    kind: int,
    args: events_pb2.CommandArgs,
    requested_by: str = "",
    *,
    nth: int = 1,
) -> Message:
    """The `nth` command for `vm` decided at once (ids count every command ever issued)."""
    command_id = vm_command_id(vm.name, vm.commands_issued + nth, Kind(kind))
    return events_pb2.CommandIssued(
        command_id=command_id,
        attempt=0,
        host_id=host,
        vm=vm.name,
        kind=events_pb2.CommandKind.ValueType(kind),
        args=args,
        requested_by=requested_by,
    )


def start_vm(world: World, req: I.StartVm) -> list[NewEvent]:
    vm = find_vm(world, req.name)
    require_connected(world, req.host)
    refuse_cordoned(world, req.host, f"start VM {vm.name} on")
    if vm.status not in (VmStatus.STOPPED, VmStatus.LOST):
        raise IllegalTransition(
            f"VM {vm.name}", "start", vm.status.name.lower(), ["stopped", "lost"]
        )
    if vm.runstates:
        # Invariant 1: a QEMU for this VM still exists; starting another would run it twice.
        raise IllegalTransition(
            f"VM {vm.name}", "start", f"present on {', '.join(sorted(vm.runstates))}", ["absent"]
        )
    if vm.lease_holder and vm.lease_holder != req.host:
        # hostd would fail to take the lease, later and in the background: say so now.
        raise IllegalTransition(
            f"VM {vm.name}",
            f"start on {req.host}",
            f"its lease held by {vm.lease_holder}",
            ["lease free", f"started on {vm.lease_holder}"],
        )
    args = events_pb2.CommandArgs(spec=vm.spec, lease_generation=vm.lease_generation + 1)
    issued = _vm_command(vm, req.host, Kind.START_VM, args, req.principal)
    return [NewEvent(vm_stream(vm.name), issued, req.now_us)]


def stop_vm(world: World, req: I.StopVm) -> list[NewEvent]:
    vm = find_vm(world, req.name)
    if vm.status not in (VmStatus.RUNNING, VmStatus.PAUSED):
        raise IllegalTransition(
            f"VM {vm.name}", "stop", vm.status.name.lower(), ["running", "paused"]
        )
    require_connected(world, vm.host)
    args = events_pb2.CommandArgs(force=req.force, lease_generation=vm.lease_generation)
    stop = events_pb2.VmStopRequested(vm=vm.name, force=req.force, requested_by=req.principal)
    issued = _vm_command(vm, vm.host, Kind.STOP_VM, args, req.principal)
    return [
        NewEvent(vm_stream(vm.name), stop, req.now_us),
        NewEvent(vm_stream(vm.name), issued, req.now_us),
    ]


def reconcile_vm(world: World, req: I.ReconcileVm) -> list[NewEvent]:
    """Outside migrations: destroy copies of the VM on hosts that are not its home (a source
    left behind by a host that missed recovery, a destination of a rolled-back or fenced
    migration), then apply the lost-VM policy."""
    vm = world.vms.get(req.name)
    if vm is None or vm.migration_id:
        return []
    in_flight = {(c.kind, c.host) for c in vm.commands.values()}
    out: list[Message] = []
    for host in sorted(vm.runstates):
        if host == vm.host or not is_connected(world, host):
            continue
        if (Kind.DESTROY_VM, host) not in in_flight:
            args = events_pb2.CommandArgs(force=True, reason="stray copy: not the VM's home host")
            out.append(_vm_command(vm, host, Kind.DESTROY_VM, args, nth=len(out) + 1))
    if out:
        return [NewEvent(vm_stream(vm.name), p, req.now_us) for p in out]
    if vm.resume_owed and not in_flight:
        return [NewEvent(vm_stream(vm.name), p, req.now_us) for p in _owed_resume(world, vm)]
    if (
        vm.status == VmStatus.LOST
        and vm.spec.on_lost == common_pb2.LOST_VM_ACTION_COLD_START
        and not vm.runstates
        and not in_flight
    ):
        host = _cold_start_host(world, vm)
        if host:
            args = events_pb2.CommandArgs(
                spec=vm.spec,
                lease_generation=vm.lease_generation + 1,
                reason=f"cold start after loss: {vm.lost_reason}",
            )
            issued = _vm_command(vm, host, Kind.START_VM, args)
            return [NewEvent(vm_stream(vm.name), issued, req.now_us)]
    return []


def _owed_resume(world: World, vm: VmState) -> list[Message]:
    """A VM a rollback left paused at home because its destination held the lease: once no
    other copy exists and the lease is free, home takes it under a new generation, then runs.
    Each step is tried once (a failure clears `resume_owed`; the VM stays paused)."""
    home = vm.host
    if vm.status != VmStatus.PAUSED or set(vm.runstates) != {home} or not is_connected(world, home):
        return []
    if not vm.lease_holder:
        args = events_pb2.CommandArgs(
            lease_generation=vm.lease_generation + 1,
            reason="rolled back while its destination held the lease, now free: run again",
        )
        return [_vm_command(vm, home, Kind.ACQUIRE_LEASE, args)]
    if vm.lease_holder == home:
        args = events_pb2.CommandArgs(
            lease_generation=vm.lease_holder_generation,
            reason="rolled back while its destination held the lease: run again",
        )
        return [_vm_command(vm, home, Kind.RESUME_VM, args)]
    return []  # another host holds it: nothing may run the VM here


def _cold_start_host(world: World, vm: VmState) -> str:
    """The lease holder (the last host allowed to run the VM), else the last migration's
    destination when nobody holds the lease; "" while that host is not connected."""
    host = vm.lease_holder
    if not host:
        last = max(
            (m for m in world.migrations.values() if m.vm == vm.name),
            key=lambda m: m.requested_at_us,
            default=None,
        )
        host = last.destination if last is not None else ""
    return host if host and is_connected(world, host) else ""
