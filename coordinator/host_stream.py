"""What a host may say on its stream: observations of its own VMs and answers to its own commands.

A host reports facts; it never decides (DESIGN.md, invariant 9). Every payload of a batch is
judged against the world as it stands before the batch, and one payload a host may not send
refuses the whole batch, so nothing of it reaches the log:
- only observation types are allowed (`ALLOWED`); commands, migration ends, VM definitions,
  losses, epochs and host lifecycle are the coordinator's own events;
- a command result answers a command issued to this very host, with its attempt, kind and VM,
  and a URI it returns (where a source will send the guest's memory) is a plain `tcp:HOST:PORT`:
  never `exec:` (a shell on the source), `unix:`, `fd:` or options after a comma;
- a QMP event is named as QEMU names events, and its data is a JSON object of bounded size,
  as hostd forwards it (`whimbrel.protocol.is_qmp_event_name`, `qmp_event_data`);
- a fact that claims something of a VM (its QEMU runs or paused here, a QMP event, a stats
  sample, the lease taken, networking prepared or enabled) is about a VM this host is involved
  with: its home, its lease holder, a host with a QEMU for it, a host with a command for it, or
  a side of its latest migration;
- a fact that only gives up something of the host's own (its QEMU exited, networking disabled or
  released, a lease it held released) may be about any defined VM: it takes nothing from
  another host, and hostd reports those after the coordinator may already have moved on;
- a lease fact names this host as the holder, and an acquired generation never exceeds the
  highest one the coordinator handed out;
- a capacity change is the reporting host's own, and offers at least one MiB and one vCPU.

Payloads about what the world does not know (a VM never defined, a command the world no longer
tracks: an answer repeated after a reconnect, a late answer to a finished migration) are `moot`:
they would change nothing and their origin cannot be judged, so they are dropped rather than
appended. Refusing them would lock a legitimate hostd out for good, since it re-sends every
unacknowledged event on each reconnect. So are the claims of a host that is no longer
involved with a VM but was a side of one of its migrations: what it recorded then (QMP events,
samples, networking) reaches the coordinator only after a newer migration of the VM began
elsewhere, when it can no longer be placed. Its snapshot of a live QEMU is logged (a stray to
destroy), and a lease it claims is still judged. And so are the QMP events nothing acts on
(`protocol.QMP_EVENTS_ACTED_ON`) from a host no longer involved with the VM: hostd reports the
ones a guest flooded it with a period late (`hostd.event_budget`), after a stop may have ended
the host's part.

A Hello may raise its host's generation by at most `MAX_GENERATION_JUMP`: a forged huge
generation would otherwise lock the real hostd out (lower generations are refused).

A host's stamps (an event's time, the moment a snapshot queried QEMU) may lead the coordinator's
clock by at most `MAX_CLOCK_LEAD_US`, and are never negative: the fold ignores a host's QMP events
stamped before its latest snapshot, so one snapshot stamped far ahead would make every later
event of that host read as history and stall its migration.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from coordinator.core.state import World
from whimbrel.protocol import (
    HOST_OBSERVATIONS,
    MAX_QMP_EVENT_DATA,
    QMP_EVENTS_ACTED_ON,
    is_qmp_event_name,
    qmp_event_data,
)
from whimbrel.v1 import events_pb2, host_pb2

__all__ = [
    "ALLOWED",
    "MAX_CLOCK_LEAD_US",
    "MAX_GENERATION_JUMP",
    "Refusal",
    "StreamRefused",
    "check_batch",
    "check_hello",
    "check_stamps",
    "judge_batch",
    "moot",
]

# hostd bumps its generation by one per start; a million restarts is beyond any real host.
MAX_GENERATION_JUMP = 1_000_000

# NTP keeps hosts within milliseconds of each other; a minute leaves room for a clock being
# stepped back into line without refusing an honest host.
MAX_CLOCK_LEAD_US = 60_000_000

# What hostd returns for PREPARE_INCOMING and RECOVER_INCOMING: tcp:ADDRESS:PORT.
_MIGRATION_URI = re.compile(r"tcp:[^\s,]+:[0-9]{1,5}")
_GIVING_UP_NETWORK = frozenset(
    {events_pb2.NETWORK_STATE_DISABLED, events_pb2.NETWORK_STATE_RELEASED}
)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a host may not send a payload."""

    host_id: str
    payload_type: str
    reason: str

    def __str__(self) -> str:
        return f"host {self.host_id} may not send {self.payload_type}: {self.reason}"


