"""A pure model of hosts and QEMU, and an in-memory driver of the core.

`SimHosts.answer(command)` returns the observations a real hostd and QEMU 7.2 produce for a
command (orders and statuses follow ../shared/qmp-transcripts). `Driver` keeps an in-memory log,
folds it with `evolve`, asks `decide` for next steps and lets the hosts answer: the whole
coordinator loop with no I/O. Unit tests, the property tests and the replay benchmark's log
generator use it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf.message import Message

from coordinator.core import Event, NewEvent, World, decide, evolve
from coordinator.core import inputs as I
from coordinator.core.state import Kind
from hostd.vm import SWITCHOVER_STATUSES
from whimbrel.protocol import DISARMING, DISARMING_INCOMING, host_stream
from whimbrel.v1 import common_pb2, events_pb2

if TYPE_CHECKING:
    from coordinator.log import SqliteEventStore

E = events_pb2


@dataclass(slots=True)
class Observation:
    host: str
    payload: Message


def qmp(host: str, vm: str, name: str, **data: object) -> Observation:
    return Observation(host, E.QmpEventReceived(vm=vm, event=name, data_json=json.dumps(data)))


def migration(host: str, vm: str, status: str) -> Observation:
    return qmp(host, vm, "MIGRATION", status=status)


# Commands hostd can execute with no QEMU process for the VM.
_WITHOUT_QEMU = frozenset({Kind.RELEASE_LEASE, Kind.ACQUIRE_LEASE, Kind.ENABLE_NETWORK})
# Commands that disarm hostd's release at the switchover, and its enable at postcopy-active.
_DISARMING = frozenset(Kind(kind) for kind in DISARMING)
_DISARMING_INCOMING = frozenset(Kind(kind) for kind in DISARMING_INCOMING)


@dataclass
class SimHosts:
    """Answers commands the way hostd + QEMU would, with no failures unless told."""

    # Passes pre-copy needs before it fits the downtime limit (0: never converges).
    converge_after_passes: int = 2
    fail_kinds: set[int] = field(default_factory=set)
    leases: dict[str, tuple[str, int]] = field(default_factory=dict)
    # VM -> the host of its incoming (destination) QEMU, which reports statuses too.
    incoming: dict[str, str] = field(default_factory=dict)
    # (vm, host) whose QEMU was killed: commands needing it fail, as hostd's would.
    dead: set[tuple[str, str]] = field(default_factory=set)
    # The migration link is down: a source's resume falls back to postcopy-paused.
    link_down: bool = False
    # QEMU 7.2 as observed with a relay that drops every new connection: the source's resume
    # sits in postcopy-recover for good, and refuses another resume.
    resume_hangs: bool = False
    stuck: set[str] = field(default_factory=set)
    # hostd releases the source's lease at the switchover stop when START_MIGRATION asks it to
    # (False: a hostd that restarted and forgot, so the coordinator's command does it).
    release_at_switchover: bool = True
    armed: set[tuple[str, str]] = field(default_factory=set)
    # hostd continues a source stopped in pre-switchover when START_MIGRATION asks it to
    # (False: a hostd that restarted and forgot, so the coordinator's command does it).
    continue_at_pre_switchover: bool = True
    armed_continue: set[tuple[str, str]] = field(default_factory=set)
    # hostd enables a destination's networking at its postcopy-active when PREPARE_INCOMING
    # asks it to (False: a hostd that restarted and forgot); (vm, host) armed, and enabled.
    enable_at_postcopy: bool = True
    armed_incoming: set[tuple[str, str]] = field(default_factory=set)
    network_enabled: set[tuple[str, str]] = field(default_factory=set)

    def kill(self, vm: str, host: str) -> Observation:
        self.dead.add((vm, host))
        return self._exited(host, vm, -1, signal=9)

    def _postcopy(self, host: str, vm: str) -> list[Observation]:
        """The source switches to post-copy: postcopy-active, then its STOP."""
        out = [migration(host, vm, "postcopy-active"), qmp(host, vm, "STOP")]
        out += self.switchover(host, vm, "postcopy-active")
        return out + self._on_destination(vm, "postcopy-active")

    def switchover(self, host: str, vm: str, status: str) -> list[Observation]:
        """What hostd does by itself once the stopped source reports `status`: it continues
        from pre-switchover, and releases the lease where QEMU can no longer resume the source
        by itself."""
        if status == "pre-switchover" and (vm, host) in self.armed_continue:
            self.armed_continue.discard((vm, host))
            return self._continued(host, vm)
        if (vm, host) not in self.armed or status not in SWITCHOVER_STATUSES:
            return []
        self.armed.discard((vm, host))
        return self._release(host, vm) if self.leases.get(vm, ("", 0))[0] == host else []

    def answer(self, cmd: E.CommandIssued) -> list[Observation]:
        h, vm, kind = cmd.host_id, cmd.vm, Kind(cmd.kind)
        if kind in _DISARMING:
            self.armed.discard((vm, h))
            self.armed_continue.discard((vm, h))
        if kind in _DISARMING_INCOMING:
            self.armed_incoming.discard((vm, h))
        if kind in self.fail_kinds:
            return [self._failed(cmd, f"simulated failure of {kind.label}")]
        if kind in (Kind.START_VM, Kind.PREPARE_INCOMING):
            self.dead.discard((vm, h))
        elif (vm, h) in self.dead and kind not in _WITHOUT_QEMU:
            if kind == Kind.DESTROY_VM:
                # hostd releases what the host holds for the VM even when QEMU is already gone.
                held = self.leases.get(vm, ("", 0))[0] == h
                return [*(self._release(h, vm) if held else []), self._ok(cmd)]
            return [self._failed(cmd, "QEMU is not running")]
        out: list[Observation] = []
        if kind == Kind.START_VM:
            out += self._acquire(h, vm, cmd.args.lease_generation)
            out.append(qmp(h, vm, "RESUME"))
        elif kind == Kind.STOP_VM:
            self.dead.add((vm, h))
            out += [qmp(h, vm, "SHUTDOWN", guest=False), self._exited(h, vm, 0)]
            out += self._release(h, vm)
        elif kind == Kind.PREPARE_INCOMING:
            self.incoming[vm] = h
            self.network_enabled.discard((vm, h))
            if cmd.args.enable_network_at_postcopy and self.enable_at_postcopy:
                self.armed_incoming.add((vm, h))
            out.append(Observation(h, E.NetworkChanged(vm=vm, state=E.NETWORK_STATE_PREPARED)))
            out.append(migration(h, vm, "setup"))
            return [*out, self._ok(cmd, uri="tcp:127.0.0.1:49152", pid=1000)]
        elif kind == Kind.START_MIGRATION:
            if cmd.args.release_lease_at_switchover and self.release_at_switchover:
                self.armed.add((vm, h))
            if cmd.args.continue_at_pre_switchover and self.continue_at_pre_switchover:
                self.armed_continue.add((vm, h))
            out += [
                migration(h, vm, "setup"),
                self._ok(cmd),
                qmp(h, vm, "MIGRATION_PASS", **{"pass": 1}),
            ]
            out += [migration(h, vm, "active")]
            if cmd.args.start_postcopy:
                out += self._postcopy(h, vm)
            return out
        elif kind == Kind.START_POSTCOPY:
            out += self._postcopy(h, vm)
        elif kind == Kind.RELEASE_LEASE:
            out += self._release(h, vm)
        elif kind == Kind.ACQUIRE_LEASE:
            holder = self.leases.get(vm)
            if holder is not None and holder[0] and holder[0] != h:
                return [self._failed(cmd, f"lease held by {holder[0]}")]
            out += self._acquire(h, vm, cmd.args.lease_generation)
        elif kind == Kind.CONTINUE_SWITCHOVER:
            out += self._continued(h, vm)
        elif kind == Kind.ENABLE_NETWORK:
            out += self._enable_network(h, vm)
        elif kind == Kind.RESUME_VM:
            out.append(qmp(h, vm, "RESUME"))
        elif kind == Kind.DESTROY_VM:
            self.dead.add((vm, h))
            out.append(self._exited(h, vm, -1, signal=9))
            if self.leases.get(vm, ("", 0))[0] == h:
                out += self._release(h, vm)
        elif kind == Kind.CANCEL_MIGRATION:
            out += [migration(h, vm, "cancelling"), migration(h, vm, "cancelled")]
            out += self._on_destination(vm, "failed")
        elif kind == Kind.PAUSE_MIGRATION:
            out.append(migration(h, vm, "postcopy-paused"))  # sent only to a postcopy-active end
        elif kind == Kind.RECOVER_INCOMING:
            # QEMU 7.2 says setup in an event while the destination stays postcopy-paused
            # until a source connects; a repeat (its resume lost, say) is accepted.
            return [migration(h, vm, "setup"), self._ok(cmd, uri="tcp:127.0.0.1:49153")]
        elif kind == Kind.RESUME_MIGRATION:
            if vm in self.stuck:
                return [self._failed(cmd, "Cannot resume if there is no paused migration")]
            if self.resume_hangs:
                self.stuck.add(vm)
                return [migration(h, vm, "postcopy-recover"), self._ok(cmd)]
            if self.link_down:
                out += [migration(h, vm, "postcopy-recover"), migration(h, vm, "postcopy-paused")]
                return [*out, self._ok(cmd)]
            out += [migration(h, vm, "postcopy-recover"), migration(h, vm, "postcopy-active")]
            out += self._on_destination(vm, "postcopy-active")
        return [*out, self._ok(cmd)]

    def _continued(self, host: str, vm: str) -> list[Observation]:
        """migrate-continue from pre-switchover: the switch completes on both ends."""
        out = [migration(host, vm, "device"), migration(host, vm, "completed")]
        out += self.switchover(host, vm, "completed")
        return out + self._on_destination(vm, "completed")

    def _on_destination(self, vm: str, *statuses: str) -> list[Observation]:
        host = self.incoming.get(vm)
        if not host:
            return []
        out = []
        for status in statuses:
            out.append(migration(host, vm, status))
            if status == "postcopy-active" and (vm, host) in self.armed_incoming:
                self.armed_incoming.discard((vm, host))
                out += self._enable_network(host, vm)
        return out

    def _enable_network(self, host: str, vm: str) -> list[Observation]:
        """hostd runs the enable phase once; a repeat succeeds without reporting again."""
        if (vm, host) in self.network_enabled:
            return []
        self.network_enabled.add((vm, host))
        return [Observation(host, E.NetworkChanged(vm=vm, state=E.NETWORK_STATE_ENABLED))]

    def _acquire(self, host: str, vm: str, generation: int) -> list[Observation]:
        self.leases[vm] = (host, generation)
        return [Observation(host, E.LeaseAcquired(vm=vm, holder=host, generation=generation))]

    def _release(self, host: str, vm: str) -> list[Observation]:
        _, generation = self.leases.get(vm, ("", 0))
        self.leases[vm] = ("", generation)
        return [Observation(host, E.LeaseReleased(vm=vm, holder=host, generation=generation))]

    @staticmethod
    def _exited(host: str, vm: str, code: int, signal: int = 0) -> Observation:
        return Observation(host, E.QemuExited(vm=vm, pid=1000, exit_code=code, signal=signal))

    @staticmethod
    def _ok(cmd: E.CommandIssued, **result: object) -> Observation:
        return Observation(
            cmd.host_id,
            E.CommandSucceeded(
                command_id=cmd.command_id,
                attempt=cmd.attempt,
                kind=cmd.kind,
                vm=cmd.vm,
                result=E.CommandResult(**result),  # type: ignore[arg-type]
            ),
        )

    @staticmethod
    def _failed(cmd: E.CommandIssued, error: str) -> Observation:
        return Observation(
            cmd.host_id,
            E.CommandFailed(
                command_id=cmd.command_id,
                attempt=cmd.attempt,
                kind=cmd.kind,
                vm=cmd.vm,
                error=error,
            ),
        )


# The coordinator advances every open migration this often (coordinator.app).
TICK_US = 1_000_000


@dataclass
class Driver:
    """An in-memory coordinator: log, fold, decide, and (optionally) simulated hosts."""

    world: World = field(default_factory=World)
    log: list[Event] = field(default_factory=list)
    now_us: int = 1_700_000_000_000_000
    host_seq: dict[str, int] = field(default_factory=dict)
    epoch: int = 1
    answered: set[str] = field(default_factory=set)

    def append(self, events: Iterable[NewEvent]) -> list[Event]:
        stored = []
        for new in events:
            self.now_us += 1000
            event = Event(
                seq=len(self.log) + 1,
                stream=new.stream,
                type=new.type,
                epoch=self.epoch,
                time_us=new.time_us or self.now_us,
                payload=new.payload,
                origin_host=new.origin_host,
                origin_generation=new.origin_generation,
                origin_seq=new.origin_seq,
            )
            self.log.append(event)
            evolve(self.world, event)
            stored.append(event)
        return stored

    def observe(self, *observations: Observation) -> list[Event]:
        stored = []
        for obs in observations:
            seq = self.host_seq[obs.host] = self.host_seq.get(obs.host, 0) + 1
            self.now_us += 1000
            stored += self.append(
                [NewEvent(host_stream(obs.host), obs.payload, self.now_us, obs.host, 1, seq)]
            )
        return stored

    def request(self, request: I.Input) -> list[Event]:
        return self.append(decide(self.world, request))

    def connect(self, *hosts: str) -> None:
        for host in hosts:
            self.observe(
                Observation(
                    host, E.HostConnected(host_id=host, generation=1, migration_address="127.0.0.1")
                )
            )

    def advance(self, migration_id: str) -> list[Event]:
        """Decide until nothing more is decided; returns what was appended."""
        appended: list[Event] = []
        while True:
            step = self.append(decide(self.world, I.Advance(migration_id, self.now_us)))
            if not step:
                return appended
            appended += step

    def run(self, migration_id: str, hosts: SimHosts, max_rounds: int = 200) -> list[Event]:
        """Advance and let the hosts answer every new command until nothing changes."""
        appended: list[Event] = []
        answered = self.answered
        ticked = False
        for _ in range(max_rounds):
            decided = self.advance(migration_id)
            appended += decided
            commands = [
                e.payload
                for e in self.log
                if isinstance(e.payload, E.CommandIssued)
                and e.payload.migration_id == migration_id
                and e.payload.command_id not in answered
            ]
            if not commands:
                if ticked or self.world.migrations[migration_id].phase.terminal:
                    return appended
                # Nothing to answer: a second passes, as the coordinator's tick lets it
                # (decisions that wait for a report that may never come).
                self.now_us += TICK_US
                ticked = True
                continue
            ticked = False
            for cmd in commands:
                answered.add(cmd.command_id)
                appended += self.observe(*hosts.answer(cmd))
                appended += self._progress(migration_id, cmd, hosts)
        raise AssertionError(f"migration {migration_id} did not settle in {max_rounds} rounds")

    def _progress(self, migration_id: str, cmd: E.CommandIssued, hosts: SimHosts) -> list[Event]:
        """QEMU's own progress after START_MIGRATION: passes until pre-copy converges."""
        if Kind(cmd.kind) != Kind.START_MIGRATION or Kind.START_MIGRATION in hosts.fail_kinds:
            return []
        if cmd.args.start_postcopy:
            return []  # it switched at once, in its answer: no pre-copy passes follow
        m = self.world.migrations[migration_id]
        src, dst, vm = m.source, m.destination, m.vm
        out = self.observe(migration(dst, vm, "active"))
        remaining = 128 << 20
        for n in range(2, 12):
            out += self.observe(qmp(src, vm, "MIGRATION_PASS", **{"pass": n}))
            converged = hosts.converge_after_passes and n > hosts.converge_after_passes
            remaining = remaining // 4 if hosts.converge_after_passes else remaining
            out += self.observe(
                Observation(
                    src,
                    E.MigrationStatsSampled(
                        vm=vm,
                        status="active",
                        total_bytes=134217728,
                        transferred_bytes=n << 27,
                        remaining_bytes=remaining,
                        mbps=800.0,
                        **sampled_pass(n),
                    ),
                )
            )
            out += self.advance(migration_id)
            if m.postcopy_requested or m.phase.terminal:
                return out
            if converged:
                out += self.observe(
                    qmp(src, vm, "STOP"),
                    migration(src, vm, "pre-switchover"),
                    *hosts.switchover(src, vm, "pre-switchover"),
                )
                return out
        return out


