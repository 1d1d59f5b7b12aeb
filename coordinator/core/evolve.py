"""evolve(world, event) -> world: fold one stored event into the derived state.

Each event type has one handler. Handlers trust the log (it holds only what was decided or
observed); they never raise on odd observations, because hosts report what they see, including
the unexpected, and `decide` judges it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
from whimbrel.protocol import qmp_event_data
from whimbrel.v1 import common_pb2, events_pb2

# handler(world, payload, seq, time_us, origin host): the envelope fields evolve needs, passed
# bare so replay does not build an envelope object per event.
Handler = Callable[[World, Any, int, int, str], None]
_HANDLERS: dict[str, Handler] = {}

# QEMU migration statuses meaning the source's CPUs were stopped for the switch.
POSTCOPY_STATUSES = frozenset({"postcopy-active", "postcopy-paused", "postcopy-recover"})
# Source migration statuses in which the source has stopped for a pre-copy switchover
# ("completed": a migration that finished in pre-copy without a pre-switchover stop).
PRECOPY_SWITCH_STATUSES = frozenset({"pre-switchover", "device", "completed"})


def evolve(world: World, event: Event) -> World:
    """Fold `event` into `world` and return it (the world passed in is updated)."""
    handler = _HANDLERS.get(event.type)
    if handler is not None:
        handler(world, event.payload, event.seq, event.time_us, event.origin_host)
    world.last_seq = event.seq
    return world


Fact = tuple[int, str, int, str, Any]


def fold(world: World, facts: Iterable[Fact]) -> World:
    """Fold many events given as (seq, type, time_us, origin host, payload): replay's `evolve`."""
    handlers = _HANDLERS
    last = world.last_seq
    for seq, type_, time_us, host, payload in facts:
        handler = handlers.get(type_)
        if handler is not None:
            handler(world, payload, seq, time_us, host)
        last = seq
    world.last_seq = last
    return world


def _on(type_: type[Any]) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        _HANDLERS[type_.DESCRIPTOR.name] = fn
        return fn

    return register


def _enter(m: MigrationState, phase: Phase, time_us: int) -> None:
    if m.phase != phase:
        m.phase = phase
        m.phase_since_us = time_us


def _switching_over(m: MigrationState, time_us: int) -> None:
    """The source stopped to switch over (post-copy, or pre-copy's pre-switchover or end):
    that is the switchover phase, whether or not a command marks it (hostd releases the lease
    by itself)."""
    src = m.src
    if (
        m.phase == Phase.TRANSFERRING
        and src.runstate not in ("", "running")
        and (m.postcopy_started or src.status in PRECOPY_SWITCH_STATUSES)
    ):
        _enter(m, Phase.SWITCHOVER, time_us)


def _open_migration(world: World, vm_name: str) -> MigrationState | None:
    vm = world.vms.get(vm_name)
    if vm is None or not vm.migration_id:
        return None
    return world.migrations.get(vm.migration_id)


# --- lifecycle and hosts ----------------------------------------------------------------------


@_on(events_pb2.CoordinatorStarted)
def _coordinator_started(
    world: World, p: events_pb2.CoordinatorStarted, seq: int, time_us: int, origin: str
) -> None:
    world.epoch = p.epoch


@_on(events_pb2.HostConnected)
def _host_connected(
    world: World, p: events_pb2.HostConnected, seq: int, time_us: int, origin: str
) -> None:
    host = world.hosts.get(p.host_id)
    if host is None:
        host = world.hosts[p.host_id] = HostState(p.host_id)
    host.generation = p.generation
    host.connected = True
    world.queue_changes += 1
    world.awaited_hosts.discard(p.host_id)
    world.missing_hosts.discard(p.host_id)
    host.migration_address = p.migration_address
    host.highest_epoch_seen = max(host.highest_epoch_seen, p.highest_epoch_seen)
    host.changed_at_us = time_us
    host.memory_mib = p.capacity.memory_mib
    host.vcpus = p.capacity.vcpus


@_on(events_pb2.HostCapacityChanged)
def _host_capacity_changed(
    world: World, p: events_pb2.HostCapacityChanged, seq: int, time_us: int, origin: str
) -> None:
    host = world.hosts.get(origin)
    if host is None:
        return
    host.memory_mib = p.capacity.memory_mib
    host.vcpus = p.capacity.vcpus
    host.changed_at_us = time_us
    world.queue_changes += 1  # a queued migration may fit now