class StreamRefused(Exception):
    """A host's stream carried something it may not send; nothing of the batch was logged."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(str(refusal))
        self.refusal = refusal


Check = Callable[[World, str, Any], "str | None"]


def _vm_name(payload: Any) -> str:
    if isinstance(payload, events_pb2.VmObserved):
        return payload.observation.vm
    return str(payload.vm)


def _involved(world: World, host_id: str, vm_name: str) -> bool:
    """Whether `host_id` has a part in the VM's life that lets it report on it."""
    vm = world.vms.get(vm_name)
    if vm is None:
        return False
    if host_id in (vm.host, vm.lease_holder) or host_id in vm.runstates:
        return True
    if any(c.host == host_id for c in vm.commands.values()):
        return True
    if vm.migration_id:
        m = world.migrations.get(vm.migration_id)
        return m is not None and host_id in (m.source, m.destination)
    # Rare path (a late report after the VM's migration finished): its latest migration.
    latest = max(
        (m for m in world.migrations.values() if m.vm == vm_name),
        key=lambda m: (m.requested_at_us, m.last_seq),
        default=None,
    )
    return latest is not None and host_id in (latest.source, latest.destination)


def _claim(world: World, host_id: str, payload: Any) -> str | None:
    """A fact that claims something of the VM on this host."""
    vm = _vm_name(payload)
    if not _involved(world, host_id, vm):
        return f"VM {vm} is not run by {host_id} nor migrating to or from it"
    return None


def _qmp_event(world: World, host_id: str, payload: Any) -> str | None:
    """A QMP event of a VM this host is involved with, named as QEMU names events, its data a
    JSON object as hostd forwards it (the fold reads statuses and pass numbers from it)."""
    if not is_qmp_event_name(payload.event):
        shown = f"{payload.event[:64]!r}, {len(payload.event)} characters"
        return f"its event name is none of QEMU's ({shown})"
    if qmp_event_data(payload.data_json) is None:
        return (
            f"its data is not a JSON object of at most {MAX_QMP_EVENT_DATA} characters "
            f"({len(payload.data_json)} characters)"
        )
    return _claim(world, host_id, payload)


def _giving_up(world: World, host_id: str, payload: Any) -> str | None:
    return None  # only ever takes the host's own claims away (see the module docstring)


def _vm_observed(world: World, host_id: str, payload: events_pb2.VmObserved) -> str | None:
    if not payload.observation.process_alive:
        return _giving_up(world, host_id, payload)
    reason = _claim(world, host_id, payload)
    if reason is not None and _former_side(world, host_id, payload.observation.vm):
        # A QEMU there (a late PREPARE_INCOMING's, say) is a stray the coordinator must know
        # of to destroy it; an old snapshot read as one costs a destroy that finds nothing.
        return None
    return reason


def _network_changed(world: World, host_id: str, payload: events_pb2.NetworkChanged) -> str | None:
    if payload.state in _GIVING_UP_NETWORK:
        return _giving_up(world, host_id, payload)
    return _claim(world, host_id, payload)


def _lease_acquired(world: World, host_id: str, payload: events_pb2.LeaseAcquired) -> str | None:
    if payload.holder != host_id:
        return f"the holder is {payload.holder!r}, not the reporting host"
    if (reason := _claim(world, host_id, payload)) is not None:
        return reason
    vm = world.vms[payload.vm]
    if payload.generation > vm.lease_generation:
        return (
            f"generation {payload.generation} of the lease of {payload.vm} is above the highest "
            f"handed out ({vm.lease_generation})"
        )
    return None


