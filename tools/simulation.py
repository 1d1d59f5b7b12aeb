"""Deterministic simulation of the whole system around the pure core.

The coordinator is the core plus an in-memory log (`tools.sim.Driver`); hosts and their QEMUs
are `tools.sim.SimHosts`. A scheduler picks, step by step, what happens next: a host answers a
command (in order or out of order), an answer is lost with its stream or arrives twice, a command
fails, QEMU converges, completes, pauses post-copy or is killed, a host disconnects or
reconnects, an operator aborts or switches to post-copy, or the coordinator crashes and a new one
replays the log under a higher epoch. `settle` then lets everything run fault-free: every
migration must reach a terminal state and every invariant must hold.

Every choice comes from one source, so a run is a function of its seed:
`python -m tools.simulation --seed N` replays a failing one. The hypothesis state machine in
`tests/unit/test_simulation.py` drives the same actions.
"""

from __future__ import annotations

import argparse
import contextlib
import pickle
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from coordinator.core import CoreError, NewEvent, World
from coordinator.core import inputs as I
from coordinator.core.evolve import evolve
from coordinator.core.invariants import InvariantChecker, Violation
from coordinator.core.state import CommandState, Kind
from tools.sim import TICK_US, Driver, Observation, SimHosts, migration, qmp, running_vm
from whimbrel.v1 import common_pb2 as C
from whimbrel.v1 import events_pb2 as E

HOSTS = ("host-a", "host-b")
MODES = [C.MIGRATION_MODE_PRECOPY, C.MIGRATION_MODE_POSTCOPY, C.MIGRATION_MODE_AUTO]