@_on(events_pb2.HostCordoned)
def _host_cordoned(
    world: World, p: events_pb2.HostCordoned, seq: int, time_us: int, origin: str
) -> None:
    host = world.hosts.get(p.host_id)
    if host is not None:
        host.cordoned = p.cordoned
        host.cordon_reason = p.reason if p.cordoned else ""


@_on(events_pb2.HostDrainStarted)
def _host_drain_started(
    world: World, p: events_pb2.HostDrainStarted, seq: int, time_us: int, origin: str
) -> None:
    host = world.hosts.get(p.host_id)
    if host is not None:
        host.drain_migrations = tuple(p.migration_ids)


@_on(events_pb2.HostDisconnected)
def _host_disconnected(
    world: World, p: events_pb2.HostDisconnected, seq: int, time_us: int, origin: str
) -> None:
    host = world.hosts.get(p.host_id)
    # A stale stream ending says nothing about the newer one.
    if host is not None and host.generation == p.generation:
        host.connected = False
        host.changed_at_us = time_us


@_on(events_pb2.RecoveryStarted)
def _recovery_started(
    world: World, p: events_pb2.RecoveryStarted, seq: int, time_us: int, origin: str
) -> None:
    world.awaited_hosts = {h for h in p.awaited_hosts if not _connected(world, h)}


@_on(events_pb2.RecoveryFinished)
def _recovery_finished(
    world: World, p: events_pb2.RecoveryFinished, seq: int, time_us: int, origin: str
) -> None:
    world.awaited_hosts = set()
    world.missing_hosts = {h for h in p.missing_hosts if not _connected(world, h)}


def _connected(world: World, host_id: str) -> bool:
    host = world.hosts.get(host_id)
    return host is not None and host.connected


# --- VMs --------------------------------------------------------------------------------------


@_on(events_pb2.VmDefined)
def _vm_defined(world: World, p: events_pb2.VmDefined, seq: int, time_us: int, origin: str) -> None:
    vm = world.vms.get(p.spec.name)
    if vm is None:
        world.vms[p.spec.name] = VmState(spec=p.spec)
    else:
        vm.spec = p.spec


@_on(events_pb2.VmStopRequested)
def _vm_stop_requested(
    world: World, p: events_pb2.VmStopRequested, seq: int, time_us: int, origin: str
) -> None:
    vm = world.vms.get(p.vm)
    if vm is not None:
        vm.status = VmStatus.STOPPING


@_on(events_pb2.VmLost)
def _vm_lost(world: World, p: events_pb2.VmLost, seq: int, time_us: int, origin: str) -> None:
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
    if vm.status != VmStatus.PAUSED:
        vm.resume_owed = False


@_on(events_pb2.VmObserved)
def _vm_observed(
    world: World, p: events_pb2.VmObserved, seq: int, time_us: int, origin: str
) -> None:
    obs = p.observation
    vm = world.vms.get(obs.vm)
    if vm is None:
        return
    host = origin
    last_runstate = vm.runstates.get(host)
    if obs.process_alive:
        vm.runstates[host] = obs.runstate
    else:
        vm.runstates.pop(host, None)
    m = _open_migration(world, obs.vm)
    if (
        not obs.process_alive
        and m is None
        and vm.host == host
        and vm.status in (VmStatus.RUNNING, VmStatus.PAUSED)
        and last_runstate not in (None, "shutdown")
    ):
        # Its QEMU is gone with no stop asked for (a host that restarted without it): lost,
        # so its on_lost policy applies, as for a QEMU seen exiting.
        vm.status = VmStatus.LOST
        vm.lost_reason = f"QEMU on {host} found gone, unasked ({p.reason or 'observed'})"
        vm.host = ""
    side = m.side(host) if m is not None else None
    if side is not None and 0 < obs.queried_at_us < side.snapshot_us:
        # QEMU's answers older than a snapshot its host reported since (hostd re-sends its
        # unacknowledged events after its hello): applying them would step back, e.g. a stale
        # postcopy-active read over a post-copy that paused since. (A QEMU found gone carries
        # no query time and always applies.)
        side = None
    if m is not None and side is not None:
        side.alive = obs.process_alive
        if obs.process_alive and obs.qmp_reachable:
            side.runstate = obs.runstate
            _set_migration_status(m, side, obs.migration_status, time_us)
            side.snapshot_us = max(side.snapshot_us, obs.queried_at_us)
    _settle_vm_status(vm)


