"""evolve(world, event) -> world: fold one stored event into the derived state.

Each event type has one handler. Handlers trust the log (it holds only what was decided or
observed); they never raise on odd observations, because hosts report what they see, including
the unexpected, and `decide` judges it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from coordinator.core.events import Event
from coordinator.core.state import (
    Command,
    CommandState,
    HostState,
    Kind,
    MigrationState,
    Phase,
    Side,
    VmState,
    VmStatus,
    World,
)
from whimbrel.v1 import events_pb2

Handler = Callable[[World, Event, Any], None]
_HANDLERS: dict[str, Handler] = {}

# QEMU migration statuses meaning the source's CPUs were stopped for the switch.
POSTCOPY_STATUSES = frozenset({"postcopy-active", "postcopy-paused", "postcopy-recover"})


def evolve(world: World, event: Event) -> World:
    """Fold `event` into `world` and return it (the world passed in is updated)."""
    handler = _HANDLERS.get(event.type)
    if handler is not None:
        handler(world, event, event.payload)
    world.last_seq = event.seq
    return world


def _on(type_: type[Any]) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        _HANDLERS[type_.DESCRIPTOR.name] = fn
        return fn

    return register


def _open_migration(world: World, vm_name: str) -> MigrationState | None:
    vm = world.vms.get(vm_name)
    if vm is None or not vm.migration_id:
        return None
    return world.migrations.get(vm.migration_id)


# --- lifecycle and hosts ----------------------------------------------------------------------


@_on(events_pb2.CoordinatorStarted)
def _coordinator_started(world: World, ev: Event, p: events_pb2.CoordinatorStarted) -> None:
    world.epoch = p.epoch


@_on(events_pb2.HostConnected)
def _host_connected(world: World, ev: Event, p: events_pb2.HostConnected) -> None:
    host = world.hosts.get(p.host_id)
    if host is None:
        host = world.hosts[p.host_id] = HostState(p.host_id)
    host.generation = p.generation
    host.connected = True
    host.migration_address = p.migration_address
    host.highest_epoch_seen = max(host.highest_epoch_seen, p.highest_epoch_seen)
    host.changed_at_us = ev.time_us


@_on(events_pb2.HostDisconnected)
def _host_disconnected(world: World, ev: Event, p: events_pb2.HostDisconnected) -> None:
    host = world.hosts.get(p.host_id)
    # A stale stream ending says nothing about the newer one.
    if host is not None and host.generation == p.generation:
        host.connected = False
        host.changed_at_us = ev.time_us


# --- VMs --------------------------------------------------------------------------------------


@_on(events_pb2.VmDefined)
def _vm_defined(world: World, ev: Event, p: events_pb2.VmDefined) -> None:
    vm = world.vms.get(p.spec.name)
    if vm is None:
        world.vms[p.spec.name] = VmState(spec=p.spec)
    else:
        vm.spec = p.spec


@_on(events_pb2.VmStopRequested)
def _vm_stop_requested(world: World, ev: Event, p: events_pb2.VmStopRequested) -> None:
    vm = world.vms.get(p.vm)
    if vm is not None:
        vm.status = VmStatus.STOPPING


@_on(events_pb2.VmLost)
def _vm_lost(world: World, ev: Event, p: events_pb2.VmLost) -> None:
    vm = world.vms.get(p.vm)
    if vm is not None:
        vm.status = VmStatus.LOST
        vm.lost_reason = p.reason
        vm.host = ""


def _settle_vm_status(vm: VmState) -> None:
    """Outside migrations, a VM's status follows what its home host reports."""
    if vm.migration_id or vm.status in (VmStatus.LOST, VmStatus.STOPPING, VmStatus.STARTING):
        return
    runstate = vm.runstates.get(vm.host) if vm.host else None
    if runstate is None:
        if vm.status in (VmStatus.RUNNING, VmStatus.PAUSED):
            vm.status = VmStatus.STOPPED
            vm.host = ""
    elif runstate == "running":
        vm.status = VmStatus.RUNNING
    else:
        vm.status = VmStatus.PAUSED


@_on(events_pb2.VmObserved)
def _vm_observed(world: World, ev: Event, p: events_pb2.VmObserved) -> None:
    obs = p.observation
    vm = world.vms.get(obs.vm)
    if vm is None:
        return
    host = ev.origin_host
    if obs.process_alive:
        vm.runstates[host] = obs.runstate
    else:
        vm.runstates.pop(host, None)
    m = _open_migration(world, obs.vm)
    side = m.side(host) if m is not None else None
    if m is not None and side is not None:
        side.alive = obs.process_alive
        if obs.process_alive and obs.qmp_reachable:
            side.runstate = obs.runstate
            _set_migration_status(m, side, obs.migration_status)
    _settle_vm_status(vm)


