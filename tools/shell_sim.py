"""A seeded simulation that runs the real coordinator: its gRPC servers over mutual TLS, its
sessions, outbox, group commit, SQLite log and recovery on restart.

Only the hosts are simulated. `SimHost` keeps hostd's side of the stream as `hostd/agent.py`
keeps it (a durable outbox of observations re-sent until acknowledged, a hello with a snapshot of
every QEMU, a generation raised on each restart, a command id run at most once: a repeat gets the
stored result, and one interrupted by a restart is reported failed and never run again), and
answers commands with the QEMU model of `tools.sim.SimHosts`.

A `random.Random(seed)` scheduler picks, between quiescent points (every host observation
folded and committed, every command sent reached its host), what happens next: a host executes
a command it received, QEMU makes progress (a pass, convergence, post-copy completion), or a
fault: a stream dropped and reconnected, a hostd restart (new generation), a hostd that crashes
after executing a command and before recording its answer, a QEMU killed on either side, a
source migration failing on its own, the coordinator restarted on the same log (new epoch),
with or without hosts that stay away past its recovery bound. Then everything settles fault
free, and the run is judged: the migration terminal, the invariant checker and the audit clean,
and a VM no fault killed running on exactly one host.

The seed fixes the schedule; the coordinator's own tasks interleave as asyncio runs them, so a
seed replays the same faults at the same points of the migration, not the same bytes.
`python -m tools.shell_sim --seed N` replays one run and prints its timeline.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import io
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from coordinator import codec
from coordinator.app import Coordinator
from coordinator.authz import Role, Roles
from coordinator.core import Event, World, evolve
from coordinator.core import recovery as table
from coordinator.core.invariants import InvariantChecker
from coordinator.core.state import CommandState, Kind, MigrationState, Phase
from coordinator.log import SqliteEventStore
from coordinator.main import start_server
from tools.audit import timeline
from tools.audit.cli import main as audit_main
from tools.sim import Observation, SimHosts, migration, qmp, sampled_pass
from whimbrel import pki, tls
from whimbrel.protocol import wrap
from whimbrel.v1 import (
    common_pb2,
    events_pb2,
    host_pb2,
    host_pb2_grpc,
    migration_pb2,
    migration_pb2_grpc,
    vm_pb2,
    vm_pb2_grpc,
)

__all__ = ["ROWS", "Run", "RunFailed", "row_name", "simulate"]

SOURCE, DESTINATION = "host-a", "host-b"
HOSTS = (SOURCE, DESTINATION)
VM, MIGRATION = "vm-1", "m-1"
MODES = (
    common_pb2.MIGRATION_MODE_PRECOPY,
    common_pb2.MIGRATION_MODE_POSTCOPY,
    common_pb2.MIGRATION_MODE_AUTO,
)
# Recovery after a restart waits this long for hosts that are meant to return: far beyond a
# reconnect on loopback, so a host is "missing" only when the run chose it to be.
HOST_WAIT_S = 30.0
# ... and this long when the run keeps a host away on purpose.
MISSING_HOST_WAIT_S = 0.3
# A quiescent point, or a settled run, not reached within these is a failure of the run.
QUIESCE_LIMIT_S = 15.0
SETTLE_LIMIT_S = 8.0
# Faults per run at most, and scheduler steps before the run settles.
MAX_FAULTS = 3
STEPS = 40
# QEMU's pre-copy passes the model makes at most before it converges.
MAX_PASSES = 6
_PRECOPY_STATUSES = ("setup", "active", "pre-switchover", "device")


def row_name(stage: table.Stage, missing: table.Missing, *, completed: bool = False) -> str:
    """A row of the recovery table (`coordinator.core.recovery.TABLE`, and its extra row for a
    completed transfer), named by its stage and its missing host."""
    name = f"{stage.name}/{missing.name}"
    return f"{name}/transfer-completed" if completed else name


# Every row of the recovery table.
ROWS = frozenset(
    [row_name(stage, missing) for stage, missing in table.TABLE]
    + [row_name(table.Stage.AFTER_CONT, table.Missing.SOURCE, completed=True)]
)


class RunFailed(AssertionError):
    """A run broke a rule; the message carries its seed, faults and timeline."""


# --- hosts ------------------------------------------------------------------------------------


@dataclass
class Qemu:
    """What hostd would report of one QEMU in its hello."""

    runstate: str
    role: str = ""
    status: str = ""


def _failed(
    c: host_pb2.Command | events_pb2.CommandIssued, error: str, *, rejected: bool = False
) -> events_pb2.CommandFailed:
    return events_pb2.CommandFailed(
        command_id=c.command_id, attempt=c.attempt, kind=c.kind, vm=c.vm, error=error,
        rejected=rejected,
    )  # fmt: skip


def _unwrap(wrapped: events_pb2.EventPayload) -> Message:
    kind = wrapped.WhichOneof("kind")
    assert kind is not None
    payload: Message = getattr(wrapped, kind)
    return payload


class SimHost:
    """hostd's side of one host: its durable state outlives streams and (with a new generation)
    restarts; its QEMUs are the shared `SimHosts` model."""

    def __init__(self, host_id: str, cluster: Cluster) -> None:
        self.host_id = host_id
        self.cluster = cluster
        self.generation = 1
        self.seq = 0
        self.highest_epoch = 0
        # Recorded and not acknowledged, re-sent on every (re)connect.
        self.pending: list[host_pb2.HostEvent] = []
        # command id -> its stored answer; None: started, no answer recorded.
        self.results: dict[str, events_pb2.EventPayload | None] = {}
        # Received and started, not executed yet (hostd's in-flight commands).
        self.queue: list[host_pb2.Command] = []
        self.qemus: dict[str, Qemu] = {}
        # The stream: messages up, whether the welcome came, command ids it delivered.
        self._up: asyncio.Queue[host_pb2.HostMessage | None] | None = None
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self.welcomed = False
        self.delivered: set[str] = set()
        self.error: grpc.aio.AioRpcError | None = None
        self._changed = asyncio.Event()

    # --- observations ---------------------------------------------------------------------

    def record(self, payloads: Iterable[Message]) -> None:
        """Record observations durably, together; sent at once over a welcomed stream."""
        events = []
        for payload in payloads:
            self._track(payload)
            self.seq += 1
            event = host_pb2.HostEvent(
                seq=self.seq,
                time_us=time.time_ns() // 1000,
                payload=wrap(payload),
                generation=self.generation,
            )
            events.append(event)
        self.pending += events
        if events and self.welcomed:
            self._put(events)

    def _put(self, events: list[host_pb2.HostEvent]) -> None:
        assert self._up is not None
        self._up.put_nowait(host_pb2.HostMessage(events=host_pb2.HostEvents(events=events)))

    def _track(self, payload: Message) -> None:
        """Keep the snapshot a hello would report in step with what QEMU did."""
        if isinstance(payload, events_pb2.QemuExited):
            self.qemus.pop(payload.vm, None)
            return
        if not isinstance(payload, events_pb2.QmpEventReceived):
            return
        qemu = self.qemus.get(payload.vm)
        if qemu is None:
            return
        if payload.event == "RESUME":
            qemu.runstate = "running"
        elif payload.event == "STOP":
            qemu.runstate = "paused"
        elif payload.event == "SHUTDOWN":
            qemu.runstate = "shutdown"
        elif payload.event == "MIGRATION":
            qemu.status = json.loads(payload.data_json)["status"]
            if qemu.status == "completed" and qemu.role == "source":
                qemu.runstate = "postmigrate"

    def snapshot(self) -> list[common_pb2.VmObservation]:
        return [
            common_pb2.VmObservation(
                vm=vm,
                process_alive=True,
                pid=1000,
                runstate=q.runstate,
                migration_status=q.status,
                migration_role=q.role,
                qmp_reachable=True,
            )
            for vm, q in sorted(self.qemus.items())
        ]

    # --- the stream -----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._reader is not None and not self._reader.done() and self.welcomed

    async def connect(self) -> None:
        """Open a stream: hello (with a snapshot), welcome, then what the log lacks."""
        self.welcomed = False
        self.delivered = set()
        self.error = None
        up: asyncio.Queue[host_pb2.HostMessage | None] = asyncio.Queue()
        last_acked = (
            min(
                (e.seq for e in self.pending if e.generation == self.generation),
                default=self.seq + 1,
            )
            - 1
        )
        hello = host_pb2.Hello(
            host_id=self.host_id,
            generation=self.generation,
            highest_epoch_seen=self.highest_epoch,
            last_acked_seq=max(last_acked, 0),
            vms=self.snapshot(),
            migration_address="127.0.0.1",
        )
        up.put_nowait(host_pb2.HostMessage(hello=hello))
        self._up = up

        async def messages() -> AsyncIterator[host_pb2.HostMessage]:
            while (message := await up.get()) is not None:
                yield message

        stub = host_pb2_grpc.HostServiceStub(self.cluster.channel_of(self.host_id))
        self._call = stub.Connect(messages())
        self._reader = asyncio.create_task(self._read(), name=f"sim-host-{self.host_id}")
        await wait_until(lambda: self.welcomed or self.error is not None, self)
        if self.error is not None:
            raise self.error

    async def _read(self) -> None:
        try:
            async for message in self._call:
                kind = message.WhichOneof("kind")
                if kind == "welcome":
                    self._welcome(message.welcome)
                elif kind == "ack":
                    ack = message.ack
                    self.pending = [
                        e for e in self.pending if e.generation != ack.generation or e.seq > ack.seq
                    ]
                elif kind == "command":
                    self.receive(message.command)
                self._changed.set()
                self._changed = asyncio.Event()
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                self.error = err
        finally:
            self.welcomed = False
            self._changed.set()
            self._changed = asyncio.Event()

    def _welcome(self, welcome: host_pb2.Welcome) -> None:
        if welcome.epoch < self.highest_epoch:
            raise RunFailed(f"{self.host_id}: welcome from stale epoch {welcome.epoch}")
        self.highest_epoch = welcome.epoch
        self.welcomed = True
        older = [e for e in self.pending if e.generation < self.generation]
        ours = [
            e
            for e in self.pending
            if e.generation == self.generation and e.seq > welcome.last_stored_seq
        ]
        for events in (older, ours):
            if events:
                self._put(events)

    async def drop(self) -> None:
        """The stream breaks (hostd lives on and keeps its outbox)."""
        if self._up is not None:
            self._up.put_nowait(None)
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await self._reader
        self._reader = self._call = self._up = None
        self.welcomed = False

    async def restart(self) -> None:
        """hostd dies and starts again under a new generation: commands it was running are
        gone (their ids stay started, so a repeat is reported interrupted, never re-run)."""
        await self.drop()
        self.queue.clear()
        self.generation += 1
        self.seq = 0

    async def wait_for_change(self, max_wait: float | None = None) -> None:
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), max_wait)

    # --- commands -------------------------------------------------------------------------

    def receive(self, command: host_pb2.Command) -> None:
        self.delivered.add(command.command_id)
        if command.epoch < self.highest_epoch:
            error = f"stale epoch {command.epoch}: this host has seen {self.highest_epoch}"
            self._answer(command, error, rejected=True)
            return
        self.highest_epoch = command.epoch
        if any(c.command_id == command.command_id for c in self.queue):
            return  # a repeat of a command still running here; its result will come
        if command.command_id in self.results:
            stored = self.results[command.command_id]
            if stored is None:
                self._answer(command, "interrupted by a hostd restart; not executed again")
            else:
                self.record([_unwrap(stored)])
            return
        self.results[command.command_id] = None
        self.queue.append(command)

    def _answer(self, c: host_pb2.Command, error: str, *, rejected: bool = False) -> None:
        self.record([_failed(c, error, rejected=rejected)])

    def _failed(
        self, c: events_pb2.CommandIssued, error: str, *, rejected: bool = False
    ) -> list[Observation]:
        return [Observation(self.host_id, _failed(c, error, rejected=rejected))]

    def _succeeded(self, c: events_pb2.CommandIssued) -> list[Observation]:
        ok = events_pb2.CommandSucceeded(
            command_id=c.command_id, attempt=c.attempt, kind=c.kind, vm=c.vm
        )
        return [Observation(self.host_id, ok)]

    def _as_hostd_would(self, c: events_pb2.CommandIssued) -> list[Observation]:
        """hostd's answer where it differs from the `SimHosts` model: a lease release, a cont
        refused because its QEMU is gone, and QEMU 7.2 once a migration ended by itself
        (failed, or completed), where the model assumes one still under way: migrate-continue
        is refused, migrate-start-postcopy and migrate_cancel succeed and change nothing.
        Empty: the model's answer holds."""
        kind = Kind(c.kind)
        if kind == Kind.RELEASE_LEASE:
            return self._release_lease(c)
        qemu = self.qemus.get(c.vm)
        if kind == Kind.RESUME_VM and qemu is None:
            # hostd/executor.py resume_vm: no QEMU to cont, refused before anything is sent,
            # so the coordinator knows the guest did not run here.
            error = f"cont not sent: no QEMU for {c.vm} on {self.host_id}"
            return self._failed(c, error, rejected=True)
        if qemu is None or qemu.role != "source":
            return []
        if kind == Kind.CONTINUE_SWITCHOVER and qemu.status != "pre-switchover":
            return self._failed(c, f"Migration not in expected state: {qemu.status}")
        ended = qemu.status in ("failed", "cancelled", "completed")
        if kind in (Kind.START_POSTCOPY, Kind.CANCEL_MIGRATION) and ended:
            return self._succeeded(c)
        return []

    def _release_lease(self, c: events_pb2.CommandIssued) -> list[Observation]:
        """hostd/drivers/lease.py: a release gives up only a lease this host holds, at the
        generation named (the model's release would clear anyone's)."""
        holder, generation = self.cluster.model.leases.get(c.vm, ("", 0))
        if holder == self.host_id and generation == c.args.lease_generation:
            return []  # the model's release is the driver's here
        if holder == self.host_id:
            error = (
                f"lease of {c.vm} is held by {holder} at generation {generation}, "
                f"not {c.args.lease_generation}: not released"
            )
            return self._failed(c, error)
        return self._succeeded(c)

    def execute(self, *, record_answer: bool = True) -> host_pb2.Command:
        """Run the oldest command in flight; without `record_answer`, hostd dies after it ran
        and before its answer was stored."""
        c = self.queue.pop(0)
        issued = events_pb2.CommandIssued(
            command_id=c.command_id,
            migration_id=c.migration_id,
            attempt=c.attempt,
            host_id=self.host_id,
            vm=c.vm,
            kind=c.kind,
            args=c.args,
        )
        kind = Kind(c.kind)
        if kind == Kind.START_VM:
            self.qemus[c.vm] = Qemu("paused")
        elif kind == Kind.PREPARE_INCOMING:
            self.qemus[c.vm] = Qemu("inmigrate", role="destination")
        elif kind == Kind.START_MIGRATION and c.vm in self.qemus:
            self.qemus[c.vm].role = "source"
        observations = self._as_hostd_would(issued) or self.cluster.model.answer(issued)
        answer = [
            o
            for o in observations
            if o.host == self.host_id
            and isinstance(o.payload, (events_pb2.CommandSucceeded, events_pb2.CommandFailed))
            and o.payload.command_id == c.command_id
        ]
        if record_answer:
            for o in answer:
                self.results[c.command_id] = wrap(o.payload)
        else:
            observations = [o for o in observations if o not in answer]
        self.cluster.observe(observations)
        return c