def _set_migration_status(m: MigrationState, side: Side, status: str, time_us: int) -> None:
    # QEMU quirk (7.2): migrate-recover emits "MIGRATION setup" on the destination while
    # query-migrate still says postcopy-paused; the paused state is the truth until resumed.
    if status == "setup" and side.status == "postcopy-paused":
        return
    if (
        m.phase == Phase.POSTCOPY_PAUSED
        and side is m.src
        and side.status == "postcopy-recover"
        and status == "postcopy-paused"
    ):
        m.recovery_failed = True
    if status == "cancelling" and side.status == "postcopy-paused":
        side.cancel_stuck = True
    if side is m.src and status == "postcopy-recover" and side.status != status:
        m.src_recover_attempt = m.attempt
    if status != side.status:
        side.status_at_us = time_us
    side.status = status
    if status in POSTCOPY_STATUSES:
        m.postcopy_started = True
    if side is m.src:
        _switching_over(m, time_us)
    if (
        m.phase == Phase.POSTCOPY_PAUSED
        and side is m.src
        and status in ("postcopy-active", "completed")
    ):
        # Recovery worked: the migration goes on where it was.
        _enter(m, Phase.FINISHING if m.cont_issued else Phase.HANDOFF, time_us)


@_on(events_pb2.QmpEventReceived)
def _qmp_event(
    world: World, p: events_pb2.QmpEventReceived, seq: int, time_us: int, origin: str
) -> None:
    vm = world.vms.get(p.vm)
    if vm is None:
        return
    host = origin
    m = _open_migration(world, p.vm)
    side = m.side(host) if m is not None else None
    name = p.event
    if side is not None and time_us < side.snapshot_us and name in ("STOP", "RESUME", "MIGRATION"):
        # Older than the snapshot its host reported since: applying it would step back (a
        # stale postcopy-active read as a recovery that worked). That the destination ran
        # stays a fact.
        if name == "RESUME" and m is not None and side is m.dst:
            side.resumed_at_us = side.resumed_at_us or time_us
            m.dst_resumed = True
        return
    if name == "STOP":
        vm.runstates[host] = "paused"
        if side is not None:
            side.runstate = "paused"
            if m is not None and side is m.src and not side.stopped_at_us:
                side.stopped_at_us = time_us
            if m is not None and side is m.src:
                _switching_over(m, time_us)
    elif name == "RESUME":
        vm.runstates[host] = "running"
        if side is not None:
            side.runstate = "running"
            if m is not None and side is m.dst:
                side.resumed_at_us = side.resumed_at_us or time_us
                m.dst_resumed = True
    elif name == "SHUTDOWN":
        vm.runstates[host] = "shutdown"  # QEMU exits next: an exit asked for by the guest
    elif name == "MIGRATION" and m is not None and side is not None:
        _set_migration_status(m, side, str(_data(p.data_json).get("status", "")), time_us)
    elif name == "MIGRATION" and m is None and host != vm.host:
        # A QEMU reports a migration for a VM with none open, away from its home: an incoming
        # QEMU started by a PREPARE_INCOMING that ran after its migration had ended (its answer
        # is moot then). It exists, so ReconcileVm destroys it as a stray copy.
        vm.runstates.setdefault(host, "inmigrate")
    elif name == "MIGRATION_PASS" and m is not None and side is m.src:
        m.progress.pass_ = max(m.progress.pass_, _pass_number(_data(p.data_json)))
    _settle_vm_status(vm)


def _data(data_json: str) -> dict[str, Any]:
    """A QMP event's data; none when it is not an object (the host stream refuses those; a log
    written before it did is still folded)."""
    return qmp_event_data(data_json) or {}


def _pass_number(data: dict[str, Any]) -> int:
    value = data.get("pass", 0)
    return value if type(value) is int and 0 <= value < 2**31 else 0