def _set_migration_status(m: MigrationState, side: Side, status: str) -> None:
    # QEMU quirk (7.2): migrate-recover emits "MIGRATION setup" on the destination while
    # query-migrate still says postcopy-paused; the paused state is the truth until resumed.
    if status == "setup" and side.status == "postcopy-paused":
        return
    side.status = status
    if status in POSTCOPY_STATUSES:
        m.postcopy_started = True
    if (
        m.phase == Phase.POSTCOPY_PAUSED
        and side is m.src
        and status in ("postcopy-active", "completed")
    ):
        # Recovery worked: the migration goes on where it was.
        m.phase = Phase.FINISHING if m.cont_issued else Phase.HANDOFF


@_on(events_pb2.QmpEventReceived)
def _qmp_event(world: World, ev: Event, p: events_pb2.QmpEventReceived) -> None:
    vm = world.vms.get(p.vm)
    if vm is None:
        return
    host = ev.origin_host
    m = _open_migration(world, p.vm)
    side = m.side(host) if m is not None else None
    name = p.event
    if name == "STOP":
        vm.runstates[host] = "paused"
        if side is not None:
            side.runstate = "paused"
            if m is not None and side is m.src and not side.stopped_at_us:
                side.stopped_at_us = ev.time_us
    elif name == "RESUME":
        vm.runstates[host] = "running"
        if side is not None:
            side.runstate = "running"
            if m is not None and side is m.dst:
                side.resumed_at_us = side.resumed_at_us or ev.time_us
                m.dst_resumed = True
    elif name == "MIGRATION" and m is not None and side is not None:
        _set_migration_status(m, side, str(json.loads(p.data_json).get("status", "")))
    elif name == "MIGRATION_PASS" and m is not None and side is m.src:
        m.progress.pass_ = max(m.progress.pass_, int(json.loads(p.data_json).get("pass", 0)))
    _settle_vm_status(vm)


@_on(events_pb2.MigrationStatsSampled)
def _stats(world: World, ev: Event, p: events_pb2.MigrationStatsSampled) -> None:
    m = _open_migration(world, p.vm)
    if m is None or ev.origin_host != m.source:
        return
    progress = m.progress
    sample_pass = getattr(p, "pass")  # "pass" is a Python keyword
    if sample_pass > progress.sampled_pass:
        # A new pass: where the previous one ended is the policy's convergence yardstick.
        progress.previous_remaining_bytes = progress.remaining_bytes
        progress.sampled_pass = sample_pass
    progress.pass_ = max(progress.pass_, sample_pass)
    progress.total_bytes = p.total_bytes
    progress.transferred_bytes = p.transferred_bytes
    progress.remaining_bytes = p.remaining_bytes
    progress.mbps = p.mbps
    progress.dirty_pages_rate = p.dirty_pages_rate


@_on(events_pb2.QemuExited)
def _qemu_exited(world: World, ev: Event, p: events_pb2.QemuExited) -> None:
    vm = world.vms.get(p.vm)
    if vm is None:
        return
    host = ev.origin_host
    vm.runstates.pop(host, None)
    m = _open_migration(world, p.vm)
    side = m.side(host) if m is not None else None
    if side is not None:
        side.alive = False
        side.runstate = ""
    if vm.status == VmStatus.STOPPING and vm.host == host:
        vm.status = VmStatus.STOPPED
        vm.host = ""
    _settle_vm_status(vm)


@_on(events_pb2.LeaseAcquired)
def _lease_acquired(world: World, ev: Event, p: events_pb2.LeaseAcquired) -> None:
    vm = world.vms.get(p.vm)
    if vm is None:
        return
    vm.lease_holder = p.holder
    vm.lease_generation = max(vm.lease_generation, p.generation)
    m = _open_migration(world, p.vm)
    if m is None:
        return
    if p.holder == m.destination and m.phase != Phase.ROLLING_BACK:
        m.dst_lease_generation = p.generation
    elif p.holder == m.source and m.src_lease_released:
        m.src_lease_reacquired = True