def sampled_pass(n: int) -> dict[str, Any]:
    """`pass` is a Python keyword: a sample's pass, as keyword arguments."""
    return {"pass": n}


def running_vm(driver: Driver, name: str = "vm-1", host: str = "host-a") -> None:
    """Define `name` and start it on `host`, answering as a host would."""
    spec = common_pb2.VmSpec(name=name, memory_mib=128, vcpus=1)
    driver.request(I.DefineVm(spec, driver.now_us))
    (start,) = driver.request(I.StartVm(name, host, driver.now_us))
    assert isinstance(start.payload, E.CommandIssued)
    driver.observe(*SimHosts().answer(start.payload))


def store_log(events: Iterable[Event], path: Path) -> SqliteEventStore:
    """Write a simulated history into a real SQLite log (under a fresh epoch), as the
    coordinator would have; for tests and tools that need a log file."""
    from coordinator import codec
    from coordinator.log import SqliteEventStore

    store = SqliteEventStore(path)
    store.begin_epoch(
        lambda epoch: codec.to_pending(
            NewEvent("coordinator", events_pb2.CoordinatorStarted(epoch=epoch), 1)
        )
    )
    copies = [
        NewEvent(e.stream, e.payload, e.time_us, e.origin_host, e.origin_generation, e.origin_seq)
        for e in events
    ]
    store.append([codec.to_pending(new) for new in copies])
    return store
