"""Safety invariants of DESIGN.md, checked over a sequence of stored events.

Invariants 1-4 (one running copy, the handoff order, no source after cont, leases), 6
(commands answered or superseded), 9 (a host's stream carries only its own observations and
answers to its own commands; anything else is reported and otherwise ignored, so a forged
decision changes nothing the checker believes), 10 (no healthy VM fenced: a fence never names a
destination that runs and holds the whole VM) and 11 (the migration limits: no migration starts
while as many as a limit allows already run) are judged event by event; 8 (every migration
terminal) and the rest of 6 only make sense once the log is quiescent, so
`finish(quiescent=True)` judges them.
Invariants 5 and 7 are properties of the stored envelopes (epochs, chain, seqs, host order):
the audit tool checks those, because they are not visible in decoded events. What the events
do show of 5 is judged here: a host that had seen an epoch newer than any of the log.

A copy is seen running by its RESUME or by a snapshot saying so (QMP events are lost while no
hostd listens), and its first run on a destination is judged as the cont is (invariant 2).

The checker derives what it needs on its own, from observations and intents, without trusting
`MigrationState`: it is the independent witness that tests and the audit tool consult. It reads
a host's QMP data as an object or as nothing; a command of a kind no coordinator issues raises
`UncheckableEvent` (after its bookkeeping for invariant 6), for the caller to report at its seq.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from coordinator.core.events import Event
from coordinator.core.scheduling import DEFAULT_LIMITS, counted
from coordinator.core.state import Kind, Phase
from whimbrel.protocol import HOST_OBSERVATIONS, parse_stream, qmp_event_data
from whimbrel.v1 import common_pb2
from whimbrel.v1 import events_pb2 as E


class UncheckableEvent(ValueError):
    """An event holds a value no coordinator writes, so the checker cannot judge it."""

    def __init__(self, seq: int, problem: str) -> None:
        super().__init__(problem)
        self.seq = seq


def qmp_data(data_json: str) -> dict[str, Any]:
    """A QMP event's data: a JSON object, or nothing (hosts send what QEMU sent)."""
    return qmp_event_data(data_json) or {}


# What an event under a host's origin may be: its observations, and the records of its stream
# beginning and ending (the coordinator writes HostConnected with the hello's origin).
_HOST_ORIGINATED = HOST_OBSERVATIONS | {"HostConnected", "HostDisconnected"}


def _phase(value: int) -> Phase | None:
    """The phase a stored value names; None for one no coordinator writes."""
    try:
        return Phase(value)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Violation:
    seq: int
    invariant: int
    message: str


@dataclass(slots=True)
class _Migration:
    vm: str
    source: str
    destination: str
    source_generation: int
    source_stopped: bool = False
    source_lease_released: bool = False
    destination_generation: int = 0
    destination_network: bool = False
    # The destination's cont commands that may have run (issued, not refused unexecuted), and
    # whether its guest was seen running: either is the point of no return.
    conts: set[str] = field(default_factory=set)
    destination_resumed: bool = False
    # The destination QEMU's last migration status ("completed": it holds the whole VM).
    destination_status: str = ""
    requested_seq: int = 0

    @property
    def past_cont(self) -> bool:
        return bool(self.conts) or self.destination_resumed


@dataclass(frozen=True, slots=True)
class _Pending:
    seq: int
    host: str
    kind: int
    owner: str  # migration id, or "vm/<name>"
    attempt: int