@_on(events_pb2.LeaseReleased)
def _lease_released(world: World, ev: Event, p: events_pb2.LeaseReleased) -> None:
    vm = world.vms.get(p.vm)
    if vm is None:
        return
    if vm.lease_holder == p.holder:
        vm.lease_holder = ""
    m = _open_migration(world, p.vm)
    if m is not None and p.holder == m.source:
        m.src_lease_released = True
        m.src_lease_reacquired = False


@_on(events_pb2.NetworkChanged)
def _network_changed(world: World, ev: Event, p: events_pb2.NetworkChanged) -> None:
    m = _open_migration(world, p.vm)
    if m is not None and ev.origin_host == m.destination:
        m.dst_network_enabled = p.state == events_pb2.NETWORK_STATE_ENABLED


# --- commands ---------------------------------------------------------------------------------

_FORWARD_PHASE_OF_KIND = {
    Kind.PREPARE_INCOMING: Phase.PREPARING,
    Kind.START_MIGRATION: Phase.TRANSFERRING,
    Kind.RELEASE_LEASE: Phase.SWITCHOVER,
    Kind.CONTINUE_SWITCHOVER: Phase.SWITCHOVER,
    Kind.ACQUIRE_LEASE: Phase.HANDOFF,
    Kind.ENABLE_NETWORK: Phase.HANDOFF,
    Kind.RESUME_VM: Phase.FINISHING,
}


@_on(events_pb2.CommandIssued)
def _command_issued(world: World, ev: Event, p: events_pb2.CommandIssued) -> None:
    kind = Kind(p.kind)
    command = Command(p.command_id, kind, p.host_id, p.vm, p.attempt, p.migration_id, args=p.args)
    world.command_owner[p.command_id] = p.migration_id
    vm = world.vms.get(p.vm)
    if vm is not None and p.args.lease_generation:
        vm.lease_generation = max(vm.lease_generation, p.args.lease_generation)
    m = world.migrations.get(p.migration_id) if p.migration_id else None
    if m is None:
        if vm is not None:
            vm.commands[p.command_id] = command
            if kind == Kind.START_VM:
                vm.status = VmStatus.STARTING
                vm.host = p.host_id
                vm.lost_reason = ""
        return
    m.commands[p.command_id] = command
    m.latest[(kind, p.host_id)] = command
    m.last_seq = ev.seq
    if p.host_id == m.destination and kind == Kind.RESUME_VM:
        m.cont_issued = True
    if m.phase in (Phase.ROLLING_BACK, Phase.FENCING, Phase.POSTCOPY_PAUSED):
        return
    forward = _FORWARD_PHASE_OF_KIND.get(kind)
    if forward is not None and forward > m.phase:
        m.phase = forward


def _command_done(world: World, ev: Event, command_id: str, attempt: int) -> Command | None:
    migration_id = world.command_owner.get(command_id)
    if migration_id is None:
        return None
    if migration_id:
        m = world.migrations[migration_id]
        m.last_seq = ev.seq
        return m.commands.get(command_id)
    for vm in world.vms.values():
        if command_id in vm.commands:
            return vm.commands[command_id]
    return None


@_on(events_pb2.CommandSucceeded)
def _command_succeeded(world: World, ev: Event, p: events_pb2.CommandSucceeded) -> None:
    command = _command_done(world, ev, p.command_id, p.attempt)
    if command is None or command.state != CommandState.ISSUED:
        return
    command.state = CommandState.SUCCEEDED
    command.result = p.result
    vm = world.vms.get(command.vm)
    m = world.migrations.get(command.migration_id) if command.migration_id else None
    if m is None:
        if vm is not None:
            _vm_command_succeeded(vm, command)
        return
    if command.attempt != m.attempt:
        return  # a late answer to a superseded attempt changes nothing
    side = m.side(command.host)
    if command.kind == Kind.PREPARE_INCOMING:
        m.incoming_uri = p.result.uri
        m.dst.alive = True
        m.dst.runstate = "inmigrate"
    elif command.kind == Kind.RESUME_VM and side is m.dst:
        m.dst_resumed = True
    elif command.kind == Kind.DESTROY_VM and side is not None:
        side.alive = False
        side.runstate = ""
        if vm is not None:
            vm.runstates.pop(command.host, None)


def _vm_command_succeeded(vm: VmState, command: Command) -> None:
    if command.kind == Kind.START_VM:
        vm.status = VmStatus.RUNNING
        vm.host = command.host
        vm.runstates.setdefault(command.host, "running")
    elif command.kind == Kind.STOP_VM:
        vm.status = VmStatus.STOPPED
        vm.runstates.pop(command.host, None)
        vm.host = ""
    del vm.commands[command.command_id]