def _lease_released(world: World, host_id: str, payload: events_pb2.LeaseReleased) -> str | None:
    if payload.holder != host_id:
        return f"the holder is {payload.holder!r}, not the reporting host"
    return _giving_up(world, host_id, payload)


def _command_result(
    world: World, host_id: str, payload: events_pb2.CommandSucceeded | events_pb2.CommandFailed
) -> str | None:
    command = world.command(payload.command_id, payload.vm)
    if command is None:
        return None  # moot: dropped, not appended
    if command.host != host_id:
        return f"command {payload.command_id} was issued to {command.host}"
    if payload.attempt != command.attempt:
        return (
            f"command {payload.command_id} was issued under attempt {command.attempt}, "
            f"not {payload.attempt}"
        )
    if payload.kind != command.kind or payload.vm != command.vm:
        return f"command {payload.command_id} is a {command.kind_name} of VM {command.vm}"
    if isinstance(payload, events_pb2.CommandSucceeded):
        uri = payload.result.uri
        if uri and _MIGRATION_URI.fullmatch(uri) is None:
            return f"migration URI {uri!r} is not tcp:ADDRESS:PORT"
    return None


def _capacity_changed(
    world: World, host_id: str, payload: events_pb2.HostCapacityChanged
) -> str | None:
    if payload.capacity.memory_mib < 1 or payload.capacity.vcpus < 1:
        return (
            f"capacity of {payload.capacity.memory_mib} MiB and {payload.capacity.vcpus} vCPUs: "
            "a host offers at least 1 of each"
        )
    return None


# The payload types a host may send, each with the check of its origin.
_CHECKS: dict[type[Message], Check] = {
    events_pb2.VmObserved: _vm_observed,
    events_pb2.QmpEventReceived: _qmp_event,
    events_pb2.MigrationStatsSampled: _claim,
    events_pb2.QemuExited: _giving_up,
    events_pb2.LeaseAcquired: _lease_acquired,
    events_pb2.LeaseReleased: _lease_released,
    events_pb2.NetworkChanged: _network_changed,
    events_pb2.CommandSucceeded: _command_result,
    events_pb2.CommandFailed: _command_result,
    events_pb2.HostCapacityChanged: _capacity_changed,
}
_NOT_AN_OBSERVATION = "not an observation: only the coordinator makes this event"
ALLOWED = HOST_OBSERVATIONS
if {cls.DESCRIPTOR.name for cls in _CHECKS} != ALLOWED:
    raise ImportError("host_stream judges other payloads than protocol.HOST_OBSERVATIONS names")
_BY_NAME: dict[str, Check] = {cls.DESCRIPTOR.name: check for cls, check in _CHECKS.items()}


def check_batch(world: World, host_id: str, payloads: Sequence[Message]) -> Refusal | None:
    """The first payload of the batch that `host_id` may not send, or None when all may be."""
    return judge_batch(world, host_id, payloads)[0]


def judge_batch(
    world: World, host_id: str, payloads: Sequence[Message]
) -> tuple[Refusal | None, list[bool]]:
    """The first payload of the batch that `host_id` may not send (or None when all may be), and
    which of them are `moot`, judged once: this runs for every event a host sends."""
    moots: list[bool] = []
    for payload in payloads:
        type_ = payload.DESCRIPTOR.name
        check = _BY_NAME.get(type_)
        if check is None:
            return Refusal(host_id, type_, _NOT_AN_OBSERVATION), moots
        is_moot = moot(world, host_id, payload)
        moots.append(is_moot)
        if not is_moot and (reason := check(world, host_id, payload)) is not None:
            return Refusal(host_id, type_, reason), moots
    return None, moots