@_on(events_pb2.MigrationStatsSampled)
def _stats(
    world: World, p: events_pb2.MigrationStatsSampled, seq: int, time_us: int, origin: str
) -> None:
    m = _open_migration(world, p.vm)
    if m is not None and p.error_desc:
        side = m.side(origin)
        if side is not None:
            side.error = _printable(p.error_desc)
        return
    if m is None or origin != m.source:
        return
    progress = m.progress
    # Bytes sent, from any sample: what the progress timeout judges.
    progress.watched_since_us = progress.watched_since_us or time_us
    progress.sampled_at_us = max(progress.sampled_at_us, time_us)
    if p.transferred_bytes > progress.transferred_bytes:
        progress.moved_at_us = max(progress.moved_at_us, time_us)
    progress.transferred_bytes = p.transferred_bytes
    sample_pass = getattr(p, "pass")  # "pass" is a Python keyword
    if not sample_pass:
        return  # a periodic sample between passes: not a yardstick of convergence
    if sample_pass > progress.sampled_pass:
        progress.start_pass(sample_pass, p.remaining_bytes)
    progress.pass_ = max(progress.pass_, sample_pass)
    progress.total_bytes = p.total_bytes
    progress.remaining_bytes = p.remaining_bytes
    progress.mbps = p.mbps
    progress.dirty_pages_rate = p.dirty_pages_rate


# QEMU's error text goes into reasons, logs and terminals: a line of printable characters.
MAX_ERROR_TEXT = 256


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text[:MAX_ERROR_TEXT])


@_on(events_pb2.QemuExited)
def _qemu_exited(
    world: World, p: events_pb2.QemuExited, seq: int, time_us: int, origin: str
) -> None:
    vm = world.vms.get(p.vm)
    if vm is None:
        return
    host = origin
    last_runstate = vm.runstates.pop(host, None)
    m = _open_migration(world, p.vm)
    side = m.side(host) if m is not None else None
    if side is not None:
        side.alive = False
        side.runstate = ""
    if vm.status == VmStatus.STOPPING and vm.host == host:
        vm.status = VmStatus.STOPPED
        vm.host = ""
    elif (
        m is None
        and vm.host == host
        and vm.status in (VmStatus.RUNNING, VmStatus.PAUSED)
        and last_runstate != "shutdown"
    ):
        # Nobody asked it to stop and the guest did not shut down: the VM is lost (and its
        # on_lost policy applies), not quietly stopped.
        how = f"signal {p.signal}" if p.signal else p.reason or "no shutdown requested"
        vm.status = VmStatus.LOST
        vm.lost_reason = f"QEMU exited unexpectedly on {host} ({how})"
        vm.host = ""
    _settle_vm_status(vm)


@_on(events_pb2.LeaseAcquired)
def _lease_acquired(
    world: World, p: events_pb2.LeaseAcquired, seq: int, time_us: int, origin: str
) -> None:
    vm = world.vms.get(p.vm)
    if vm is None:
        return
    vm.lease_holder = p.holder
    vm.lease_holder_generation = p.generation
    vm.lease_generation = max(vm.lease_generation, p.generation)
    m = _open_migration(world, p.vm)
    if m is None:
        return
    if p.holder == m.destination and m.phase != Phase.ROLLING_BACK:
        m.dst_lease_generation = p.generation
    elif p.holder == m.source:
        # The source already held the lease when the migration began: taking it during the
        # migration is the rollback taking it back (also after a release that never ran).
        m.src_lease_reacquired = True


@_on(events_pb2.LeaseReleased)
def _lease_released(
    world: World, p: events_pb2.LeaseReleased, seq: int, time_us: int, origin: str
) -> None:
    vm = world.vms.get(p.vm)
    if vm is None:
        return
    if vm.lease_holder == p.holder:
        vm.lease_holder = ""
        vm.lease_holder_generation = 0
    m = _open_migration(world, p.vm)
    if m is not None and p.holder == m.source:
        m.src_lease_released = True
        m.src_lease_reacquired = False
    elif m is not None and p.holder == m.destination and p.generation == m.dst_lease_generation:
        # A rollback took it back: the destination holds no lease now, and may run only once
        # it has taken one again.
        m.dst_lease_generation = 0


@_on(events_pb2.NetworkChanged)
def _network_changed(
    world: World, p: events_pb2.NetworkChanged, seq: int, time_us: int, origin: str
) -> None:
    m = _open_migration(world, p.vm)
    if m is not None and origin == m.destination:
        m.dst_network_enabled = p.state == events_pb2.NETWORK_STATE_ENABLED