@_on(events_pb2.CommandFailed)
def _command_failed(world: World, ev: Event, p: events_pb2.CommandFailed) -> None:
    command = _command_done(world, ev, p.command_id, p.attempt)
    if command is None or command.state != CommandState.ISSUED:
        return
    command.state = CommandState.FAILED
    command.error = p.error
    if command.migration_id:
        return
    vm = world.vms.get(command.vm)
    if vm is None:
        return
    del vm.commands[command.command_id]
    if command.kind == Kind.START_VM and vm.status == VmStatus.STARTING:
        vm.status = VmStatus.STOPPED
        vm.host = ""
    elif command.kind == Kind.STOP_VM and vm.status == VmStatus.STOPPING:
        vm.status = VmStatus.RUNNING if vm.runstates.get(vm.host) == "running" else VmStatus.PAUSED


# --- migrations -------------------------------------------------------------------------------


@_on(events_pb2.MigrationRequested)
def _migration_requested(world: World, ev: Event, p: events_pb2.MigrationRequested) -> None:
    vm = world.vms[p.vm]
    src_runstate = vm.runstates.get(p.source, "running" if p.source_was_running else "paused")
    m = MigrationState(
        migration_id=p.migration_id,
        vm=p.vm,
        src=Side(p.source, runstate=src_runstate, alive=True),
        dst=Side(p.destination),
        mode=p.mode,
        policy=p.policy,
        source_was_running=p.source_was_running,
        source_lease_generation=p.source_lease_generation,
        requested_at_us=ev.time_us,
        last_seq=ev.seq,
    )
    world.migrations[p.migration_id] = m
    world.open_migrations.add(p.migration_id)
    vm.migration_id = p.migration_id
    vm.status = VmStatus.MIGRATING


def _migration(world: World, ev: Event, migration_id: str) -> MigrationState | None:
    m = world.migrations.get(migration_id)
    if m is not None:
        m.last_seq = ev.seq
    return m


@_on(events_pb2.PostcopyRequested)
def _postcopy_requested(world: World, ev: Event, p: events_pb2.PostcopyRequested) -> None:
    m = _migration(world, ev, p.migration_id)
    if m is not None:
        m.postcopy_requested = True


@_on(events_pb2.RollbackDecided)
def _rollback_decided(world: World, ev: Event, p: events_pb2.RollbackDecided) -> None:
    m = _migration(world, ev, p.migration_id)
    if m is not None:
        m.phase = Phase.ROLLING_BACK
        m.attempt += 1
        m.reason = p.reason


@_on(events_pb2.PostcopyRecoveryDecided)
def _recovery_decided(world: World, ev: Event, p: events_pb2.PostcopyRecoveryDecided) -> None:
    m = _migration(world, ev, p.migration_id)
    if m is not None:
        m.phase = Phase.POSTCOPY_PAUSED
        m.recovery_attempts = p.recovery_attempt
        m.attempt = p.attempt


@_on(events_pb2.FencingDecided)
def _fencing_decided(world: World, ev: Event, p: events_pb2.FencingDecided) -> None:
    m = _migration(world, ev, p.migration_id)
    if m is not None:
        m.phase = Phase.FENCING
        m.attempt += 1
        m.fencing_hosts = tuple(p.hosts)
        m.reason = p.reason


@_on(events_pb2.MigrationFinished)
def _migration_finished(world: World, ev: Event, p: events_pb2.MigrationFinished) -> None:
    m = _migration(world, ev, p.migration_id)
    if m is None:
        return
    m.phase = Phase(p.phase)
    m.reason = p.reason
    m.finished_at_us = ev.time_us
    world.open_migrations.discard(p.migration_id)
    vm = world.vms.get(m.vm)
    if vm is None or vm.migration_id != m.migration_id:
        return
    vm.migration_id = ""
    if m.phase == Phase.COMPLETED:
        vm.host = m.destination
        vm.status = VmStatus.MIGRATING  # settled from the runstates just below
    elif m.phase == Phase.ROLLED_BACK:
        vm.host = m.source
        vm.status = VmStatus.MIGRATING
    else:
        vm.status = VmStatus.LOST
        vm.host = ""
        return
    vm.status = VmStatus.RUNNING
    _settle_vm_status(vm)