def moot(world: World, host_id: str, payload: Message) -> bool:
    """An allowed payload `host_id` sent about something the world does not know, or a former
    side's late report: it would change nothing and cannot be judged, so it is dropped (see the
    module docstring)."""
    if isinstance(payload, (events_pb2.CommandSucceeded, events_pb2.CommandFailed)):
        return world.command(payload.command_id, payload.vm) is None
    if isinstance(payload, events_pb2.HostCapacityChanged):
        return False  # about the host itself, which the world knows once it said hello
    vm_name = _vm_name(payload)
    if vm_name not in world.vms:
        return True
    if not _late_claim(payload) or _involved(world, host_id, vm_name):
        return False
    return _record_only(payload) or _former_side(world, host_id, vm_name)


def _record_only(payload: Message) -> bool:
    """A QMP event nothing acts on (hostd's count of the ones it dropped included)."""
    return (
        isinstance(payload, events_pb2.QmpEventReceived)
        and payload.event not in QMP_EVENTS_ACTED_ON
    )


def _late_claim(payload: Message) -> bool:
    """A late report that claims something (what gives up is allowed from anyone anyway; a
    snapshot of a live QEMU is judged, see `_vm_observed`)."""
    if isinstance(payload, events_pb2.NetworkChanged):
        return payload.state not in _GIVING_UP_NETWORK
    return isinstance(payload, (events_pb2.QmpEventReceived, events_pb2.MigrationStatsSampled))


def _former_side(world: World, host_id: str, vm_name: str) -> bool:
    """Whether `host_id` was the source or destination of any migration of the VM (rare path:
    only a host not involved now is asked)."""
    return any(
        m.vm == vm_name and host_id in (m.source, m.destination) for m in world.migrations.values()
    )


def _stamp_fault(stamp_us: int, now_us: int) -> str | None:
    if stamp_us < 0:
        return f"its time {stamp_us} µs is negative"
    if stamp_us > now_us + MAX_CLOCK_LEAD_US:
        lead_s = (stamp_us - now_us) / 1e6
        return (
            f"its time leads the coordinator's clock by {lead_s:.1f} s "
            f"(at most {MAX_CLOCK_LEAD_US // 1_000_000} s)"
        )
    return None


def check_stamps(host_id: str, events: Sequence[host_pb2.HostEvent], now_us: int) -> Refusal | None:
    """The first event whose own time, or whose snapshot's query time, is negative or leads
    `now_us` by more than the bound (see the module docstring)."""
    limit = now_us + MAX_CLOCK_LEAD_US
    for event in events:
        kind = event.payload.WhichOneof("kind")
        if 0 <= event.time_us <= limit and kind != "vm_observed":
            continue  # the common case, kept cheap: this runs for every event a host sends
        payload = getattr(event.payload, kind) if kind is not None else None
        type_ = payload.DESCRIPTOR.name if payload is not None else "HostEvent"
        stamps = [event.time_us]
        if isinstance(payload, events_pb2.VmObserved):
            stamps.append(payload.observation.queried_at_us)
        for stamp in stamps:
            if (fault := _stamp_fault(stamp, now_us)) is not None:
                return Refusal(host_id, type_, f"seq {event.seq}: {fault}")
    return None


def check_hello(world: World, hello: host_pb2.Hello, now_us: int) -> Refusal | None:
    """A Hello's generation may not leap beyond the host's stored one by more than the bound,
    and its snapshots' query times are checked as any stamp is."""
    for observation in hello.vms:
        if (fault := _stamp_fault(observation.queried_at_us, now_us)) is not None:
            return Refusal(hello.host_id, "Hello", f"the snapshot of {observation.vm}: {fault}")
    host = world.hosts.get(hello.host_id)
    stored = host.generation if host is not None else 0
    if hello.generation > stored + MAX_GENERATION_JUMP:
        reason = (
            f"generation {hello.generation} leaps beyond the stored {stored} by more than "
            f"{MAX_GENERATION_JUMP}"
        )
        return Refusal(hello.host_id, "Hello", reason)
    return None