# --- commands ---------------------------------------------------------------------------------

_KINDS = {kind.value: kind for kind in Kind}
_FORWARD_PHASE_OF_KIND: dict[int, Phase] = {
    Kind.PREPARE_INCOMING: Phase.PREPARING,
    Kind.START_MIGRATION: Phase.TRANSFERRING,
    Kind.RELEASE_LEASE: Phase.SWITCHOVER,
    Kind.CONTINUE_SWITCHOVER: Phase.SWITCHOVER,
    Kind.ACQUIRE_LEASE: Phase.HANDOFF,
    # Networking is enabled as soon as the source stops, beside the lease release.
    Kind.ENABLE_NETWORK: Phase.SWITCHOVER,
    Kind.RESUME_VM: Phase.FINISHING,
}


# Plain ints for the hot handlers below (enum member lookups cost more than int compares).
_START_VM, _PREPARE, _START_MIGRATION, _RESUME, _DESTROY = (
    int(Kind.START_VM),
    int(Kind.PREPARE_INCOMING),
    int(Kind.START_MIGRATION),
    int(Kind.RESUME_VM),
    int(Kind.DESTROY_VM),
)
_ISSUED, _SUCCEEDED = CommandState.ISSUED, CommandState.SUCCEEDED
_DETOURS = frozenset({Phase.ROLLING_BACK, Phase.FENCING, Phase.POSTCOPY_PAUSED})


@_on(events_pb2.CommandIssued)
def _command_issued(
    world: World, p: events_pb2.CommandIssued, seq: int, time_us: int, origin: str
) -> None:
    kind, host, command_id = p.kind, p.host_id, p.command_id
    command = Command(p, time_us)
    vm = world.vms.get(p.vm)
    generation = p.args.lease_generation
    if vm is not None and generation > vm.lease_generation:
        vm.lease_generation = generation
    migration_id = p.migration_id
    m = world.migrations.get(migration_id) if migration_id else None
    if m is None:
        if vm is not None:
            vm.commands[command_id] = command
            vm.commands_issued += 1
            if kind == _START_VM:
                vm.status = VmStatus.STARTING
                vm.host = host
                vm.lost_reason = ""
        return
    m.commands[command_id] = command
    m.latest[(kind, host)] = command
    m.last_seq = seq
    if kind == _RESUME and host == m.dst.host:
        m.cont_issued = True
    elif kind == _START_MIGRATION:
        # What the source's QEMU was told, the start's own settings included (mode
        # postcopy's downtime limit, a post-copy start's throttle): a later tuning builds on it.
        m.parameters.CopyFrom(p.args.parameters)
    if m.phase in _DETOURS:
        return
    forward = _FORWARD_PHASE_OF_KIND.get(kind)
    # (A forward command also ends QUEUED: logs written before admission was an event.)
    if forward is not None and (m.phase == Phase.QUEUED or forward > m.phase):
        _enter(m, forward, time_us)


def _command_done(world: World, seq: int, command_id: str, vm: str) -> Command | None:
    command = world.command(command_id, vm)
    if command is not None and command.migration_id:
        world.migrations[command.migration_id].last_seq = seq
    return command


@_on(events_pb2.CommandSucceeded)
def _command_succeeded(
    world: World, p: events_pb2.CommandSucceeded, seq: int, time_us: int, origin: str
) -> None:
    command = _command_done(world, seq, p.command_id, p.vm)
    if p.kind == _PREPARE and (command is None or command.state is _ISSUED):
        # (A repeat of an answer already in, as hostd gives to a command sent again after a
        # restart, says nothing new: that QEMU may be destroyed since.)
        _incoming_qemu_exists(world, p.vm, origin)
    if command is None or command.state is not _ISSUED:
        return
    command.state = _SUCCEEDED
    result = command.result = p.result
    issued = command.issued
    migration_id = issued.migration_id
    if not migration_id:
        vm = world.vms.get(issued.vm)
        if vm is not None:
            _vm_command_succeeded(vm, command)
        return
    m = world.migrations.get(migration_id)
    if m is None or issued.attempt != m.attempt:
        return  # a late answer to a superseded attempt changes nothing else
    kind, host = issued.kind, issued.host_id
    if kind == _PREPARE:
        m.incoming_uri = result.uri
        m.dst.alive = True
        m.dst.runstate = "inmigrate"
    elif kind == _RESUME and host == m.dst.host:
        m.dst_resumed = True
    elif kind == _DESTROY:
        side = m.side(host)
        if side is not None:
            side.alive = False
            side.runstate = ""
            vm = world.vms.get(issued.vm)
            if vm is not None:
                vm.runstates.pop(host, None)