@dataclass
class Simulation:
    mode: int = C.MIGRATION_MODE_PRECOPY
    driver: Driver = field(default_factory=Driver)
    hosts: SimHosts = field(default_factory=SimHosts)
    # Commands delivered to hosts and not yet answered, in delivery order.
    pending: list[E.CommandIssued] = field(default_factory=list)
    answered: list[E.CommandIssued] = field(default_factory=list)
    connected: set[str] = field(default_factory=lambda: set(HOSTS))
    recovering: bool = False
    restarts: int = 0
    # Per host: observations made while its stream was down, re-sent on reconnect.
    outbox: dict[str, list[Observation]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.driver.connect(*HOSTS)
        running_vm(self.driver)
        self.hosts.leases["vm-1"] = ("host-a", 1)
        policy = E.MigrationPolicy(auto_postcopy_max_passes=2)
        self.driver.request(I.StartMigration("m-1", "vm-1", "host-b", self.mode, policy, 1))
        self.step()

    @property
    def m(self):  # type: ignore[no-untyped-def]
        return self.driver.world.migrations["m-1"]

    # --- the coordinator ----------------------------------------------------------------------

    def step(self) -> None:
        """What the coordinator does after each message: close recovery once every awaited host
        said hello, decide, and send the new commands to connected hosts."""
        world = self.driver.world
        if self.recovering and not world.awaited_hosts:
            finished = E.RecoveryFinished(migrations_reconciled=len(world.open_migrations))
            self.driver.append([NewEvent("coordinator", finished, self.driver.now_us)])
            self.recovering = False
        for e in self.driver.advance("m-1"):
            if isinstance(e.payload, E.CommandIssued) and e.payload.host_id in self.connected:
                self.pending.append(e.payload)
        for e in self.driver.request(I.ReconcileVm("vm-1", self.driver.now_us)):
            if isinstance(e.payload, E.CommandIssued) and e.payload.host_id in self.connected:
                self.pending.append(e.payload)

    def tick(self) -> None:
        """A second passes (the coordinator's tick): decisions that wait for a report that may
        never come are taken."""
        self.driver.now_us += TICK_US
        self.step()

    def observe(self, *observations: Observation) -> None:
        """Host messages reach the coordinator over an open stream; hostd keeps the others in
        its durable outbox and sends them after it reconnects."""
        live = []
        for o in observations:
            if o.host in self.connected:
                live.append(o)
            else:
                self.outbox.setdefault(o.host, []).append(o)
        if live:
            self.driver.observe(*live)
        self.step()

    def crash_coordinator(self) -> None:
        """kill -9, then a new coordinator: replay the log (it must give the same world), new
        epoch, every stream gone, recovery awaits the hosts of open migrations."""
        replayed = World()
        for event in self.driver.log:
            evolve(replayed, event)
        assert replayed == self.driver.world, "replay does not rebuild the live state"
        # A restart from a checkpoint (the world pickled at some earlier seq) plus the tail
        # must rebuild it too.
        cut = (len(self.driver.log) * (self.restarts + 1)) // (self.restarts + 2)
        restored = World()
        for event in self.driver.log[:cut]:
            evolve(restored, event)
        restored = pickle.loads(pickle.dumps(restored, protocol=pickle.HIGHEST_PROTOCOL))
        for event in self.driver.log[cut:]:
            evolve(restored, event)
        assert restored == self.driver.world, "checkpoint + tail does not rebuild the live state"
        self.driver.epoch += 1
        self.restarts += 1
        started = E.CoordinatorStarted(epoch=self.driver.epoch)
        self.driver.append([NewEvent("coordinator", started, self.driver.now_us)])
        for host in sorted(self.connected):
            self.driver.observe(Observation(host, E.HostDisconnected(host_id=host, generation=1)))
        self.connected.clear()
        world = self.driver.world
        if world.open_migrations:
            awaited = sorted({h for mid in world.open_migrations
                              for h in (world.migrations[mid].source,
                                        world.migrations[mid].destination)})  # fmt: skip
            recovery = E.RecoveryStarted(open_migrations=sorted(world.open_migrations),
                                         awaited_hosts=awaited)  # fmt: skip
            self.driver.append([NewEvent("coordinator", recovery, self.driver.now_us)])
            self.recovering = True

    # --- hosts --------------------------------------------------------------------------------

    def answer(self, index: int = 0, *, fail: bool = False) -> None:
        if not self.pending:
            return
        cmd = self.pending.pop(index % len(self.pending))
        if cmd.host_id not in self.connected:
            return  # re-sent when the host reconnects
        if fail:
            failed = E.CommandFailed(command_id=cmd.command_id, attempt=cmd.attempt,
                                     kind=cmd.kind, vm=cmd.vm, error="injected")  # fmt: skip
            self.observe(Observation(cmd.host_id, failed))
            return
        self.answered.append(cmd)
        out = self.hosts.answer(cmd)
        if Kind(cmd.kind) == Kind.START_MIGRATION and not self.hosts.dead & {("vm-1", "host-b")}:
            out.append(migration("host-b", "vm-1", "active"))
        self.observe(*out)

    def duplicate(self) -> None:
        """A repeated command id gets hostd's stored answer again."""
        if self.answered:
            self.observe(self.hosts.answer(self.answered[-1])[-1])

    def disconnect(self, host: str) -> None:
        """The stream breaks: answers in flight on it are lost; hostd re-sends its unacked
        events on reconnect, and the coordinator re-sends unanswered commands."""
        if host in self.connected:
            self.connected.discard(host)
            self.pending = [c for c in self.pending if c.host_id != host]
            self.driver.observe(Observation(host, E.HostDisconnected(host_id=host, generation=1)))
            self.step()

    def reconnect(self, host: str) -> None:
        if host in self.connected:
            return
        self.connected.add(host)
        self.driver.observe(Observation(host, E.HostConnected(host_id=host, generation=1)))
        self.driver.observe(*self.outbox.pop(host, []))
        # The coordinator's outbox: every command to this host still unanswered.
        world = self.driver.world
        commands = [c for mid in sorted(world.open_migrations)
                    for c in world.migrations[mid].commands.values()]  # fmt: skip
        commands += [c for vm in world.vms.values() for c in vm.commands.values()]
        for command in commands:
            unanswered = command.host == host and command.state == CommandState.ISSUED
            if unanswered and command.issued not in self.pending:
                self.pending.append(command.issued)
        self.step()

    def converge(self) -> None:
        m = self.m
        if m.src.status == "active" and not m.postcopy_started and m.src.alive:
            self.observe(
                qmp("host-a", "vm-1", "STOP"), migration("host-a", "vm-1", "pre-switchover")
            )

    def complete(self) -> None:
        m = self.m
        if m.postcopy_started and m.src.status == "postcopy-active" and m.dst.alive and m.src.alive:
            self.observe(migration("host-a", "vm-1", "completed"),
                         migration("host-b", "vm-1", "completed"))  # fmt: skip

    def pause(self) -> None:
        m = self.m
        if m.postcopy_started and m.src.alive and m.dst.alive and m.src.status == "postcopy-active":
            self.observe(migration("host-a", "vm-1", "postcopy-paused"),
                         migration("host-b", "vm-1", "postcopy-paused"))  # fmt: skip

    def kill(self, host: str) -> None:
        if host == "host-b" and not self.m.incoming_uri:
            return
        self.observe(self.hosts.kill("vm-1", host))

    def operator(self, what: str) -> None:
        if "host-a" not in self.connected and "host-b" not in self.connected:
            return
        request: I.Input = (
            I.AbortMigration("m-1", "operator", self.driver.now_us)
            if what == "abort"
            else I.SwitchToPostcopy("m-1", self.driver.now_us)
        )
        with contextlib.suppress(CoreError):
            self.driver.request(request)
        self.step()

    # --- the end ------------------------------------------------------------------------------

    def settle(self, rounds: int = 400) -> None:
        """No more faults: hosts come back, answer everything, QEMU finishes what it does."""
        self.hosts.link_down = False
        for _ in range(rounds):
            for host in HOSTS:
                self.reconnect(host)
            if self.m.phase.terminal and not self.pending:
                return
            if self.pending:
                self.answer(0)
                continue
            # Nothing pending: let QEMU do what it would do next, and time pass.
            self.converge()
            self.complete()
            self.tick()
        raise AssertionError(f"no terminal state after settling: {self.m.phase.label}")

    def violations(self, *, final: bool = False) -> list[Violation]:
        checker = InvariantChecker()
        checker.check(self.driver.log)
        return checker.finish(quiescent=final)


Action = Callable[[Simulation, random.Random], None]
# (name, weight, action): progress is common, each fault rare, so runs reach every outcome.
ACTIONS: list[tuple[str, int, Action]] = [
    ("answer", 24, lambda s, r: s.answer(0)),
    ("answer out of order", 3, lambda s, r: s.answer(r.randrange(8))),
    ("converge", 4, lambda s, r: s.converge()),
    ("complete", 4, lambda s, r: s.complete()),
    ("a second passes", 2, lambda s, r: s.tick()),
    ("fail", 1, lambda s, r: s.answer(r.randrange(8), fail=True)),
    ("duplicate", 1, lambda s, r: s.duplicate()),
    ("disconnect", 1, lambda s, r: s.disconnect(r.choice(HOSTS))),
    ("reconnect", 2, lambda s, r: s.reconnect(r.choice(HOSTS))),
    ("pause", 1, lambda s, r: s.pause()),
    ("kill QEMU", 1, lambda s, r: s.kill(r.choice(HOSTS))),
    ("abort", 1, lambda s, r: s.operator("abort")),
    ("post-copy", 1, lambda s, r: s.operator("postcopy")),
    ("crash coordinator", 2, lambda s, r: s.crash_coordinator()),
    ("link down", 1, lambda s, r: setattr(s.hosts, "link_down", True)),
    ("link up", 1, lambda s, r: setattr(s.hosts, "link_down", False)),
]
NAMES = [name for name, _, _ in ACTIONS]
WEIGHTS = [weight for _, weight, _ in ACTIONS]


def simulate(seed: int, steps: int = 60) -> Simulation:
    """One run, every choice drawn from `seed`; raises AssertionError on a violation."""
    rng = random.Random(seed)
    sim = Simulation(mode=rng.choice(MODES))
    for _ in range(steps):
        ((_, _, action),) = rng.choices(ACTIONS, WEIGHTS)
        action(sim, rng)
        violations = sim.violations()
        assert not violations, violations
    sim.settle()
    violations = sim.violations(final=True)
    assert not violations, violations
    return sim


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="replay one seeded simulation")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--steps", type=int, default=60)
    ns = parser.parse_args(argv)
    sim = simulate(ns.seed, ns.steps)
    for e in sim.driver.log:
        print(e.seq, e.origin_host or "-", e.type, str(e.payload).replace("\n", " ")[:120])
    print(f"ended {sim.m.phase.label}: {sim.m.reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