# --- the cluster ------------------------------------------------------------------------------


async def any_change(sources: Iterable[Any], max_wait: float) -> None:
    """Return once any source notifies a change, or after `max_wait` seconds."""
    waits = [asyncio.ensure_future(src.wait_for_change(max_wait)) for src in sources]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()


async def wait_until(predicate: Callable[[], bool], *sources: Any, limit: float = 10.0) -> None:
    """Wait, woken by each source's change notification, until `predicate()` holds."""
    async with asyncio.timeout(limit):
        while not predicate():
            await any_change(sources, 1.0)


_PKI: dict[str, Path] = {}


def _pki_dir() -> Path:
    """One PKI per process (issuing certificates is the slow part of a start)."""
    if "dir" not in _PKI:
        directory = Path(tempfile.mkdtemp(prefix="whimbrel-sim-pki-"))
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        for host in HOSTS:
            pki.ensure(directory, "host", host)
        pki.ensure(directory, "user", "admin")
        pki.ensure(directory, "coordinator")
        _PKI["dir"] = directory
    return _PKI["dir"]


class Cluster:
    """The real coordinator on a SQLite file, restartable, and the simulated hosts."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.pki = _pki_dir()
        self.model = SimHosts()
        self.hosts = {h: SimHost(h, self) for h in HOSTS}
        self.store: SqliteEventStore | None = None
        self.app: Coordinator | None = None
        self._server: grpc.aio.Server | None = None
        self.address = ""
        self._channels: dict[str, grpc.aio.Channel] = {}
        # Hosts kept away from a restarted coordinator until its recovery is over.
        self.away: set[str] = set()

    @property
    def coordinator(self) -> Coordinator:
        assert self.app is not None
        return self.app

    def channel_of(self, principal: str) -> grpc.aio.Channel:
        if principal not in self._channels:
            kind, name = ("user", "admin") if principal == "admin" else ("host", principal)
            files = pki.ensure(self.pki, kind, name).files
            self._channels[principal] = tls.aio_channel(self.address, files)
        return self._channels[principal]

    async def start(self, host_wait: float = HOST_WAIT_S) -> None:
        self.store = SqliteEventStore(self.db)
        self.app = Coordinator(self.store, host_wait=host_wait)
        await self.app.start()
        roles = Roles({"admin": Role.ADMIN})
        files = pki.ensure(self.pki, "coordinator").files
        self._server, port, _ = await start_server(self.app, "127.0.0.1:0", files, roles)
        self.address = f"127.0.0.1:{port}"

    async def stop(self) -> None:
        for host in self.hosts.values():
            await host.drop()
        for channel in self._channels.values():
            await channel.close()
        self._channels = {}
        if self._server is not None:
            await self._server.stop(grace=None)
        if self.app is not None:
            await self.app.close()
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
        self._server = self.app = self.store = None

    def observe(self, observations: Iterable[Observation]) -> None:
        """Each observation goes to the hostd of the host that made it, one record per host."""
        by_host: dict[str, list[Message]] = {}
        for o in observations:
            by_host.setdefault(o.host, []).append(o.payload)
        for host, payloads in by_host.items():
            self.hosts[host].record(payloads)

    # --- quiescence -----------------------------------------------------------------------

    def outstanding(self, world: World) -> dict[str, set[str]]:
        """host -> ids of the commands issued to it and not answered, that the coordinator
        sends over each new stream (open migrations' and VMs')."""
        out: dict[str, set[str]] = {h: set() for h in HOSTS}
        commands = [
            c for mid in world.open_migrations for c in world.migrations[mid].commands.values()
        ]
        commands += [c for vm in world.vms.values() for c in vm.commands.values()]
        for c in commands:
            if c.state == CommandState.ISSUED and c.host in out:
                out[c.host].add(c.command_id)
        return out

    def _folded(self) -> bool:
        """Every event a connected host sent is folded by the coordinator."""
        app = self.coordinator
        for host in self.hosts.values():
            if not host.connected:
                continue
            session = app.sessions.get(host.host_id)
            if session is None or session.generation != host.generation:
                return False
            if any(session.stored.get(e.generation, 0) < e.seq for e in host.pending):
                return False
        return True

    async def quiesce(self) -> World:
        """Wait until every host event is committed and every command the coordinator sent
        reached its connected host; returns the committed world (read it before awaiting)."""
        app = self.coordinator
        sources = [app, *self.hosts.values()]
        async with asyncio.timeout(QUIESCE_LIMIT_S):
            while True:
                await wait_until(self._folded, *sources, limit=QUIESCE_LIMIT_S)
                async with app.reading() as world:
                    outstanding = self.outstanding(world)
                    if self._folded() and all(
                        outstanding[h.host_id] <= h.delivered
                        for h in self.hosts.values()
                        if h.connected
                    ):
                        return world
                await any_change(sources, 0.2)


# --- one run ----------------------------------------------------------------------------------


@dataclass
class Run:
    seed: int
    mode: int
    actions: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    killed: bool = False
    rows: set[str] = field(default_factory=set)
    outcome: str = ""
    reason: str = ""
    events: list[Event] = field(default_factory=list)
    seconds: float = 0.0

    def story(self) -> str:
        lines = [
            f"seed {self.seed}, mode {common_pb2.MigrationMode.Name(self.mode)}",  # type: ignore[arg-type]
            "scheduler: " + "; ".join(self.actions),
        ]
        if any(e.payload.DESCRIPTOR.name == "MigrationRequested" for e in self.events):
            lines.append(timeline.render(timeline.build(self.events, MIGRATION)))
        lines.append("the whole log:")
        lines += [
            f"  {e.seq:>4} e{e.epoch} {e.origin_host or 'coordinator':<12} "
            f"{timeline.summary(e)[:160]}"
            for e in self.events
        ]
        return "\n".join(lines)


@dataclass(frozen=True)
class Move:
    """One thing the scheduler may make happen next, and how likely it is."""

    what: str
    weight: int
    do: Callable[[], Any]
    fault: bool = False


def _side_of(m: MigrationState, host: str) -> str:
    return "source" if host == m.source else "destination"


class Scheduler:
    def __init__(self, seed: int, db: Path) -> None:
        self.rng = random.Random(seed)
        self.cluster = Cluster(db)
        self.run = Run(seed, self.rng.choice(MODES))
        self.passes = 1

    def note(self, what: str) -> None:
        self.run.actions.append(what)

    def fault(self, what: str) -> None:
        self.note(f"FAULT {what}")
        self.run.faults.append(what)

    # --- QEMU by itself -------------------------------------------------------------------

    def _qemu(self, host: str) -> Qemu | None:
        return self.cluster.hosts[host].qemus.get(VM)

    def qemu_moves(self, m: MigrationState) -> list[tuple[str, Callable[[], None]]]:
        """What the two QEMUs of the migration could do next by themselves."""
        src, dst = self._qemu(m.source), self._qemu(m.destination)
        if src is None or src.role != "source":
            return []
        moves: list[tuple[str, Callable[[], None]]] = []
        if src.status == "active" and self.passes < MAX_PASSES:
            moves.append(("QEMU pass", self._pass))
        precopy = m.mode != common_pb2.MIGRATION_MODE_POSTCOPY
        if precopy and src.status == "active" and src.runstate == "running":
            moves.append(("QEMU converges", self._converge))
        if src.status == "postcopy-active" and dst is not None:
            moves.append(("QEMU completes post-copy", self._complete))
        return moves

    def _pass(self) -> None:
        self.passes += 1
        n, remaining = self.passes, (128 << 20) >> (2 * self.passes)
        out = [
            qmp(SOURCE, VM, "MIGRATION_PASS", **{"pass": n}),
            Observation(
                SOURCE,
                events_pb2.MigrationStatsSampled(
                    vm=VM,
                    status="active",
                    total_bytes=128 << 20,
                    transferred_bytes=n << 27,
                    remaining_bytes=remaining,
                    mbps=800.0,
                    **sampled_pass(n),
                ),
            ),
        ]
        dst = self._qemu(DESTINATION)
        if dst is not None and dst.status in ("", "setup"):
            out.insert(0, migration(DESTINATION, VM, "active"))
        self.cluster.observe(out)

    def _converge(self) -> None:
        out = [qmp(SOURCE, VM, "STOP"), migration(SOURCE, VM, "pre-switchover")]
        out += self.cluster.model.switchover(SOURCE, VM, "pre-switchover")
        self.cluster.observe(out)

    def _complete(self) -> None:
        out = [migration(SOURCE, VM, "completed")]
        out += self.cluster.model.switchover(SOURCE, VM, "completed")
        if self._qemu(DESTINATION) is not None:
            out.append(migration(DESTINATION, VM, "completed"))
        self.cluster.observe(out)

    def _peer_breaks(self, host: str) -> list[Observation]:
        """The other end of a migration whose `host` end vanished: pre-copy fails (a source
        stopped for the switchover resumes by itself, a destination exits), post-copy pauses."""
        peer = DESTINATION if host == SOURCE else SOURCE
        q = self._qemu(peer)
        if q is None or q.status not in (*_PRECOPY_STATUSES, "postcopy-active"):
            return []
        if q.status == "postcopy-active":
            return [migration(peer, VM, "postcopy-paused")]
        if q.role == "destination":
            self.cluster.model.dead.add((VM, peer))
            exited = events_pb2.QemuExited(vm=VM, pid=1000, exit_code=1)
            return [migration(peer, VM, "failed"), Observation(peer, exited)]
        if q.role != "source":
            return []
        self.cluster.model.armed.discard((VM, peer))
        out = [migration(peer, VM, "failed")]
        return [*out, qmp(peer, VM, "RESUME")] if q.runstate == "paused" else out

    def kill(self, host: str) -> None:
        self.run.killed = True
        out = [self.cluster.model.kill(VM, host), *self._peer_breaks(host)]
        self.cluster.observe(out)

    def source_fails(self) -> None:
        """QEMU ends the source's migration by itself (the destination unreachable, or its
        load failed): the source reports failed, and resumes if it had stopped."""
        src = self._qemu(SOURCE)
        assert src is not None
        self.cluster.model.armed.discard((VM, SOURCE))
        out = [migration(SOURCE, VM, "failed")]
        if src.runstate == "paused":
            out.append(qmp(SOURCE, VM, "RESUME"))
        dst = self._qemu(DESTINATION)
        if dst is not None and dst.status in _PRECOPY_STATUSES:
            self.cluster.model.dead.add((VM, DESTINATION))
            exited = events_pb2.QemuExited(vm=VM, pid=1000, exit_code=1)
            out += [migration(DESTINATION, VM, "failed"), Observation(DESTINATION, exited)]
        self.cluster.observe(out)

    # --- faults of hosts and the coordinator ----------------------------------------------

    async def reconnect(self, host: str) -> None:
        await self.cluster.hosts[host].connect()

    async def restart_coordinator(self, missing: tuple[str, ...]) -> None:
        cluster = self.cluster
        await cluster.stop()
        await cluster.start(MISSING_HOST_WAIT_S if missing else HOST_WAIT_S)
        cluster.away = set(missing)
        for host in HOSTS:
            if host not in missing:
                await self.reconnect(host)
        if missing:
            await asyncio.wait_for(cluster.coordinator.recovered.wait(), SETTLE_LIMIT_S)

    # --- the schedule ---------------------------------------------------------------------

    def choices(self, world: World) -> list[Move]:
        """Every move possible now."""
        m = world.migrations[MIGRATION]
        cluster = self.cluster
        out: list[Move] = []
        for host in cluster.hosts.values():
            if host.queue:
                what = f"{host.host_id} executes {Kind(host.queue[0].kind).label}"
                out.append(Move(what, 12, host.execute))
            recovered = cluster.coordinator.recovered.is_set()
            if not host.connected and (host.host_id not in cluster.away or recovered):
                out.append(
                    Move(f"{host.host_id} reconnects", 4, partial(self.reconnect, host.host_id))
                )
        if not m.phase.terminal:
            out += [Move(what, 6, do) for what, do in self.qemu_moves(m)]
        if len(self.run.faults) >= MAX_FAULTS or m.phase.terminal:
            return out
        for host in cluster.hosts.values():
            h = host.host_id
            if host.connected:
                out.append(Move(f"stream of {h} dropped", 1, partial(self._drop, h), fault=True))
                out.append(Move(f"hostd on {h} restarts", 1, partial(self._restart, h), fault=True))
            if host.queue:
                what = f"hostd on {h} dies after executing {Kind(host.queue[0].kind).label}"
                out.append(Move(what, 2, partial(self._lose_answer, h), fault=True))
            if self._qemu(h) is not None:
                what = f"QEMU on {h} ({_side_of(m, h)}) killed"
                out.append(Move(what, 1, partial(self.kill, h), fault=True))
        src = self._qemu(SOURCE)
        if src is not None and src.role == "source" and src.status in _PRECOPY_STATUSES:
            out.append(Move("source migration fails on its own", 1, self.source_fails, fault=True))
        for missing in ((), (SOURCE,), (DESTINATION,), HOSTS):
            what = f"coordinator restarts, {', '.join(missing) or 'no host'} missing"
            out.append(Move(what, 1, partial(self.restart_coordinator, missing), fault=True))
        return out

    async def _drop(self, host: str) -> None:
        await self.cluster.hosts[host].drop()

    async def _restart(self, host: str) -> None:
        await self.cluster.hosts[host].restart()
        await self.reconnect(host)

    async def _lose_answer(self, host: str) -> None:
        self.cluster.hosts[host].execute(record_answer=False)
        await self._restart(host)

    async def step(self, world: World) -> bool:
        options = self.choices(world)
        if not options:
            return False
        (move,) = self.rng.choices(options, [o.weight for o in options])
        self.fault(move.what) if move.fault else self.note(move.what)
        result = move.do()
        if asyncio.iscoroutine(result):
            await result
        return True

    async def settle(self) -> World:
        """No more faults: hosts return, every command runs, QEMU finishes, time passes."""
        cluster = self.cluster
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_LIMIT_S
        while True:
            world = await cluster.quiesce()
            m = world.migrations[MIGRATION]
            if (
                m.phase.terminal
                and not any(cluster.outstanding(world).values())
                and not any(h.queue for h in cluster.hosts.values())
                and all(h.connected for h in cluster.hosts.values())
            ):
                return world
            if loop.time() > deadline:
                raise RunFailed(f"not settled after {SETTLE_LIMIT_S:.0f} s: {m.phase.label}")
            away = [h for h in cluster.hosts.values() if not h.connected]
            if away:
                if cluster.away and not cluster.coordinator.recovered.is_set():
                    await cluster.coordinator.recovered.wait()
                self.note(f"settle: {away[0].host_id} reconnects")
                await away[0].connect()
                continue
            busy = [h for h in cluster.hosts.values() if h.queue]
            if busy:
                c = busy[0].execute()
                self.note(f"settle: {busy[0].host_id} executes {Kind(c.kind).label}")
                continue
            moves = [] if m.phase.terminal else self.qemu_moves(m)
            # Converging (or completing) ends the migration; passes only postpone it.
            moves = [mv for mv in moves if mv[0] != "QEMU pass"] or moves
            if moves:
                what, do = moves[0]
                self.note(f"settle: {what}")
                do()
                continue
            # Only time can move it now (the coordinator's clock tick).
            await any_change([cluster.coordinator, *cluster.hosts.values()], 1.5)

    async def main(self) -> Run:
        cluster = self.cluster
        started = time.monotonic()
        await cluster.start()
        try:
            for host in HOSTS:
                await self.reconnect(host)
            vms = vm_pb2_grpc.VmServiceStub(cluster.channel_of("admin"))
            spec = common_pb2.VmSpec(name=VM, memory_mib=128, vcpus=1)
            await vms.DefineVm(vm_pb2.DefineVmRequest(spec=spec))
            await vms.StartVm(vm_pb2.StartVmRequest(name=VM, host=SOURCE))
            await cluster.quiesce()
            cluster.hosts[SOURCE].execute()
            await cluster.quiesce()
            migrations = migration_pb2_grpc.MigrationServiceStub(cluster.channel_of("admin"))
            policy = events_pb2.MigrationPolicy(auto_postcopy_max_passes=3)
            await migrations.StartMigration(
                migration_pb2.StartMigrationRequest(
                    vm=VM,
                    destination=DESTINATION,
                    mode=self.run.mode,  # type: ignore[arg-type]
                    policy=policy,
                    migration_id=MIGRATION,
                )
            )
            for _ in range(STEPS):
                world = await cluster.quiesce()
                if not await self.step(world):
                    break
            world = await self.settle()
            self.judge_vm(world)
        finally:
            if cluster.store is not None:
                self.run.events = [codec.from_stored(s) for s in cluster.store.read()]
            await cluster.stop()
        self.run.seconds = time.monotonic() - started
        return self.run

    def judge_vm(self, world: World) -> None:
        """No split brain ever; no QEMU left that is not the VM; and unless a fault killed a
        QEMU, the VM runs on exactly one host, the one the log names, which holds its lease."""
        m = world.migrations[MIGRATION]
        self.run.outcome, self.run.reason = m.phase.label, m.reason
        alive = {h: q for h, host in self.cluster.hosts.items() if (q := host.qemus.get(VM))}
        running = [h for h, q in alive.items() if q.runstate == "running"]
        if len(running) > 1:
            raise RunFailed(f"the VM runs on {running}")
        vm = world.vms[VM]
        lease = self.cluster.model.leases.get(VM, ("", 0))[0]
        if not self.run.killed and (running != [vm.host] or lease != vm.host):
            raise RunFailed(
                f"a healthy VM was lost: QEMUs {alive}, running {running}, the log's host "
                f"{vm.host!r}, lease on {lease!r} ({m.phase.label}: {m.reason})"
            )
        for host, q in alive.items():
            if host != vm.host:
                raise RunFailed(
                    f"stray QEMU on {host} (runstate {q.runstate}, {q.role or 'no'} role, "
                    f"migration {q.status or 'none'}) after {m.phase.label}: {m.reason}"
                )


def rows_reached(events: list[Event]) -> set[str]:
    """The recovery-table rows the log's recoveries applied: at each RecoveryFinished that
    names missing hosts, each open migration's stage and missing host, judged on the world
    folded up to it (as `coordinator.core.recovery.rule_for` judges it)."""
    world = World()
    rows: set[str] = set()
    for event in events:
        evolve(world, event)
        if not isinstance(event.payload, events_pb2.RecoveryFinished):
            continue
        for mid in sorted(world.open_migrations):
            m = world.migrations[mid]
            who = table.missing(world, m)
            if who is None:
                continue
            rule = table.rule_for(world, m)
            rows.add(row_name(table.stage(m), who, completed=rule is table.COMPLETED_TRANSFER))
    return rows


def judge_log(run: Run, db: Path) -> None:
    """The checks every run must pass: terminal, invariants clean, audit clean."""
    problems = []
    if run.outcome not in {p.label for p in (Phase.COMPLETED, Phase.ROLLED_BACK, Phase.FENCED)}:
        problems.append(f"migration ended {run.outcome!r}")
    violations = InvariantChecker().check_quiescent(run.events)
    problems += [f"invariant {v}" for v in violations]
    out = io.StringIO()
    with redirect_stdout(out):
        code = audit_main(["verify", str(db), "--final"])
    if code != 0:
        problems.append(f"audit verify --final exited {code}: {out.getvalue().strip()}")
    if problems:
        raise RunFailed("; ".join(problems))


@dataclass(frozen=True)
class Strike:
    """A fault of a scripted run: the move named `fault`, taken as soon as it is possible and,
    when `when` names another move, only while that move is possible too (e.g. the destination's
    QEMU killed while "host-b executes resume-vm" waits: just before its cont)."""

    fault: str
    when: str = ""


class ScriptedScheduler(Scheduler):
    """No randomness: every step takes the first move that is not a fault (hosts execute their
    commands and QEMU moves on, in a fixed order), except that each Strike of the script is
    taken, in order, at the first step where it is possible. Pins one fault scenario, against
    the real coordinator, the same on every run."""

    def __init__(self, script: list[Strike], mode: int, db: Path) -> None:
        super().__init__(0, db)
        self.run.mode = mode
        self.script = list(script)

    async def step(self, world: World) -> bool:
        options = self.choices(world)
        names = {o.what for o in options}
        move = None
        if self.script:
            strike = self.script[0]
            if strike.fault in names and (not strike.when or strike.when in names):
                move = next(o for o in options if o.what == strike.fault)
                self.script.pop(0)
        if move is None:
            move = next((o for o in options if not o.fault), None)
        if move is None:
            return False
        self.fault(move.what) if move.fault else self.note(move.what)
        result = move.do()
        if asyncio.iscoroutine(result):
            await result
        return True


async def simulate_script(script: list[Strike], mode: int, directory: Path) -> Run:
    """One scripted run (see ScriptedScheduler), judged as every run is; raises RunFailed if a
    strike was never possible."""
    scheduler = ScriptedScheduler(script, mode, directory / "scripted.db")
    run = await _judged(scheduler, directory / "scripted.db")
    if scheduler.script:
        raise RunFailed(f"never struck: {scheduler.script}\n{run.story()}")
    return run


async def _judged(scheduler: Scheduler, db: Path) -> Run:
    run = scheduler.run
    try:
        await scheduler.main()
        run.rows = rows_reached(run.events)
        judge_log(run, db)
    except (RunFailed, TimeoutError, grpc.aio.AioRpcError) as err:
        raise RunFailed(f"{type(err).__name__}: {err}\n{run.story()}") from err
    return run


async def simulate(seed: int, directory: Path) -> Run:
    """One run, every choice drawn from `seed`; raises RunFailed (with the seed, the faults
    and the migration's timeline) when a rule is broken."""
    db = directory / f"sim-{seed}.db"
    return await _judged(Scheduler(seed, db), db)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="replay one seeded simulation of the real coordinator"
    )
    parser.add_argument("--seed", type=int, required=True)
    ns = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        try:
            run = asyncio.run(simulate(ns.seed, Path(directory)))
        except RunFailed as err:
            print(err, file=sys.stderr)
            return 1
    print(run.story())
    print(f"ended {run.outcome}: {run.reason}; rows {sorted(run.rows)}; {run.seconds:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