def _incoming_qemu_exists(world: World, name: str, host: str) -> None:
    """A PREPARE_INCOMING that succeeded started a QEMU on `host`, however late its answer
    came: a rollback or fence decided meanwhile must still destroy it, and once the migration
    is over it is a stray copy (destroyed by ReconcileVm). Never a paused copy left behind."""
    vm = world.vms.get(name)
    if vm is None:
        return
    vm.runstates.setdefault(host, "inmigrate")
    m = _open_migration(world, name)
    if m is not None and host == m.dst.host and not m.dst.alive:
        m.dst.alive = True
        m.dst.runstate = "inmigrate"


def _vm_command_succeeded(vm: VmState, command: Command) -> None:
    if command.kind == Kind.START_VM:
        vm.status = VmStatus.RUNNING
        vm.host = command.host
        vm.runstates.setdefault(command.host, "running")
    elif command.kind == Kind.STOP_VM:
        vm.status = VmStatus.STOPPED
        vm.runstates.pop(command.host, None)
        vm.host = ""
    elif command.kind == Kind.DESTROY_VM:
        vm.runstates.pop(command.host, None)
    elif command.kind == Kind.RESUME_VM:
        vm.runstates[command.host] = "running"  # hostd answers once the guest runs
        _settle_vm_status(vm)
    del vm.commands[command.command_id]


@_on(events_pb2.CommandFailed)
def _command_failed(
    world: World, p: events_pb2.CommandFailed, seq: int, time_us: int, origin: str
) -> None:
    command = _command_done(world, seq, p.command_id, p.vm)
    if command is None or command.state != CommandState.ISSUED:
        return
    command.state = CommandState.FAILED
    command.error = p.error
    command.rejected = p.rejected
    if command.migration_id:
        m = world.migrations.get(command.migration_id)
        if (
            m is not None
            and p.rejected
            and command.kind == _RESUME
            and command.host == m.dst.host
            and command is m.latest.get((_RESUME, command.host))
            and not m.dst_resumed
            and m.dst.runstate != "running"
            and not _another_cont_may_have_acted(m, command)
        ):
            # The destination's hostd refused the cont before it reached QEMU, and no other
            # cont could have: the guest never ran there, so the point of no return was not
            # passed after all.
            m.cont_issued = False
        return
    vm = world.vms.get(command.vm)
    if vm is None:
        return
    del vm.commands[command.command_id]
    if command.kind in (Kind.ACQUIRE_LEASE, Kind.RESUME_VM):
        vm.resume_owed = False  # tried once; the VM stays paused, the failure in the log says why
    if command.kind == Kind.START_VM and vm.status == VmStatus.STARTING:
        vm.status = VmStatus.STOPPED
        vm.host = ""
    elif command.kind == Kind.STOP_VM and vm.status == VmStatus.STOPPING:
        vm.status = VmStatus.RUNNING if vm.runstates.get(vm.host) == "running" else VmStatus.PAUSED


def _another_cont_may_have_acted(m: MigrationState, refused: Command) -> bool:
    """Whether a cont to the destination other than `refused` may have reached QEMU: any
    that hostd did not refuse before acting (one interrupted by a restart may have run)."""
    return any(
        c is not refused and c.kind == _RESUME and c.host == m.dst.host and not c.rejected
        for c in m.commands.values()
    )


# --- migrations -------------------------------------------------------------------------------


@_on(events_pb2.MigrationRequested)
def _migration_requested(
    world: World, p: events_pb2.MigrationRequested, seq: int, time_us: int, origin: str
) -> None:
    vm = world.vms[p.vm]
    vm.resume_owed = False  # the migration decides now whether the VM runs after it
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
        requested_at_us=time_us,
        phase=Phase.QUEUED,
        phase_since_us=time_us,
        requested_seq=seq,
        last_seq=seq,
    )
    m.parameters.CopyFrom(p.policy.parameters)
    world.migrations[p.migration_id] = m
    world.open_migrations.add(p.migration_id)
    world.queue_changes += 1
    vm.migration_id = p.migration_id
    vm.status = VmStatus.MIGRATING