@dataclass
class InvariantChecker:
    violations: list[Violation] = field(default_factory=list)
    running: dict[str, set[str]] = field(default_factory=dict)
    lease_holder: dict[str, str] = field(default_factory=dict)
    # The seq of the lease's last acquire or release, per VM, to name both ends of a violation.
    lease_changed_at: dict[str, int] = field(default_factory=dict)
    # The generation the holder in `lease_holder` acquired, per VM.
    holder_generation: dict[str, int] = field(default_factory=dict)
    # Acquires logged while another host held the lease, by (VM, that holder, its generation):
    # the seq and the acquirer. The lockspace refuses a held lease, so the holder's release
    # happened first; its report can still be appended after the acquire (the hosts' streams
    # are not ordered among themselves). The release settles it; none by the end is a
    # violation.
    acquired_over: dict[tuple[str, str, int], tuple[int, str]] = field(default_factory=dict)
    # Highest generation seen acquired (observed), and highest handed out in commands (issued).
    observed_generation: dict[str, int] = field(default_factory=dict)
    issued_generation: dict[str, int] = field(default_factory=dict)
    migrations: dict[str, _Migration] = field(default_factory=dict)
    open_by_vm: dict[str, str] = field(default_factory=dict)
    # Invariant 6: commands without a result yet, and the hosts whose stream is open.
    unanswered: dict[str, _Pending] = field(default_factory=dict)
    connected_hosts: set[str] = field(default_factory=set)
    finished: set[str] = field(default_factory=set)
    # Invariant 11: the limits in force, and the migrations started and not finished.
    limits: common_pb2.MigrationLimits = field(default_factory=lambda: DEFAULT_LIMITS)
    started: set[str] = field(default_factory=set)
    # Invariant 9: the host each command was issued to, to judge who answers it.
    issued_to: dict[str, str] = field(default_factory=dict)
    # Invariant 5: the newest epoch this log was written under so far.
    top_epoch: int = 0

    def check(self, events: list[Event]) -> list[Violation]:
        for event in events:
            self.feed(event)
        return self.violations

    def check_quiescent(self, events: list[Event]) -> list[Violation]:
        """`check`, then judge the log as finished: nothing may still be in flight."""
        self.check(events)
        return self.finish(quiescent=True)

    def finish(self, *, quiescent: bool) -> list[Violation]:
        """End-of-log judgement. A quiescent log (nothing in flight: the system was stopped or
        settled) must have every migration terminal (8) and every command answered or
        superseded (6)."""
        if quiescent:
            self.violations += self.unsettled_acquires()
            for migration_id, m in self.migrations.items():
                if migration_id not in self.finished:
                    self.violations.append(
                        Violation(m.requested_seq, 8, f"migration {migration_id} never finished")
                    )
            for command_id, pending in self.unanswered.items():
                self.violations.append(
                    Violation(
                        pending.seq,
                        6,
                        f"command {command_id} on {pending.host} never answered nor superseded",
                    )
                )
        self.violations.sort(key=lambda v: v.seq)
        return self.violations

    def unsettled_acquires(self) -> list[Violation]:
        """Acquires of a lease another host held whose holder's release never came (invariant
        4); in a log still being written it may yet come."""
        return [
            Violation(seq, 4, f"{acquirer} acquired the lease of {vm} held by {holder}")
            for (vm, holder, _), (seq, acquirer) in self.acquired_over.items()
        ]

    def _flag(self, event: Event, invariant: int, message: str) -> None:
        self.violations.append(Violation(event.seq, invariant, message))

    def feed(self, ev: Event) -> None:
        p = ev.payload
        self.top_epoch = max(self.top_epoch, ev.epoch)
        if ev.origin_host and not self._host_may_say(ev):
            return  # a host's word on what only the coordinator decides changes nothing
        if isinstance(p, E.MigrationRequested):
            self.migrations[p.migration_id] = _Migration(
                p.vm, p.source, p.destination, p.source_lease_generation, requested_seq=ev.seq
            )
            self.open_by_vm[p.vm] = p.migration_id
        elif isinstance(p, E.MigrationFinished):
            phase = _phase(p.phase)
            if phase is None or not phase.terminal:
                named = phase.label if phase is not None else p.phase
                self._flag(ev, 8, f"migration {p.migration_id} finished in phase {named}")
            m = self.migrations.get(p.migration_id)
            if m is not None and self.open_by_vm.get(m.vm) == p.migration_id:
                del self.open_by_vm[m.vm]
            self.finished.add(p.migration_id)
            self.started.discard(p.migration_id)
            self._finished_with_unanswered(ev, p.migration_id)
        elif isinstance(p, E.MigrationLimitsSet):
            self.limits = p.limits
        elif isinstance(p, E.MigrationAdmitted):
            self._starts(ev, p.migration_id)
        elif isinstance(p, (E.CommandSucceeded, E.CommandFailed)):
            self._result(ev, p)
        elif isinstance(p, E.HostConnected):
            if p.highest_epoch_seen > self.top_epoch:
                self._flag(ev, 5, f"host {p.host_id} had seen epoch {p.highest_epoch_seen}, "
                                  f"newer than any of this log ({self.top_epoch})")  # fmt: skip
            self.connected_hosts.add(p.host_id)
        elif isinstance(p, E.HostDisconnected):
            self.connected_hosts.discard(p.host_id)
        elif isinstance(p, E.QmpEventReceived):
            self._qmp(ev, p)
        elif isinstance(p, E.QemuExited):
            self.running.setdefault(p.vm, set()).discard(ev.origin_host)
            m = self._open(p.vm)
            if m is not None and ev.origin_host == m.source:
                m.source_stopped = True
        elif isinstance(p, E.VmObserved):
            obs = p.observation
            running = obs.process_alive and obs.runstate == "running"
            known = obs.runstate or not obs.process_alive  # alive with QMP unreachable: unknown
            if running:
                # The RESUME may have come while no hostd listened: this is then its only word.
                self._ran(ev, obs.vm, ev.origin_host, "its snapshot")
            elif known:
                self.running.setdefault(obs.vm, set()).discard(ev.origin_host)
            # A hostd that restarted reports its VMs as they are: the source's STOP may have
            # come while no hostd listened, and this observation is then the only word of it.
            m = self._open(obs.vm)
            if m is not None and ev.origin_host == m.source and known:
                m.source_stopped = not running
        elif isinstance(p, E.LeaseAcquired):
            holder = self.lease_holder.get(p.vm, "")
            if holder and holder != p.holder:
                held = (p.vm, holder, self.holder_generation.get(p.vm, 0))
                self.acquired_over[held] = (ev.seq, p.holder)
            if p.generation <= self.observed_generation.get(p.vm, 0):
                self._flag(ev, 4, f"lease generation of {p.vm} did not grow: {p.generation}")
            issued = self.issued_generation.get(p.vm, 0)
            if p.generation > issued:
                self._flag(ev, 4, f"{p.holder} took the lease of {p.vm} at generation "
                                  f"{p.generation}, above any handed out ({issued})")  # fmt: skip
            self.lease_holder[p.vm] = p.holder
            self.holder_generation[p.vm] = p.generation
            self.lease_changed_at[p.vm] = ev.seq
            self.observed_generation[p.vm] = p.generation
            m = self._open(p.vm)
            if m is not None and p.holder == m.destination:
                m.destination_generation = p.generation
            elif m is not None and p.holder == m.source:
                m.source_lease_released = False  # taken back (a rollback)
        elif isinstance(p, E.LeaseReleased):
            self.acquired_over.pop((p.vm, p.holder, p.generation), None)
            if self.lease_holder.get(p.vm) == p.holder:
                self.lease_holder[p.vm] = ""
                self.lease_changed_at[p.vm] = ev.seq
            m = self._open(p.vm)
            if m is not None and p.holder == m.source:
                m.source_lease_released = True
            elif m is not None and p.holder == m.destination:
                m.destination_generation = 0
        elif isinstance(p, E.NetworkChanged):
            m = self._open(p.vm)
            if m is not None and ev.origin_host == m.destination:
                m.destination_network = p.state == E.NETWORK_STATE_ENABLED
        elif isinstance(p, E.CommandIssued):
            self._command(ev, p)
        elif isinstance(p, E.FencingDecided):
            self._fenced(ev, p)
        elif isinstance(p, E.RollbackDecided):
            m = self.migrations.get(p.migration_id)
            if m is not None and m.past_cont:
                self._flag(ev, 3, f"rollback of {p.migration_id} after the destination's cont")

    def _host_may_say(self, ev: Event) -> bool:
        """Invariant 9: a host's stream carries only its observations, about itself, and answers
        only the commands sent to it (`_result`)."""
        p, host = ev.payload, ev.origin_host
        kind = type(p).__name__
        if kind not in _HOST_ORIGINATED:
            self._flag(ev, 9, f"host {host} sent a {kind}: only the coordinator makes those")
            return False
        stream = parse_stream(ev.stream)
        if stream is not None and stream[0] == "host" and stream[1] != host:
            self._flag(ev, 9, f"host {host} spoke on the stream of host {stream[1]}")
            return False
        if isinstance(p, (E.LeaseAcquired, E.LeaseReleased)) and p.holder != host:
            self._flag(ev, 9, f"host {host} reported the lease of {p.vm} for {p.holder}")
            return False
        return True

    def _result(self, ev: Event, p: E.CommandSucceeded | E.CommandFailed) -> None:
        if ev.origin_host:
            issued_to = self.issued_to.get(p.command_id)
            if issued_to is None:
                self._flag(ev, 9, f"host {ev.origin_host} answered command {p.command_id}, "
                                  "never issued")  # fmt: skip
                return
            if issued_to != ev.origin_host:
                self._flag(ev, 9, f"host {ev.origin_host} answered command {p.command_id}, "
                                  f"issued to {issued_to}")  # fmt: skip
                return
        pending = self.unanswered.get(p.command_id)
        if pending is None:
            return
        if ev.origin_host and p.attempt != pending.attempt:
            self._flag(ev, 9, f"host {ev.origin_host} answered command {p.command_id} of "
                              f"attempt {pending.attempt} as attempt {p.attempt}")  # fmt: skip
            return
        del self.unanswered[p.command_id]
        owner = self.migrations.get(pending.owner)
        if owner is not None and isinstance(p, E.CommandFailed) and p.rejected:
            owner.conts.discard(p.command_id)  # refused before it reached QEMU
        m = owner if owner is not None else self._open(pending.owner.removeprefix("vm/"))
        resumed = isinstance(p, E.CommandSucceeded) and pending.kind == Kind.RESUME_VM
        if m is not None and resumed and pending.host == m.source and m.past_cont:
            self._flag(ev, 3, f"source {m.source} resumed (its cont succeeded) after the "
                              "destination's cont")  # fmt: skip

    def _fenced(self, ev: Event, p: E.FencingDecided) -> None:
        """Invariant 10: a fence kills copies that cannot be the VM, never a destination that
        runs with the whole VM (it completed loading and resumed): that copy is healthy."""
        m = self.migrations.get(p.migration_id)
        if m is None or m.destination not in p.hosts:
            return
        if m.destination_status == "completed" and m.destination in self.running.get(m.vm, ()):
            message = (f"fence of {m.vm} names destination {m.destination}, which runs with the "
                       "whole VM (completed and resumed): a healthy VM killed")  # fmt: skip
            self._flag(ev, 10, message)

    def _starts(self, ev: Event, migration_id: str) -> None:
        """Invariant 11: a migration starts only while fewer than each limit run."""
        m = self.migrations.get(migration_id)
        if m is None or migration_id in self.started:
            return
        running = [self.migrations[mid] for mid in self.started]
        limit = self.limits
        counts = (
            ("in the cluster", len(running), limit.cluster),
            (f"out of {m.source}", sum(r.source == m.source for r in running),
             limit.per_host_outbound),
            (f"into {m.destination}", sum(r.destination == m.destination for r in running),
             limit.per_host_inbound),
        )  # fmt: skip
        for where, count, most in counts:
            if most and count >= most:
                message = (f"migration {migration_id} started while "
                           f"{counted(count, 'migration')} ran {where} (limit {most})")  # fmt: skip
                self._flag(ev, 11, message)
        self.started.add(migration_id)

    def _finished_with_unanswered(self, ev: Event, migration_id: str) -> None:
        """A migration's end supersedes the commands it still waited for on hosts that were
        gone (the decision could not wait for them); a command on a connected host that was
        never answered means the coordinator stopped listening to it (invariant 6)."""
        for command_id, pending in list(self.unanswered.items()):
            if pending.owner != migration_id:
                continue
            del self.unanswered[command_id]
            if pending.host in self.connected_hosts:
                message = (
                    f"migration {migration_id} finished while command {command_id} on "
                    f"connected host {pending.host} was unanswered"
                )
                self._flag(ev, 6, message)

    def _open(self, vm: str) -> _Migration | None:
        mid = self.open_by_vm.get(vm)
        return self.migrations.get(mid) if mid else None

    def _runs(self, ev: Event, vm: str, host: str) -> None:
        hosts = self.running.setdefault(vm, set())
        others = hosts - {host}
        if others:
            self._flag(ev, 1, f"{vm} runs on {host} while it runs on {', '.join(sorted(others))}")
        hosts.add(host)

    def _ran(self, ev: Event, vm: str, host: str, seen: str) -> None:
        """`vm` was seen running on `host` (`seen`: how): one copy (1), the destination only
        after the whole handoff (2), never the source after the destination's cont (3), and
        only where the lease is held (4)."""
        self._runs(ev, vm, host)
        m = self._open(vm)
        if m is not None and host == m.destination:
            if not m.destination_resumed and (missing := self._handoff_missing(m)):
                self._flag(ev, 2, f"destination {host} ran ({seen}) before: {', '.join(missing)}")
            m.destination_resumed = True
        elif m is not None and host == m.source:
            if m.past_cont:
                self._flag(ev, 3, f"source {m.source} ran ({seen}) after the destination's cont")
            m.source_stopped = False
        holder = self.lease_holder.get(vm, "")
        if vm in self.lease_holder and holder != host:
            # What the lease is for: the VM's disks are only written where it is held.
            state = f"held by {holder}" if holder else "released"
            since = self.lease_changed_at.get(vm, 0)
            self._flag(ev, 4, f"{vm} ran ({seen}) on {host} while the lease is {state} "
                              f"(since seq {since})")  # fmt: skip

    def _handoff_missing(self, m: _Migration) -> list[str]:
        """What of the handoff (invariant 2) is not done yet; the destination may run only once
        nothing is, and only then be sent its cont."""
        in_flight = [
            pending
            for pending in self.unanswered.values()
            if pending.host == m.source
            and pending.kind in (Kind.RESUME_VM, Kind.CANCEL_MIGRATION)
            and pending.owner in (self.open_by_vm.get(m.vm), f"vm/{m.vm}")
        ]
        return [
            what
            for what, ok in (
                ("source stopped", m.source_stopped and not in_flight),
                ("source lease released", m.source_lease_released),
                (
                    "destination lease with a higher generation",
                    m.destination_generation > m.source_generation,
                ),
                ("destination networking enabled", m.destination_network),
            )
            if not ok
        ]

    def _qmp(self, ev: Event, p: E.QmpEventReceived) -> None:
        m = self._open(p.vm)
        if p.event == "RESUME":
            self._ran(ev, p.vm, ev.origin_host, "RESUME")
        elif p.event in ("STOP", "SHUTDOWN"):
            self.running.setdefault(p.vm, set()).discard(ev.origin_host)
            if m is not None and ev.origin_host == m.source and p.event == "STOP":
                m.source_stopped = True
        elif p.event == "MIGRATION" and m is not None and ev.origin_host == m.source:
            status = qmp_data(p.data_json).get("status")
            if status in ("pre-switchover", "postcopy-active", "completed"):
                m.source_stopped = True
        elif p.event == "MIGRATION" and m is not None and ev.origin_host == m.destination:
            m.destination_status = str(qmp_data(p.data_json).get("status", ""))

    def _command(self, ev: Event, p: E.CommandIssued) -> None:
        host, vm = p.host_id, p.vm
        self.issued_to[p.command_id] = host
        owner = p.migration_id or f"vm/{vm}"
        # A new command of the same kind for the same owner and host supersedes an unanswered one.
        for command_id, pending in list(self.unanswered.items()):
            if (pending.owner, pending.host, pending.kind) == (owner, host, p.kind):
                del self.unanswered[command_id]
        self.unanswered[p.command_id] = _Pending(ev.seq, host, p.kind, owner, p.attempt)
        if p.migration_id in self.finished:
            self._flag(ev, 8, f"{p.command_id} issued after migration {p.migration_id} ended")
        try:
            kind = Kind(p.kind)
        except ValueError:
            message = f"command {p.command_id} on {host} has unknown kind {p.kind}"
            raise UncheckableEvent(ev.seq, message) from None
        generation = p.args.lease_generation
        if kind in (Kind.ACQUIRE_LEASE, Kind.START_VM):
            floor = max(self.issued_generation.get(vm, 0), self.observed_generation.get(vm, 0))
            if generation <= floor:
                message = f"{kind.label} on {host} with generation {generation} not above {floor}"
                self._flag(ev, 4, message)
            holder = self.lease_holder.get(vm, "")
            if holder and holder != host:
                self._flag(ev, 4, f"{kind.label} for {vm} on {host} while {holder} holds the lease")
            self.issued_generation[vm] = generation
        if kind in (Kind.RESUME_VM, Kind.START_VM):
            others = self.running.get(vm, set()) - {host}
            if others:
                self._flag(
                    ev,
                    1,
                    f"{kind.label} of {vm} on {host} while it runs on {', '.join(sorted(others))}",
                )
        holder = self.lease_holder.get(vm, "")
        if kind == Kind.RESUME_VM and vm in self.lease_holder and holder != host:
            state = f"held by {holder}" if holder else "released"
            self._flag(ev, 4, f"resume-vm of {vm} on {host} while the lease is {state}")
        if (
            p.migration_id
            and p.migration_id not in self.started
            and p.migration_id not in self.finished
        ):
            self._starts(ev, p.migration_id)  # a command without admission starts it too
        # A command of the VM's own (no migration id) while a migration is open is judged as
        # that migration's: it can resume or cancel a side just the same.
        m = self.migrations.get(p.migration_id) if p.migration_id else self._open(vm)
        if m is None:
            return
        if kind == Kind.RESUME_VM and host == m.destination:
            missing = self._handoff_missing(m)
            if missing:
                self._flag(ev, 2, f"cont on destination {host} before: {', '.join(missing)}")
            m.conts.add(p.command_id)
        elif m.past_cont and kind == Kind.RESUME_VM and host == m.source:
            self._flag(ev, 3, f"source {host} resumed after the destination's cont")
        elif m.past_cont and kind == Kind.CANCEL_MIGRATION:
            self._flag(ev, 3, "migrate_cancel after the destination's cont")
