"""A seeded simulation of the product as it runs: the real coordinator (in this process: its
gRPC servers over mutual TLS, sessions, outbox, group commit, SQLite log and recovery on
restart) and real hostd processes (agent, executor, outbox, lease driver on a shared
lockspace), whose QEMUs are qmpsim processes speaking QEMU 7.2's QMP (tools/qmpsim/). Nothing of
either shell is re-implemented here: the run only starts, freezes, kills and cuts.

Faults strike where the code says they can. Every hostd starts with failpoints armed to freeze
it (`NAME=stop`, whimbrel/failpoints.py) at commands and QMP events the seed picks. When one
freezes a hostd, the seed picks what happens at that instant:
- nothing (it goes on);
- hostd killed (-9) and started again under a new generation (after executing a command: its
  answer is lost, and the repeat is reported interrupted);
- a QEMU killed (-9), on either side;
- the migration link cut: a source's pre-copy fails on its own (QEMU resumes a source it had
  stopped), a post-copy pauses and must be recovered;
- a host's stream to the coordinator cut;
- the operator's abort (QEMU resumes a source after the cancel);
- the coordinator restarted on its log, with no host, this one, the other or both missing:
  a missing host stays frozen, or its connections are refused, until recovery has ended.
Then nothing more strikes, every host returns, and the run is judged: the migration terminal,
no host's stream ever refused (every hostd here is honest: a refusal would lock one out), the
invariant checker and `whimbrel-audit verify --final` clean over the log, the VM's QEMU
alive on exactly the host the log names and nowhere else (unless a fault killed a QEMU: then
on no other host), running there, that host holding the lease on the shared lockspace.

The seed fixes which faults strike at which points of the migration; the processes run in real
time, so a seed replays the same faults at the same points, not the same interleaving.
`python -m tools.shell_sim --seed N` replays one run and prints its timeline; a failed run
keeps its directory (the log, every hostd's output) and names it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from coordinator import codec
from coordinator.app import Coordinator
from coordinator.authz import Role, Roles
from coordinator.core import Event, World, evolve
from coordinator.core import recovery as table
from coordinator.core.invariants import InvariantChecker
from coordinator.core.state import CommandState, MigrationState, Phase
from coordinator.log import SqliteEventStore
from coordinator.main import start_server
from hostd import qemu
from hostd.drivers.lease import FileLeaseDriver
from hostd.executor import free_port
from tools.audit import timeline
from tools.audit.cli import main as audit_main
from tools.cluster import BIN
from tools.fleet import QMPSIM, ForkServer
from tools.tcp_proxy import TcpProxy
from whimbrel import pki, tls
from whimbrel.protocol import migration_stream
from whimbrel.v1 import (
    common_pb2,
    events_pb2,
    migration_pb2,
    migration_pb2_grpc,
    vm_pb2,
    vm_pb2_grpc,
)

__all__ = ["ROWS", "ROW_SCRIPTS", "Run", "RunFailed", "Strike", "row_name", "simulate"]

# A run moves the VM twice, along three hosts: m-1 from host-a to host-b, then m-2 from
# wherever m-1 left it to host-c (unless the VM was lost). Faults of the first can leave copies
# for the second to meet: a destination prepared late, a source destroyed only when its host
# returns.
SOURCE, DESTINATION, THIRD = "host-a", "host-b", "host-c"
HOSTS = (SOURCE, DESTINATION, THIRD)
VM = "vm-1"
MIGRATIONS = ("m-1", "m-2")
MODES = (
    common_pb2.MIGRATION_MODE_PRECOPY,
    common_pb2.MIGRATION_MODE_POSTCOPY,
    common_pb2.MIGRATION_MODE_AUTO,
)
PRECOPY, POSTCOPY = common_pb2.MIGRATION_MODE_PRECOPY, common_pb2.MIGRATION_MODE_POSTCOPY
# Recovery after a restart waits this long for hosts that are meant to return: far beyond a
# reconnect on loopback, so a host is "missing" only when the run chose it to be.
HOST_WAIT_S = 30.0
# ... and this long when the run keeps a host away on purpose.
MISSING_HOST_WAIT_S = 0.5
# The migration not ending (and no hostd freezing) within this fails the run; so does a settle
# that does not end within its limit. Beyond hostd's own longest wait (a destination's cont
# waits up to 30 s for the source's state), so a run fails only where nothing would end it.
STALL_LIMIT_S = 40.0
SETTLE_LIMIT_S = 45.0
MAX_FAULTS = 4
# Failpoints armed per hostd start while faults remain.
ARMED_PER_START = 2

# The simulated guest: 64 MiB, dirtied at 24 MiB/s over a 96 MiB/s link, time 4x: a pass takes
# a fraction of a second, pre-copy converges after a few, and a post-copy has pages still to
# pull while the destination runs.
VM_MEMORY_MIB = 64
QMPSIM_KNOBS = {
    "WHIMBREL_QMPSIM_SPEED": "4",
    "WHIMBREL_QMPSIM_DIRTY_RATE": str(24 << 20),
    "WHIMBREL_QMPSIM_LINK": str(96 << 20),
}

# Post-copy pulls the rest at 12 MiB/s (simulated): a second or so while the destination runs
# and pages still flow, so faults land in the middle of it.
POLICY = events_pb2.MigrationPolicy(
    auto_postcopy_max_passes=2,
    parameters=events_pb2.MigrationParameters(max_postcopy_bandwidth=12 << 20),
)

# Where a hostd may freeze: before and after each command a migration gives a host (either
# role: a rollback hands the source the destination's commands), and after the QMP events the
# switchover turns on.
_KINDS = (
    "prepare-incoming", "start-migration", "continue-switchover", "start-postcopy",
    "release-lease", "acquire-lease", "enable-network", "resume-vm", "announce",
    "cancel-migration", "recover-incoming", "resume-migration", "destroy-vm",
)  # fmt: skip
FAILPOINTS = (
    *(f"hostd.{when}-execute.{kind}" for kind in _KINDS for when in ("before", "after")),
    "hostd.after-qmp-event.STOP",
    "hostd.after-qmp-event.RESUME",
    "hostd.after-qmp-event.MIGRATION.pre-switchover",
    "hostd.after-qmp-event.MIGRATION.postcopy-active",
    "hostd.after-qmp-event.MIGRATION.completed",
    "hostd.after-qmp-event.MIGRATION.failed",
    "hostd.before-continue-at-pre-switchover",
)
_FROZEN = re.compile(r"failpoint (\S+) hit: stopping")


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


class Hostd:
    """One host's hostd process, started again on the same state dir after a kill (a new
    generation), and the wire to the coordinator the run can cut or refuse."""

    def __init__(self, host_id: str, sim: Cluster) -> None:
        self.host_id = host_id
        self.sim = sim
        self.state_dir = sim.root / host_id
        self.log = sim.root / f"{host_id}.log"
        self.stream = TcpProxy(0)  # its target is set once the coordinator listens
        self.stream.__enter__()
        self.migration_port = free_port("127.0.0.1")
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        # The failpoint this hostd is frozen at ("": running or gone).
        self.frozen_at = ""
        self.starts = 0
        # Everything its processes wrote, kept in the run's directory when it ends.
        self.output: list[bytes] = []

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self, failpoints: Iterable[str] = ()) -> None:
        armed = ",".join(f"{name}=stop" for name in failpoints)
        env = dict(os.environ, **self.sim.qemu_env, WHIMBREL_FAILPOINTS=armed)
        files = pki.ensure(self.sim.pki, "host", self.host_id).files
        args = [
            "--host-id", self.host_id,
            "--coordinator", f"127.0.0.1:{self.stream.port}",
            "--state-dir", str(self.state_dir), "--lockspace", str(self.sim.lockspace),
            "--migration-port", str(self.migration_port),
            "--migration-advertise", f"127.0.0.1:{self.sim.link_of(self.host_id).port}",
            "--tls-cert", str(files.cert), "--tls-key", str(files.key), "--tls-ca", str(files.ca),
        ]  # fmt: skip
        self.process = await asyncio.create_subprocess_exec(
            str(BIN / "whimbrel-hostd"), *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        self.starts += 1
        self.frozen_at = ""
        self._reader = asyncio.create_task(self._read(self.process), name=f"{self.host_id}-out")

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        """Keep hostd's output, and notice when a failpoint froze it."""
        assert process.stderr is not None
        while line := await process.stderr.readline():
            self.output.append(line)
            frozen = _FROZEN.search(line.decode(errors="replace"))
            if frozen:
                # It logs, then stops itself: only a stopped hostd is frozen (a SIGCONT sent
                # before its SIGSTOP would leave it stopped for good).
                await asyncio.to_thread(_until_stopped, process.pid)
                self.frozen_at = frozen[1]
                self.sim.changed()
        await process.wait()
        self.frozen_at = ""
        self.sim.changed()

    def cont(self) -> None:
        """A frozen hostd goes on from its failpoint."""
        if self.frozen_at and self.process is not None:
            self.frozen_at = ""
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGCONT)

    async def kill(self) -> None:
        """kill -9: nothing it held in memory survives; its state dir and QEMUs do."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        await self.process.wait()
        if self._reader is not None:
            await self._reader
        self.frozen_at = ""

    def running_commands(self) -> list[str]:
        """Commands this hostd started and has not finished (its store's record): one the
        coordinator no longer tracks may still act, as a stale PREPARE_INCOMING that
        launches a QEMU after its migration ended."""
        path = self.state_dir / "hostd.db"
        if not path.exists():
            return []
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT command_id FROM commands WHERE state = 'started'")
            return [command_id for (command_id,) in rows]
        finally:
            db.close()

    def qemu_pid(self) -> int:
        """The pid of the VM's QEMU alive on this host, else 0."""
        found = qemu.find(qemu.VmPaths(self.state_dir / "vms" / VM))
        return found.pid if found.runs else 0

    async def close(self) -> None:
        self.cont()
        await self.kill()
        self.stream.__exit__()
        await asyncio.to_thread(self.log.write_bytes, b"".join(self.output))


def _until_stopped(pid: int) -> None:
    """Block until child `pid` stops (or is gone)."""
    with contextlib.suppress(ChildProcessError):
        os.waitid(os.P_PID, pid, os.WSTOPPED)


# --- the cluster ------------------------------------------------------------------------------


class Cluster:
    """The real coordinator on a SQLite file, restartable, and two hostd processes on qmpsim."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.db = root / "whimbrel.db"
        self.lockspace = root / "locks"
        self.pki = _pki_dir()
        self.forks = ForkServer(root)
        self.qemu_env = {
            "WHIMBREL_QEMU": str(QMPSIM),
            "WHIMBREL_QMPSIM_PYTHON": sys.executable,
            **QMPSIM_KNOBS,
        }
        # The migration stream into each host goes through a relay the run can cut.
        self._links: dict[str, TcpProxy] = {}
        self.hosts = {h: Hostd(h, self) for h in HOSTS}
        self.store: SqliteEventStore | None = None
        self.app: Coordinator | None = None
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None
        self._changed = asyncio.Event()

    def link_of(self, host: str) -> TcpProxy:
        if host not in self._links:
            link = TcpProxy(self.hosts[host].migration_port)
            self._links[host] = link.__enter__()
        return self._links[host]

    @property
    def coordinator(self) -> Coordinator:
        assert self.app is not None
        return self.app

    @property
    def admin(self) -> grpc.aio.Channel:
        assert self._channel is not None
        return self._channel

    def changed(self) -> None:
        """Something outside the coordinator happened (a hostd froze or exited)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for_change(self, max_wait: float) -> None:
        """Until the next commit, or a hostd freezes or exits, or `max_wait` passed."""
        waits = [
            asyncio.ensure_future(self._changed.wait()),
            asyncio.ensure_future(self.coordinator.wait_for_change(max_wait)),
        ]
        await asyncio.wait(waits, timeout=max_wait, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()

    async def start(self) -> None:
        self.lockspace.mkdir(parents=True)
        self.forks.start()
        self.qemu_env["WHIMBREL_QMPSIM_FORKSERVER"] = str(self.forks.socket)
        await self.start_coordinator()

    async def start_coordinator(self, host_wait: float = HOST_WAIT_S) -> None:
        self.store = SqliteEventStore(self.db)
        self.app = Coordinator(self.store, host_wait=host_wait)
        await self.app.start()
        roles = Roles({"admin": Role.ADMIN})
        files = pki.ensure(self.pki, "coordinator").files
        self._server, port, _ = await start_server(self.app, "127.0.0.1:0", files, roles)
        for host in self.hosts.values():
            host.stream.target = ("127.0.0.1", port)
        self._channel = tls.aio_channel(
            f"127.0.0.1:{port}", pki.ensure(self.pki, "user", "admin").files
        )
        self.changed()

    async def stop_coordinator(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        if self._server is not None:
            await self._server.stop(grace=None)
        if self.app is not None:
            await self.app.close()
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
        self._server = self.app = self.store = self._channel = None
        for host in self.hosts.values():
            host.stream.cut()

    async def close(self) -> None:
        for host in self.hosts.values():
            await host.close()
        await self.stop_coordinator()
        for link in self._links.values():
            link.__exit__()
        for host in self.hosts.values():
            if pid := host.qemu_pid():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.forks.stop()

    def connected(self, world: World, host: str) -> bool:
        h = world.hosts.get(host)
        return h is not None and h.connected

    def outstanding(self, world: World) -> list[str]:
        """Commands issued and not answered, of open migrations and VMs."""
        commands = [
            c for mid in world.open_migrations for c in world.migrations[mid].commands.values()
        ]
        commands += [c for vm in world.vms.values() for c in vm.commands.values()]
        return [c.command_id for c in commands if c.state == CommandState.ISSUED]

    async def until(self, done: Callable[[World], bool], limit: float, what: str) -> World:
        """Until `done(world)` holds on the committed world, woken by every change."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while True:
            async with self.coordinator.reading() as world:
                if done(world):
                    return world
            if loop.time() > deadline:
                raise RunFailed(f"{what}: not within {limit:.0f} s")
            await self.wait_for_change(min(1.0, max(0.01, deadline - loop.time())))


_PKI: dict[str, Path] = {}


def _pki_dir() -> Path:
    """One PKI per process (issuing certificates is the slow part of a start)."""
    if "dir" not in _PKI:
        directory = Path(tempfile.mkdtemp(prefix="whimbrel-sim-pki-"))
        for host in HOSTS:
            pki.ensure(directory, "host", host)
        pki.ensure(directory, "user", "admin")
        pki.ensure(directory, "coordinator")
        _PKI["dir"] = directory
    return _PKI["dir"]


# --- one run ----------------------------------------------------------------------------------


@dataclass
class Run:
    seed: int
    mode: int
    migrations: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    killed: bool = False
    rows: set[str] = field(default_factory=set)
    outcome: str = ""
    reason: str = ""
    events: list[Event] = field(default_factory=list)
    seconds: float = 0.0
    root: Path | None = None

    def story(self) -> str:
        mode = common_pb2.MigrationMode.Name(self.mode)  # type: ignore[arg-type]
        lines = [f"seed {self.seed}, mode {mode}, files in {self.root}"]
        lines += [f"  {a}" for a in self.actions]
        for mid in self.migrations:
            lines.append(timeline.render(timeline.build(self.events, mid)))
        lines.append("the whole log:")
        lines += [
            f"  {e.seq:>4} e{e.epoch} {e.origin_host or 'coordinator':<12} "
            f"{timeline.summary(e)[:160]}"
            for e in self.events
        ]
        return "\n".join(lines)


@dataclass(frozen=True)
class Strike:
    """A scripted fault: when hostd on `host` freezes at `failpoint`, do `fault` (one of the
    scheduler's strikes, e.g. "coordinator restarts, host-a missing")."""

    host: str
    failpoint: str
    fault: str


@dataclass(frozen=True)
class Move:
    what: str
    weight: int
    do: Callable[[], Awaitable[None]]
    fault: bool = True


class Scheduler:
    """Seeded: the mode, the failpoints each hostd start arms, and the strike at each freeze."""

    def __init__(self, seed: int, root: Path) -> None:
        self.rng = random.Random(seed)
        self.cluster = Cluster(root)
        self.run = Run(seed, self.rng.choice(MODES), root=root)
        # How many migrations the run makes, and the one under way.
        self.chain = len(MIGRATIONS)
        self.migration = MIGRATIONS[0]

    def note(self, what: str) -> None:
        self.run.actions.append(what)

    def fault(self, what: str) -> None:
        self.note(f"FAULT {what}")
        self.run.faults.append(what)

    @property
    def striking(self) -> bool:
        return len(self.run.faults) < MAX_FAULTS

    def arm(self, host: str) -> list[str]:
        """The failpoints of the next start of `host`'s hostd."""
        return self.rng.sample(FAILPOINTS, ARMED_PER_START) if self.striking else []

    async def start_hostd(self, host: str) -> None:
        armed = self.arm(host)
        self.note(f"hostd on {host} starts" + (f", armed {', '.join(armed)}" if armed else ""))
        await self.cluster.hosts[host].start(armed)

    # --- strikes --------------------------------------------------------------------------

    def moves(self, world: World, frozen: Hostd) -> list[Move]:
        """What may happen while `frozen` waits at its failpoint."""
        h = frozen.host_id
        m = world.migrations[self.migration]
        open_ = not m.phase.terminal
        out = [Move(f"{h} goes on", 6, self._go_on(frozen), fault=False)]
        if not self.striking:
            return out
        out.append(Move(f"hostd on {h} killed and restarted", 3, self._restart_hostd(frozen)))
        for host in HOSTS:
            if self.cluster.hosts[host].qemu_pid():
                out.append(Move(f"QEMU on {host} killed", 1, self._kill_qemu(frozen, host)))
        if open_:
            out.append(Move("migration link cut", 3, self._cut_link(frozen)))
            out.append(Move("operator aborts", 1, self._abort(frozen)))
        out.append(Move(f"stream of {h} cut", 1, self._cut_stream(frozen)))
        choices = ((), (h,), (m.source,), (m.destination,), (m.source, m.destination))
        for missing in dict.fromkeys(tuple(sorted(c)) for c in choices):
            what = f"coordinator restarts, {', '.join(missing) or 'no host'} missing"
            out.append(Move(what, 2, self._restart_coordinator(frozen, missing)))
        return out

    def _go_on(self, frozen: Hostd) -> Callable[[], Awaitable[None]]:
        async def do() -> None:
            frozen.cont()

        return do

    def _restart_hostd(self, frozen: Hostd) -> Callable[[], Awaitable[None]]:
        async def do() -> None:
            await frozen.kill()
            await self.start_hostd(frozen.host_id)

        return do

    def _kill_qemu(self, frozen: Hostd, host: str) -> Callable[[], Awaitable[None]]:
        async def do() -> None:
            pid = self.cluster.hosts[host].qemu_pid()
            if pid:
                self.run.killed = True
                self.note(f"  kill -9 {pid}")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            else:
                # It exited since the move was chosen. (Pid 0 would be os.kill's "my process
                # group": the simulation itself, or the test run around it.)
                self.note(f"  no QEMU alive on {host} any more: nothing to kill")
            frozen.cont()

        return do

    def _cut_link(self, frozen: Hostd) -> Callable[[], Awaitable[None]]:
        async def do() -> None:
            for host in HOSTS:
                self.cluster.link_of(host).cut()
            frozen.cont()

        return do

    def _cut_stream(self, frozen: Hostd) -> Callable[[], Awaitable[None]]:
        async def do() -> None:
            frozen.stream.cut()
            frozen.cont()

        return do

    def _abort(self, frozen: Hostd) -> Callable[[], Awaitable[None]]:
        async def do() -> None:
            stub = migration_pb2_grpc.MigrationServiceStub(self.cluster.admin)
            request = migration_pb2.AbortMigrationRequest(migration_id=self.migration, reason="sim")
            try:
                await stub.AbortMigration(request)
            except grpc.aio.AioRpcError as err:
                # Past the point of no return an abort is refused: that is its answer.
                if err.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                self.note(f"  abort refused: {err.details()}")
            frozen.cont()

        return do

    def _restart_coordinator(
        self, frozen: Hostd, missing: tuple[str, ...]
    ) -> Callable[[], Awaitable[None]]:
        async def do() -> None:
            cluster = self.cluster
            await cluster.stop_coordinator()
            # A missing host is frozen, or its connections are refused, until recovery ended.
            away = [cluster.hosts[h] for h in missing]
            for host in away:
                host.stream.refusing = host is not frozen
            await cluster.start_coordinator(MISSING_HOST_WAIT_S if missing else HOST_WAIT_S)
            if frozen.host_id not in missing:
                frozen.cont()
            if away:
                async with asyncio.timeout(STALL_LIMIT_S):
                    await cluster.coordinator.recovered.wait()
            for host in away:
                host.stream.refusing = False
                host.cont()

        return do

    async def strike(self, world: World, frozen: Hostd) -> None:
        options = self.moves(world, frozen)
        (move,) = self.rng.choices(options, [o.weight for o in options])
        what = f"{frozen.host_id} frozen at {frozen.frozen_at}: {move.what}"
        self.fault(what) if move.fault else self.note(what)
        await move.do()

    # --- the run --------------------------------------------------------------------------

    def _frozen(self) -> Hostd | None:
        return next((h for h in self.cluster.hosts.values() if h.frozen_at), None)

    async def _drive(self, done: Callable[[World], bool], what: str) -> World:
        """Strike at every freeze until `done(world)` holds."""
        while True:
            world = await self.cluster.until(
                lambda w: self._frozen() is not None or done(w), STALL_LIMIT_S, what
            )
            frozen = self._frozen()
            if frozen is None:
                return world
            await self.strike(world, frozen)

    async def _migrate(self, migration_id: str, source: str, destination: str) -> World:
        """Start a migration once both hosts are connected, and drive it to its end."""
        cluster = self.cluster

        def ready(w: World) -> bool:
            # A VM a rollback left paused without its lease moves once it took it back and
            # runs (or will not: the request is then refused, as the operator's would be);
            # a VM with a command in flight is refused until it is answered.
            vm = w.vms[VM]
            settled = not vm.resume_owed and not vm.commands
            return settled and cluster.connected(w, source) and cluster.connected(w, destination)

        world = await self._drive(ready, f"{source} and {destination} connect")
        self.note(f"{migration_id}: {VM} {source} -> {destination}")
        migrations = migration_pb2_grpc.MigrationServiceStub(cluster.admin)
        try:
            await migrations.StartMigration(
                migration_pb2.StartMigrationRequest(
                    vm=VM,
                    destination=destination,
                    mode=self.run.mode,  # type: ignore[arg-type]
                    policy=POLICY,
                    migration_id=migration_id,
                )
            )
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            self.note(f"  refused: {err.details()}")
            return world
        self.migration = migration_id
        self.run.migrations.append(migration_id)
        return await self._drive(
            lambda w: w.migrations[migration_id].phase.terminal, f"{migration_id} stalled"
        )

    async def main(self) -> Run:
        cluster = self.cluster
        started = time.monotonic()
        await cluster.start()
        try:
            for host in HOSTS:
                await self.start_hostd(host)
            await self._start_vm()
            world = await self._migrate(MIGRATIONS[0], SOURCE, DESTINATION)
            vm = world.vms[VM]
            if self.chain > 1 and vm.host and world.migrations[MIGRATIONS[0]].phase != Phase.FENCED:
                await self._migrate(MIGRATIONS[1], vm.host, THIRD)
            world = await self.settle()
            self.run.events = self._read_log()
            self.judge(world)
        finally:
            if cluster.store is not None and not self.run.events:
                self.run.events = self._read_log()
            await cluster.close()
        self.run.seconds = time.monotonic() - started
        return self.run

    def _read_log(self) -> list[Event]:
        store = self.cluster.store
        return [codec.from_stored(s) for s in store.read()] if store is not None else []

    async def _start_vm(self) -> None:
        cluster = self.cluster
        await cluster.until(
            lambda w: all(cluster.connected(w, h) for h in HOSTS), STALL_LIMIT_S, "hosts connect"
        )
        vms = vm_pb2_grpc.VmServiceStub(cluster.admin)
        spec = common_pb2.VmSpec(name=VM, memory_mib=VM_MEMORY_MIB, vcpus=1)
        await vms.DefineVm(vm_pb2.DefineVmRequest(spec=spec))
        await vms.StartVm(vm_pb2.StartVmRequest(name=VM, host=SOURCE))

        def running(world: World) -> bool:
            # An armed failpoint (after RESUME) may freeze a host as the VM starts: it goes on.
            for host in cluster.hosts.values():
                host.cont()
            return world.vms[VM].running_hosts() == [SOURCE]

        await cluster.until(running, STALL_LIMIT_S, "the VM starts")

    async def settle(self) -> World:
        """No more faults: frozen hosts go on, dead ones start again, every host returns, and
        the migration ends with every command answered."""
        cluster = self.cluster
        self.note("settle")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_LIMIT_S
        while True:
            for host in cluster.hosts.values():
                host.stream.refusing = False
                host.cont()  # a failpoint armed earlier may still fire
                if not host.alive:
                    self.note(f"settle: hostd on {host.host_id} starts")
                    await host.start()
            async with cluster.coordinator.reading() as world:
                if (
                    all(world.migrations[mid].phase.terminal for mid in self.run.migrations)
                    and all(cluster.connected(world, h) for h in HOSTS)
                    and not cluster.outstanding(world)
                    and not any(host.running_commands() for host in cluster.hosts.values())
                ):
                    return world
                phase = world.migrations[self.migration].phase.label
            if loop.time() > deadline:
                raise RunFailed(f"not settled within {SETTLE_LIMIT_S:.0f} s: {phase}")
            await cluster.wait_for_change(1.0)

    def judge(self, world: World) -> None:
        """No split brain ever; no QEMU left that is not the VM; and unless a fault killed a
        QEMU, the VM runs on exactly one host, the one the log names, which holds its lease."""
        m = world.migrations[self.migration]
        self.run.outcome, self.run.reason = m.phase.label, m.reason
        alive = [h for h, host in self.cluster.hosts.items() if host.qemu_pid()]
        vm = world.vms[VM]
        running = vm.running_hosts()
        if len(running) > 1:
            raise RunFailed(f"the VM runs on {running}")
        strays = [h for h in alive if h != vm.host]
        if strays:
            raise RunFailed(f"a QEMU of the VM is left on {strays} after {m.phase.label}")
        if self.run.killed or _postcopy_cut_at_its_start(self.run.events, m):
            return
        lease = FileLeaseDriver(self.cluster.lockspace).read(VM).holder
        if alive != [vm.host] or running != [vm.host] or lease != vm.host:
            raise RunFailed(
                f"a healthy VM was lost: QEMU alive on {alive}, running on {running}, the "
                f"log's host {vm.host!r}, lease on {lease!r} ({m.phase.label}: {m.reason})"
            )


def _postcopy_cut_at_its_start(events: list[Event], m: MigrationState) -> bool:
    """The source of `m` paused its post-copy while the destination never entered it: the
    link broke as post-copy began. QEMU 7.2 can neither recover that (migrate-recover needs a
    paused destination) nor resume the source (a cancel leaves a paused source in
    `cancelling`): the VM is lost by QEMU's limits, and fencing it is the right end."""
    requested = next(
        (e.seq for e in events if e.stream == migration_stream(m.migration_id)), len(events)
    )
    source_paused = destination_entered = False
    for e in events[requested:]:
        p = e.payload
        if not isinstance(p, events_pb2.QmpEventReceived) or p.event != "MIGRATION":
            continue
        status = json.loads(p.data_json).get("status")
        if e.origin_host == m.source and status == "postcopy-paused":
            source_paused = True
        if e.origin_host == m.destination and status in ("postcopy-active", "postcopy-paused"):
            destination_entered = True
    return source_paused and not destination_entered


class ScriptedScheduler(Scheduler):
    """No randomness: each host arms the failpoints of the script's strikes (every start),
    and each freeze at a scripted failpoint gets its strike, once; every other freeze goes on."""

    def __init__(self, script: list[Strike], mode: int, root: Path) -> None:
        super().__init__(0, root)
        self.run.mode = mode
        self.chain = 1
        self.script = list(script)

    def arm(self, host: str) -> list[str]:
        return [s.failpoint for s in self.script if s.host == host]

    async def strike(self, world: World, frozen: Hostd) -> None:
        strike = next(
            (s for s in self.script if (s.host, s.failpoint) == (frozen.host_id, frozen.frozen_at)),
            None,
        )
        options = {o.what: o for o in self.moves(world, frozen)}
        if strike is None or strike.fault not in options:
            self.note(f"{frozen.host_id} frozen at {frozen.frozen_at}: goes on")
            frozen.cont()
            return
        self.script.remove(strike)
        self.fault(f"{frozen.host_id} frozen at {frozen.frozen_at}: {strike.fault}")
        await options[strike.fault].do()


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
    """The checks every run must pass: terminal, invariants clean, audit clean, and no stream
    refused (every hostd here is a real one: a refusal locks an honest host out)."""
    problems = []
    if run.outcome not in {p.label for p in (Phase.COMPLETED, Phase.ROLLED_BACK, Phase.FENCED)}:
        problems.append(f"migration ended {run.outcome!r}")
    problems += [
        f"an honest host was refused: {e.payload.reason}"
        for e in run.events
        if isinstance(e.payload, events_pb2.HostDisconnected)
        and e.payload.reason.startswith("stream refused")
    ]
    violations = InvariantChecker().check_quiescent(run.events)
    problems += [f"invariant {v}" for v in violations]
    out = io.StringIO()
    with redirect_stdout(out):
        code = audit_main(["verify", str(db), "--final"])
    if code != 0:
        problems.append(f"audit verify --final exited {code}: {out.getvalue().strip()}")
    if problems:
        raise RunFailed("; ".join(problems))


# Scripts that reach each row of the recovery table: a hostd frozen where the log pins the
# migration's stage, and the coordinator restarted with the row's host(s) missing.
_FREEZE_AT_STAGE = {
    # The destination has not prepared yet: nothing is sent.
    table.Stage.BEFORE_SWITCH: (PRECOPY, DESTINATION, "hostd.before-execute.prepare-incoming"),
    # The source stopped in pre-switchover (its hostd continues the switch by itself); the
    # destination's networking, asked for at that stop, not yet enabled.
    table.Stage.SWITCHING: (PRECOPY, DESTINATION, "hostd.before-execute.enable-network"),
    # Post-copy started; the destination waits to take the lease before it may run.
    table.Stage.POSTCOPY: (POSTCOPY, DESTINATION, "hostd.before-execute.acquire-lease"),
    # The destination's cont is logged, not yet sent; post-copy pages still flow.
    table.Stage.AFTER_CONT: (POSTCOPY, DESTINATION, "hostd.before-execute.resume-vm"),
}
_MISSING_HOSTS = {
    table.Missing.SOURCE: SOURCE,
    table.Missing.DESTINATION: DESTINATION,
    table.Missing.BOTH: f"{SOURCE}, {DESTINATION}",
}


def _restart(missing: table.Missing) -> str:
    return f"coordinator restarts, {_MISSING_HOSTS[missing]} missing"


ROW_SCRIPTS: dict[str, tuple[int, Strike]] = {
    row_name(stage, missing): (mode, Strike(host, failpoint, _restart(missing)))
    for stage, (mode, host, failpoint) in _FREEZE_AT_STAGE.items()
    for missing in table.Missing
}
# The destination ran and has everything; the source is about to be destroyed.
ROW_SCRIPTS[row_name(table.Stage.AFTER_CONT, table.Missing.SOURCE, completed=True)] = (
    PRECOPY,
    Strike(SOURCE, "hostd.before-execute.destroy-vm", _restart(table.Missing.SOURCE)),
)


async def _judged(scheduler: Scheduler) -> Run:
    run = scheduler.run
    try:
        await scheduler.main()
        run.rows = rows_reached(run.events)
        judge_log(run, scheduler.cluster.db)
    except (RunFailed, TimeoutError, grpc.aio.AioRpcError) as err:
        raise RunFailed(f"{type(err).__name__}: {err}\n{run.story()}") from err
    return run


def _root(directory: Path | None, name: str) -> Path:
    """Where a run keeps its files: short, since QMP and fork-server sockets live under it."""
    if directory is not None:
        return directory / name
    return Path(tempfile.mkdtemp(prefix=f"wsim-{name}-"))


async def simulate(seed: int, directory: Path | None = None) -> Run:
    """One run, every choice drawn from `seed`; raises RunFailed (with the seed, the faults,
    the migration's timeline and where its files are kept) when a rule is broken. A passed
    run's files are removed unless `directory` was given."""
    root = _root(directory, f"seed-{seed}")
    run = await _judged(Scheduler(seed, root))
    if directory is None:
        shutil.rmtree(root, ignore_errors=True)
    return run


async def simulate_script(script: list[Strike], mode: int, name: str) -> Run:
    """One scripted run (see ScriptedScheduler), judged as every run is; raises RunFailed if a
    strike never struck."""
    root = _root(None, name.replace("/", "-"))
    scheduler = ScriptedScheduler(script, mode, root)
    run = await _judged(scheduler)
    if scheduler.script:
        raise RunFailed(f"never struck: {scheduler.script}\n{run.story()}")
    shutil.rmtree(root, ignore_errors=True)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="replay one seeded simulation of the coordinator and hostd"
    )
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--root", type=Path, help="keep the run's files here")
    ns = parser.parse_args(argv)
    try:
        run = asyncio.run(simulate(ns.seed, ns.root))
    except RunFailed as err:
        print(err, file=sys.stderr)
        return 1
    print(run.story())
    print(f"ended {run.outcome}: {run.reason}; rows {sorted(run.rows)}; {run.seconds:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