def _migration(world: World, seq: int, migration_id: str) -> MigrationState | None:
    m = world.migrations.get(migration_id)
    if m is not None:
        m.last_seq = seq
    return m


@_on(events_pb2.MigrationAdmitted)
def _migration_admitted(
    world: World, p: events_pb2.MigrationAdmitted, seq: int, time_us: int, origin: str
) -> None:
    m = _migration(world, seq, p.migration_id)
    if m is not None and m.phase == Phase.QUEUED:
        _enter(m, Phase.PREPARING, time_us)


@_on(events_pb2.MigrationLimitsSet)
def _migration_limits_set(
    world: World, p: events_pb2.MigrationLimitsSet, seq: int, time_us: int, origin: str
) -> None:
    limits = common_pb2.MigrationLimits()
    limits.CopyFrom(p.limits)
    world.migration_limits = limits
    world.queue_changes += 1


@_on(events_pb2.MigrationTuned)
def _migration_tuned(
    world: World, p: events_pb2.MigrationTuned, seq: int, time_us: int, origin: str
) -> None:
    m = _migration(world, seq, p.migration_id)
    if m is not None:
        m.parameters.CopyFrom(p.parameters)


@_on(events_pb2.PolicyDefined)
def _policy_defined(
    world: World, p: events_pb2.PolicyDefined, seq: int, time_us: int, origin: str
) -> None:
    policy = events_pb2.MigrationPolicy()
    policy.CopyFrom(p.policy)
    world.policies[p.name] = policy


@_on(events_pb2.DefaultPolicySet)
def _default_policy_set(
    world: World, p: events_pb2.DefaultPolicySet, seq: int, time_us: int, origin: str
) -> None:
    world.default_policy = p.name


@_on(events_pb2.PostcopyRequested)
def _postcopy_requested(
    world: World, p: events_pb2.PostcopyRequested, seq: int, time_us: int, origin: str
) -> None:
    m = _migration(world, seq, p.migration_id)
    if m is not None:
        m.postcopy_requested = True


@_on(events_pb2.RollbackDecided)
def _rollback_decided(
    world: World, p: events_pb2.RollbackDecided, seq: int, time_us: int, origin: str
) -> None:
    m = _migration(world, seq, p.migration_id)
    if m is not None:
        _enter(m, Phase.ROLLING_BACK, time_us)
        m.attempt += 1
        m.reason = p.reason


@_on(events_pb2.PostcopyRecoveryDecided)
def _recovery_decided(
    world: World, p: events_pb2.PostcopyRecoveryDecided, seq: int, time_us: int, origin: str
) -> None:
    m = _migration(world, seq, p.migration_id)
    if m is not None:
        _enter(m, Phase.POSTCOPY_PAUSED, time_us)
        m.recovery_attempts = p.recovery_attempt
        m.attempt = p.attempt
        m.recovery_failed = False


@_on(events_pb2.FencingDecided)
def _fencing_decided(
    world: World, p: events_pb2.FencingDecided, seq: int, time_us: int, origin: str
) -> None:
    m = _migration(world, seq, p.migration_id)
    if m is not None:
        _enter(m, Phase.FENCING, time_us)
        m.attempt += 1
        m.fencing_hosts = tuple(p.hosts)
        m.reason = p.reason


@_on(events_pb2.MigrationFinished)
def _migration_finished(
    world: World, p: events_pb2.MigrationFinished, seq: int, time_us: int, origin: str
) -> None:
    m = _migration(world, seq, p.migration_id)
    if m is None:
        return
    _enter(m, Phase(p.phase), time_us)
    m.reason = p.reason
    m.finished_at_us = time_us
    world.open_migrations.discard(p.migration_id)
    world.queue_changes += 1
    # Nothing is decided on a finished migration any more: its commands are history (the log
    # keeps them), not state. Dropping them keeps a long-lived coordinator's memory, and its
    # checkpoints, proportional to what is still open.
    m.commands = {}
    m.latest = {}
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
        vm.resume_owed = m.source_was_running
    else:
        vm.status = VmStatus.LOST
        vm.host = ""
        return
    vm.status = VmStatus.RUNNING
    _settle_vm_status(vm)
