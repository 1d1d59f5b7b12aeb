"""Guest-visible pause of a switchover: destination RESUME minus source STOP, by QEMU's clocks.

Whimbrel: a coordinator and two hostd processes migrate one VM back and forth N times.
Baseline, in the same run: a script drives two QEMUs over QMP directly, with no coordinator,
doing the same handoff with the same drivers: on the source's stop it releases the source lease
(the same file lease driver) and enables destination networking (the same hook), acquires the
destination lease with a higher generation, then sends `cont` to the destination. Both sides
use the same QEMU command lines (hostd's), the same guest and the same capabilities.

Equal terms:
- the runs alternate, Whimbrel then baseline, so a slow minute of the shared machine falls on
  both sides alike; while the baseline runs, Whimbrel's idle guest is frozen (SIGSTOP), as its
  guest loop would otherwise take a CPU from the baseline that the baseline never takes back;
- the baseline runs in a process of its own, scheduled as the daemons schedule themselves
  (`whimbrel.priority.apply` with the daemons' defaults, before any thread starts), and starts
  its QEMUs as hostd does (`hostd.qemu.launch`: SCHED_OTHER, nice 0, a session of their own).
  The JSON reports the scheduling each process was found running with;
- both sides give QEMU the same migration parameters: the policy Whimbrel is asked for;
- a sample missing its STOP or RESUME, or a post-copy run that never went post-copy, is
  rejected and counted, never averaged in (`tools.bench.samples`).

Besides the pause's p50 and p99, `state_here_p50_ms` times, on both sides, the source's STOP
until the destination had the source's state (its postcopy-active, or completed in pre-copy):
QEMU's own share of the pause, which the guest waits for whatever the control plane does, and
which lengthens when the daemons' work takes the CPUs QEMU would switch on.

`WHIMBREL_BENCH_RUNS` overrides the number of migrations per side.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc

from coordinator.core.lifecycle import POSTCOPY_MODE_DOWNTIME_LIMIT_MS
from coordinator.core.validate import effective_policy
from hostd import migration_socket, qemu
from hostd.drivers.lease import FileLeaseDriver
from hostd.drivers.network import HookNetworkDriver, NetworkDriver
from hostd.executor import free_port
from hostd.qmp import QmpSession
from tools.bench.samples import QmpEvent, Sample, Tally
from tools.cluster import HOOK, Cluster, tear_down_on_sigterm
from tools.guest import boot_disk, random_ram
from whimbrel import heap, priority, tls
from whimbrel.v1 import (
    common_pb2,
    eventlog_pb2,
    eventlog_pb2_grpc,
    events_pb2,
    migration_pb2,
    migration_pb2_grpc,
)

# Migrations per side. A p99 needs about 100 samples to mean something: of 20, "p99" is in
# effect the largest, and one disk stall of the shared machine decides it.
RUNS = 100
RUNS_ENV = "WHIMBREL_BENCH_RUNS"
MEMORY_MIB = 128
# Random RAM (every page real data) keeps post-copy engaged: a mostly-zero guest can finish
# pre-copy before migrate-start-postcopy takes effect.
# Post-copy runs throttle pre-copy so the switch to post-copy always happens during pass 1;
# unthrottled, a small guest can finish in pre-copy before migrate-start-postcopy takes effect.
POSTCOPY_PRECOPY_BANDWIDTH = 100_000
VM = "vm-1"

# The scheduling of one process, e.g. "SCHED_RR 1, nice -10".
Scheduling = dict[str, str]
_POLICY_NAMES = {
    os.SCHED_OTHER: "SCHED_OTHER",
    os.SCHED_BATCH: "SCHED_BATCH",
    os.SCHED_IDLE: "SCHED_IDLE",
    os.SCHED_FIFO: "SCHED_FIFO",
    os.SCHED_RR: "SCHED_RR",
}


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def runs_wanted(default: int = RUNS) -> int:
    value = os.environ.get(RUNS_ENV, "")
    return int(value) if value else default


def scheduling_of(pid: int) -> str:
    """How the kernel schedules process `pid` (its main thread), e.g. "SCHED_RR 1, nice -10"."""
    try:
        policy = os.sched_getscheduler(pid)
        nice = os.getpriority(os.PRIO_PROCESS, pid)
        rt = os.sched_getparam(pid).sched_priority
    except (ProcessLookupError, PermissionError):
        return "gone"
    name = _POLICY_NAMES.get(policy, f"policy {policy}")
    return f"{name} {rt}, nice {nice}" if rt else f"{name}, nice {nice}"


def policy_for(postcopy: bool) -> events_pb2.MigrationPolicy:
    """The policy Whimbrel is asked for; the baseline applies its effective parameters."""
    parameters = events_pb2.MigrationParameters()
    if postcopy:
        parameters.max_bandwidth = POSTCOPY_PRECOPY_BANDWIDTH
    return events_pb2.MigrationPolicy(parameters=parameters)


def qmp_parameters(postcopy: bool) -> dict[str, int]:
    """`migrate-set-parameters` as hostd sends it for the policy the coordinator makes of
    `policy_for(postcopy)` (unset fields take the coordinator's defaults; mode postcopy its own
    downtime limit)."""
    p = effective_policy(policy_for(postcopy)).parameters
    named = {
        "max-bandwidth": p.max_bandwidth,
        "downtime-limit": POSTCOPY_MODE_DOWNTIME_LIMIT_MS if postcopy else p.downtime_limit_ms,
        "max-postcopy-bandwidth": p.max_postcopy_bandwidth,
    }
    return {name: value for name, value in named.items() if value}


class SeenScheduling:
    """Every distinct scheduling seen per role across the runs of one side."""

    def __init__(self) -> None:
        self.seen: dict[str, set[str]] = {}

    def add(self, observed: Scheduling) -> None:
        for role, value in observed.items():
            self.seen.setdefault(role, set()).add(value)

    def summary(self) -> Scheduling:
        return {role: " | ".join(sorted(values)) for role, values in sorted(self.seen.items())}


@contextlib.contextmanager
def frozen(pids: Iterable[int]) -> Iterator[None]:
    """Processes `pids` stopped (SIGSTOP) meanwhile, continued afterwards."""
    stopped = list(pids)
    for pid in stopped:
        with contextlib.suppress(ProcessLookupError):  # gone meanwhile: nothing to stop
            os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


# --- Whimbrel ---


class WhimbrelSide:
    """A coordinator and two hostds on loopback; `run` migrates the VM to the other host."""

    def __init__(self, root: Path, postcopy: bool, ram: Path | None, tls: bool = True) -> None:
        self.postcopy = postcopy
        self.mode = (
            common_pb2.MIGRATION_MODE_POSTCOPY if postcopy else common_pb2.MIGRATION_MODE_PRECOPY
        )
        # tls=False: the coordinator's insecure loopback mode, for the cost of mutual TLS.
        self.cluster = Cluster(root, tls=tls)
        self.hosts = ["host-a", "host-b"]
        try:
            self._start(ram)
        except BaseException:
            self.cluster.teardown()
            raise

    def _start(self, ram: Path | None) -> None:
        """The cluster, and the VM running on host-a."""
        for h in self.hosts:
            # The baseline's migration stream is plaintext: so is Whimbrel's here, and the
            # pause compares the control planes (migration.tls measures the stream's TLS).
            args = ["--no-migration-tls"] if self.cluster.tls else []
            if ram is not None:
                # hostd maps memory files from allowed roots only; the RAM file lies outside
                # the cluster's directory, as both sides use it.
                args += ["--allow-disk-root", str(ram.parent)]
            self.cluster.hostd_args[h] = args
        self.cluster.start(*self.hosts)
        self.cluster.define_and_start(VM, "host-a", memory_mib=MEMORY_MIB, ram_file=ram)

    def run(self, i: int) -> tuple[Sample, Scheduling]:
        """Migration m-`i`, to host-b for an even `i`, back to host-a for an odd one."""
        dest = self.hosts[(i + 1) % 2]
        head = self.cluster.head()
        self.cluster.migrations.StartMigration(
            migration_pb2.StartMigrationRequest(
                vm=VM,
                destination=dest,
                mode=common_pb2.MigrationMode.ValueType(self.mode),
                policy=policy_for(self.postcopy),
                migration_id=f"m-{i}",
            )
        )
        final = self.cluster.watch(f"m-{i}")
        if final.phase != common_pb2.MIGRATION_PHASE_COMPLETED:
            raise RuntimeError(f"migration m-{i} ended {final.phase}: {final.reason}")
        events = self._qmp_events(head + 1)
        sample = Sample.from_events(events.get(final.source, []), events.get(final.destination, []))
        pause = sample.pause_ms
        if pause is not None and round(pause * 1000) != final.pause_us:
            print(f"  whimbrel {i}: the log says {pause:.3f} ms, the migration "
                  f"{final.pause_us / 1000:.3f} ms", file=sys.stderr)  # fmt: skip
        return sample, self.scheduling()

    def _qmp_events(self, from_seq: int) -> dict[str, list[QmpEvent]]:
        """The VM's QMP events in the log from `from_seq` on, per host, in log order."""
        stub = eventlog_pb2_grpc.EventLogServiceStub(self.cluster.grpc)
        by_host: dict[str, list[QmpEvent]] = {}
        for event in stub.ReadEvents(eventlog_pb2.ReadEventsRequest(from_seq=from_seq)):
            if event.payload.WhichOneof("kind") != "qmp_event_received":
                continue
            qmp_event = event.payload.qmp_event_received
            if qmp_event.vm != VM:
                continue
            data = json.loads(qmp_event.data_json) if qmp_event.data_json else {}
            by_host.setdefault(event.origin.host_id, []).append(
                (qmp_event.event, data, event.time_us)
            )
        return by_host

    def _live_qemus(self) -> list[int]:
        return [pid for pid in self.cluster.qemu_pids() if qemu.alive(pid)]

    def scheduling(self) -> Scheduling:
        processes = self.cluster.processes
        observed = {
            "coordinator": scheduling_of(processes["coordinator"].popen.pid),
            "hostd": " | ".join(
                sorted({scheduling_of(processes[h].popen.pid) for h in self.hosts})
            ),
        }
        qemus = self._live_qemus()
        if qemus:
            observed["qemu"] = " | ".join(sorted({scheduling_of(pid) for pid in qemus}))
        return observed

    @contextlib.contextmanager
    def guest_frozen(self) -> Iterator[None]:
        """The VM's QEMU stopped (SIGSTOP) meanwhile: its guest loop keeps a CPU busy, which
        the baseline's runs would otherwise share and Whimbrel's never do. Nothing talks to it
        while no migration runs (hostd does not poll QMP), so nothing notices."""
        with frozen(self._live_qemus()):
            yield

    def close(self) -> None:
        self.cluster.teardown()


# --- the direct baseline ---


class DirectHandoff:
    """The baseline: one migration driven over QMP by this script alone. Each run starts both
    QEMUs afresh, named by their roles; a subclass may keep its QEMUs across runs and name them
    by host (`roles`), and say where the destination listens and how its network is driven."""

    def __init__(self, root: Path, spec: common_pb2.VmSpec, postcopy: bool) -> None:
        self.root, self.spec, self.postcopy = root, spec, postcopy
        self.lease = FileLeaseDriver(root / "locks")
        hook = root / "hook.sh"
        hook.write_text(HOOK.format(log=root / "hook.log"))
        hook.chmod(0o755)
        self.network = HookNetworkDriver(hook, "baseline")
        self.events: dict[str, asyncio.Queue[QmpEvent]] = {}
        self.seen: dict[str, list[QmpEvent]] = {}
        self.pids: dict[str, int] = {}
        self.qemu_scheduling: set[str] = set()
        # The names of this run's source and destination: their events' keys, their lease
        # holders, their host ids.
        self.roles = ("src", "dst")

    async def setup(self) -> None:
        """Before the first run: nothing here (each run starts its QEMUs)."""

    async def close(self) -> None:
        """After the last run: nothing here (each run kills its QEMUs)."""

    def _paths(self, name: str) -> qemu.VmPaths:
        return qemu.VmPaths(self.root / name)

    def _command_line(self, name: str, paths: qemu.VmPaths, incoming: bool) -> list[str]:
        return qemu.command_line(self.spec, paths, name, incoming=incoming)

    def _network(self, name: str) -> NetworkDriver:
        """The network driver of host `name`."""
        return self.network

    def _incoming_uri(self, name: str) -> str:
        """Where the destination on host `name` listens."""
        return f"tcp:127.0.0.1:{free_port('127.0.0.1')}"

    async def _start(self, name: str, incoming: bool, generation: int) -> QmpSession:
        paths = self._paths(name)
        # As hostd starts QEMU: SCHED_OTHER at nice 0 in a session of its own, whatever this
        # process runs at.
        self.pids[name] = await qemu.launch(
            self._command_line(name, paths, incoming), paths, self.spec.name
        )
        self.qemu_scheduling.add(scheduling_of(self.pids[name]))
        queue: asyncio.Queue[QmpEvent] = asyncio.Queue()
        self.events[name] = queue
        self.seen[name] = []

        async def sink(event: str, data: dict[str, Any], time_us: int) -> None:
            queue.put_nowait((event, data, time_us))

        def overflow(count: int) -> None:
            print(f"  direct {name}: {count} QMP events dropped", file=sys.stderr)

        session = QmpSession(name, str(paths.qmp))
        await session.connect(sink, overflow)
        if not incoming:
            await self.lease.acquire(self.spec.name, name, generation)
        return session

    async def _until(
        self, name: str, test: Callable[[str, Mapping[str, Any]], bool], limit: float
    ) -> int | None:
        """The time of the first event of `name` passing `test`, already seen or still to
        come (QEMU's order varies: a small guest can complete post-copy before RESUME); None
        if none came within `limit` seconds."""
        seen = self.seen[name]
        index = 0
        try:
            async with asyncio.timeout(limit):
                while True:
                    while index < len(seen):
                        event, data, time_us = seen[index]
                        index += 1
                        if test(event, data):
                            return time_us
                    seen.append(await self.events[name].get())
        except TimeoutError:
            return None

    def _sample(self) -> Sample:
        for name, queue in self.events.items():
            while not queue.empty():
                self.seen[name].append(queue.get_nowait())
        source, destination = self.roles
        return Sample.from_events(self.seen[source], self.seen[destination])

    async def run(self, generation: int) -> Sample:
        """One migration, src to dst; the sample says what QEMU reported, complete or not."""
        self.events, self.seen, self.pids, self.qemu_scheduling = {}, {}, {}, set()
        self.beside: list[asyncio.Task[int]] = []
        sessions: list[QmpSession] = []
        try:
            src = await self._start("src", False, generation)
            sessions.append(src)
            dst = await self._start("dst", True, generation)
            sessions.append(dst)
            await self._handoff(src, dst, generation)
            return self._sample()
        finally:
            await asyncio.gather(*self.beside)
            for session in sessions:
                await session.close()
            for pid in self.pids.values():
                await qemu.kill(pid)

    async def _handoff(self, src: QmpSession, dst: QmpSession, generation: int) -> None:
        s, d = self.roles
        network = self._network(d)
        caps = [
            {"capability": "events", "state": True},
            {"capability": "return-path", "state": True},
        ]
        if self.postcopy:
            caps.append({"capability": "postcopy-ram", "state": True})
        await dst.execute(
            "migrate-set-capabilities",
            {"capabilities": [*caps, {"capability": "late-block-activate", "state": True}]},
        )
        await network.apply("prepare", self.spec)
        uri = self._incoming_uri(d)
        await dst.execute("migrate-incoming", {"uri": uri})
        src_caps = (
            caps
            if self.postcopy
            else [*caps, {"capability": "pause-before-switchover", "state": True}]
        )
        await src.execute("migrate-set-capabilities", {"capabilities": src_caps})
        await src.execute("migrate-set-parameters", qmp_parameters(self.postcopy))
        await src.execute("migrate", {"uri": uri})
        vm = self.spec.name
        # Post-copy: postcopy-active comes before STOP; "completed" means it finished as
        # pre-copy instead (the sample is then rejected, the handoff still done).
        switched = ("postcopy-active", "completed") if self.postcopy else ("pre-switchover",)
        if self.postcopy:
            await src.execute("migrate-start-postcopy")
        # As hostd does: TCP_NODELAY on a pre-copy source's connection once active, beside.
        active = not self.postcopy and await self._until(
            s, lambda e, data: data.get("status") == "active", EVENT_WAIT_S
        )
        if active:
            self.beside.append(
                asyncio.create_task(
                    asyncio.to_thread(migration_socket.set_nodelay, self.pids[s], uri)
                )
            )
        switch = await self._until(s, lambda e, data: data.get("status") in switched, EVENT_WAIT_S)
        stop = await self._until(s, lambda e, data: e == "STOP", EVENT_WAIT_S)
        if switch is None or stop is None:
            return
        # The handoff order hostd and the coordinator follow: the source's lease goes once QEMU
        # can no longer resume it by itself (postcopy-active, or completed in pre-copy).
        if self.postcopy:
            await asyncio.gather(self.lease.release(vm, s), network.apply("enable", self.spec))
        else:
            await asyncio.gather(
                src.execute("migrate-continue", {"state": "pre-switchover"}),
                network.apply("enable", self.spec),
            )
            if await self._completed(s) is None:
                return
            await self.lease.release(vm, s)
            if await self._completed(d) is None:
                return
        await self.lease.acquire(vm, d, generation + 1)
        await dst.execute("cont")
        if await self._until(d, lambda e, data: e == "RESUME", EVENT_WAIT_S) is None:
            return
        await self._resumed(src, dst)

    async def _completed(self, name: str) -> int | None:
        """The time `name` reported its migration completed (None: it did not)."""
        return await self._until(
            name, lambda e, data: data.get("status") == "completed", EVENT_WAIT_S
        )

    async def _resumed(self, src: QmpSession, dst: QmpSession) -> None:
        """What follows the destination's RESUME. Here the run is over once the migration is:
        its destination gives the lease up too, as both QEMUs are killed next."""
        if self.postcopy:
            await self._completed(self.roles[1])
        await self.lease.release(self.spec.name, self.roles[1])

    def scheduling(self) -> Scheduling:
        """This process, and its QEMUs as they were once started."""
        observed = {"driver": scheduling_of(os.getpid())}
        if self.qemu_scheduling:
            observed["qemu"] = " | ".join(sorted(self.qemu_scheduling))
        return observed


# No single baseline migration may take longer than this; a hang becomes an error.
GUARD_S = 60
# An event that has not come this long after it was due is missing: the sample is incomplete.
EVENT_WAIT_S = 20


def _direct_spec(root: Path, ram: Path | None) -> common_pb2.VmSpec:
    disk = boot_disk(root / "disk.img")
    spec = common_pb2.VmSpec(
        name=VM,
        memory_mib=MEMORY_MIB,
        vcpus=1,
        machine="pc",
        disks=[common_pb2.Disk(path=str(disk), format="raw")],
    )
    if ram is not None:
        spec.memory_backing.kind = "file"
        spec.memory_backing.path = str(ram)
    return spec


def boot_sector_handoff(root: Path, postcopy: bool, ram: Path | None) -> DirectHandoff:
    """The baseline of the switchover bench: the boot-sector guest, RAM backed by `ram`."""
    return DirectHandoff(root, _direct_spec(root, ram), postcopy)


def _direct_process(conn: Connection, make: Callable[[], DirectHandoff]) -> None:
    """The baseline's process: scheduled as the daemons schedule themselves, then one handoff
    per generation received, answering (sample, scheduling) or an error message."""
    # The bench's SIGTERM reaches this process too: its runs kill their QEMUs on the way out.
    tear_down_on_sigterm()
    # As hostd and the coordinator do at their start, with their defaults, before any thread.
    priority.apply(priority.DEFAULT, priority.DEFAULT_REALTIME)
    handoff = make()
    # As the daemons do once started: no full collection of start-up objects in a pause.
    heap.freeze_startup_objects()
    with asyncio.Runner() as runner:
        try:
            runner.run(handoff.setup())
            while (generation := conn.recv()) is not None:
                try:
                    sample = runner.run(asyncio.wait_for(handoff.run(generation), GUARD_S))
                except TimeoutError:
                    conn.send(("error", f"a direct handoff did not finish in {GUARD_S}s"))
                    return
                except Exception as err:
                    conn.send(("error", f"direct handoff: {type(err).__name__}: {err}"))
                    return
                conn.send(("sample", sample, handoff.scheduling()))
        finally:
            runner.run(handoff.close())


class DirectSide:
    """The baseline, in a process of its own; `run` does one handoff there. `make` (picklable:
    it is sent to that process) builds the handoff there; by default the switchover bench's."""

    def __init__(
        self,
        root: Path,
        postcopy: bool,
        ram: Path | None,
        make: Callable[[], DirectHandoff] | None = None,
    ) -> None:
        root.mkdir(parents=True, exist_ok=True)
        if make is None:
            make = functools.partial(boot_sector_handoff, root, postcopy, ram)
        # spawn: a fresh interpreter, with none of this process's threads (gRPC's) or state.
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_direct_process, args=(child, make), name="direct-baseline"
        )
        self.process.start()
        child.close()

    def run(self, i: int) -> tuple[Sample, Scheduling]:
        self.conn.send(2 * i + 1)
        if not self.conn.poll(GUARD_S + 30):
            raise RuntimeError(f"direct handoff {i}: no answer in {GUARD_S + 30}s")
        try:
            reply = self.conn.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(f"the baseline process exited ({self.process.exitcode})") from None
        if reply[0] == "error":
            raise RuntimeError(f"direct handoff {i}: {reply[1]}")
        _, sample, scheduling = reply
        return sample, scheduling

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()


# --- the bench ---


def _log(side: str, i: int, sample: Sample, tally: Tally) -> None:
    rejection = tally.add(sample)
    what = f"{sample.pause_ms:.1f} ms" if rejection is None else f"rejected ({rejection.value})"
    print(f"  {side} {i}: {what}", file=sys.stderr, flush=True)


def whimbrel_pauses(mode: int, runs: int, root: Path, ram: Path | None = None) -> list[float]:
    """Whimbrel alone, `runs` migrations: the accepted pauses (for a look at one side)."""
    postcopy = mode == common_pb2.MIGRATION_MODE_POSTCOPY
    tally = Tally(postcopy)
    side = WhimbrelSide(root, postcopy, ram)
    try:
        for i in range(runs):
            _log("whimbrel", i, side.run(i)[0], tally)
    finally:
        side.close()
    return tally.pauses_ms


def direct_pauses(postcopy: bool, runs: int, root: Path, ram: Path | None = None) -> list[float]:
    """The baseline alone, `runs` handoffs: the accepted pauses (for a look at one side)."""
    tally = Tally(postcopy)
    side = DirectSide(root, postcopy, ram)
    try:
        for i in range(runs):
            _log("direct", i, side.run(i)[0], tally)
    finally:
        side.close()
    return tally.pauses_ms


def compared_scheduling(
    label: str, ours: SeenScheduling, base: SeenScheduling
) -> dict[str, Scheduling]:
    """Both sides' scheduling for the JSON; a warning on stderr when the baseline's driver did
    not run as Whimbrel's daemons did."""
    scheduling = {"whimbrel": ours.summary(), "direct": base.summary()}
    daemons = {scheduling["whimbrel"].get("coordinator"), scheduling["whimbrel"].get("hostd")}
    if daemons != {scheduling["direct"].get("driver")}:
        print(f"  {label}: the sides were not scheduled alike: {scheduling}", file=sys.stderr)
    return scheduling


def bench(mode: str, runs: int | None = None) -> list[dict[str, object]]:
    postcopy = mode == "postcopy"
    runs = runs_wanted() if runs is None else runs
    ours, base = Tally(postcopy), Tally(postcopy)
    ours_sched, base_sched = SeenScheduling(), SeenScheduling()
    with tempfile.TemporaryDirectory() as tmp:
        ram = random_ram(Path(tmp) / "ram.bin", MEMORY_MIB) if postcopy else None
        direct = DirectSide(Path(tmp) / "direct", postcopy, ram)
        try:
            whimbrel = WhimbrelSide(Path(tmp) / "whimbrel", postcopy, ram)
            try:
                for i in range(runs):
                    sample, seen = whimbrel.run(i)
                    ours_sched.add(seen)
                    _log("whimbrel", i, sample, ours)
                    with whimbrel.guest_frozen():
                        sample, seen = direct.run(i)
                    base_sched.add(seen)
                    _log("direct", i, sample, base)
            finally:
                whimbrel.close()
        finally:
            direct.close()
    scheduling = compared_scheduling(mode, ours_sched, base_sched)
    rows = pause_rows(f"switchover.pause.{mode}", mode, ("whimbrel", ours), ("direct", base))
    rows.append(state_here_row(f"switchover.pause.{mode}", ours, base))
    return [{**row, "scheduling": scheduling} for row in rows]


def state_here_row(bench: str, ours: Tally, base: Tally) -> dict[str, object]:
    """p50 of the time from the source's STOP until the destination had the source's state
    (what hostd's cont waits for), both sides: how much of the pause is QEMU's own switch and
    how much it is slowed by what else runs then."""
    if not ours.state_here_ms or not base.state_here_ms:
        raise RuntimeError(f"{bench}: no sample says when the destination had the state")
    value, reference = percentile(ours.state_here_ms, 50), percentile(base.state_here_ms, 50)
    return {
        "bench": f"{bench}.state_here_p50_ms",
        "value": round(value, 2),
        "unit": "ms",
        "baseline": round(reference, 2),
        "ratio": round(value / reference, 3),
        "samples": {"whimbrel": len(ours.state_here_ms), "direct": len(base.state_here_ms)},
    }


def pause_rows(
    bench: str, mode: str, measured: tuple[str, Tally], baseline: tuple[str, Tally]
) -> list[dict[str, object]]:
    """p50 and p99 of the measured side's pauses against the baseline side's of the same run;
    every sample printed to stderr, and a side with no sample left is an error."""
    for side, tally in (measured, baseline):
        print(f"  {mode}: {side} pauses ms {sorted(round(p, 1) for p in tally.pauses_ms)}; "
              f"rejected {tally.rejected_counts()}", file=sys.stderr)  # fmt: skip
        if not tally.pauses_ms:
            raise RuntimeError(f"{mode}: every {side} sample was rejected")
    (name, ours), (base_name, base) = measured, baseline
    rows: list[dict[str, object]] = []
    for p in (50, 99):
        value, reference = percentile(ours.pauses_ms, p), percentile(base.pauses_ms, p)
        rows.append(
            {
                "bench": f"{bench}.p{p}_ms",
                "value": round(value, 2),
                "unit": "ms",
                "baseline": round(reference, 2),
                "ratio": round(value / reference, 3),
                "samples": {name: len(ours.pauses_ms), base_name: len(base.pauses_ms)},
                "rejected": {name: ours.rejected_counts(), base_name: base.rejected_counts()},
            }
        )
    return rows


# --- under a flood of reads ---------------------------------------------------------------------

# Watchers of the migration under way in the flood bench (issue 11: reads must not lengthen it).
FLOOD_WATCHERS = 50
# Pairs of the flood bench alternate their order (flooded then quiet, quiet then flooded), so
# each side migrates host-a -> host-b as often as back, and neither always follows the other.
_FLOODED_FIRST = (True, False, False, True)
_TERMINAL = frozenset(
    {
        common_pb2.MIGRATION_PHASE_COMPLETED,
        common_pb2.MIGRATION_PHASE_ROLLED_BACK,
        common_pb2.MIGRATION_PHASE_FENCED,
    }
)


class ReadFlood:
    """Reads against a cluster's coordinator from a thread of their own, while it flows:
    `watchers` WatchMigration streams on whichever migration is open (each re-watches the next
    one) and a ListMigrations loop, one call after another. Between `resume` and `pause` only:
    `pause` returns once every call it made has ended, so a quiet run has none in flight."""

    def __init__(self, cluster: Cluster, watchers: int = FLOOD_WATCHERS) -> None:
        self.address = cluster.address
        self.files = cluster.identity("user", "admin").files if cluster.tls else None
        self.watchers = watchers
        self.lists = 0
        self.updates = 0
        self.watches = 0
        self.errors = 0
        self.flowing_s = 0.0
        self._open = ""  # the open migration the last ListMigrations showed
        self._opened: asyncio.Event | None = None  # set (and replaced) when `_open` changes
        self._since = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._stub: migration_pb2_grpc.MigrationServiceAsyncStub | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="read-flood", daemon=True)

    def start(self) -> ReadFlood:
        """The flood's thread and channel, not flowing yet."""
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the read flood's thread did not start")
        return self

    def resume(self) -> None:
        self._call(self._resume())

    def pause(self) -> None:
        self._call(self._pause())

    @contextlib.contextmanager
    def flowing(self) -> Iterator[None]:
        """The flood flowing meanwhile, and no call of it in flight afterwards."""
        self.resume()
        try:
            yield
        finally:
            self.pause()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def summary(self) -> dict[str, float]:
        rate = self.lists / self.flowing_s if self.flowing_s else 0.0
        return {
            "watchers": self.watchers,
            "watches": self.watches,
            "updates": self.updates,
            "lists": self.lists,
            "lists_per_s": round(rate),
            "errors": self.errors,
        }

    def _call(self, step: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None, "start the flood first"
        asyncio.run_coroutine_threadsafe(step, self._loop).result(30)

    def _main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        channel = tls.aio_channel(self.address, self.files)
        self._stub = migration_pb2_grpc.MigrationServiceStub(channel)
        self._ready.set()
        await self._stop.wait()
        await self._pause()
        await channel.close()

    async def _resume(self) -> None:
        assert self._stub is not None
        if self._tasks:
            return
        self._open, self._opened = "", asyncio.Event()
        self._since = time.monotonic()
        self._tasks = [asyncio.create_task(self._list(self._stub))]
        self._tasks += [asyncio.create_task(self._watch(self._stub)) for _ in range(self.watchers)]

    async def _pause(self) -> None:
        tasks, self._tasks = self._tasks, []
        if not tasks:
            return
        for task in tasks:
            task.cancel()
        # A cancelled task has cancelled its call: nothing of the flood is in flight after this.
        await asyncio.gather(*tasks, return_exceptions=True)
        self.flowing_s += time.monotonic() - self._since

    def _set_open(self, migration_id: str) -> None:
        if migration_id != self._open and self._opened is not None:
            self._open = migration_id
            self._opened.set()
            self._opened = asyncio.Event()

    async def _list(self, stub: migration_pb2_grpc.MigrationServiceAsyncStub) -> None:
        while True:
            try:
                listed = await stub.ListMigrations(migration_pb2.ListMigrationsRequest())
            except grpc.aio.AioRpcError:
                self.errors += 1
                await asyncio.sleep(0.1)  # a back-off, not a wait for something
                continue
            self.lists += 1
            opened = [m.migration_id for m in listed.migrations if m.phase not in _TERMINAL]
            self._set_open(opened[0] if opened else "")

    async def _watch(self, stub: migration_pb2_grpc.MigrationServiceAsyncStub) -> None:
        watched = ""
        while True:
            while not self._open or self._open == watched:
                assert self._opened is not None
                await self._opened.wait()
            watched = self._open
            self.watches += 1
            request = migration_pb2.WatchMigrationRequest(migration_id=watched)
            try:
                async for _ in stub.WatchMigration(request):
                    self.updates += 1
            except grpc.aio.AioRpcError:
                self.errors += 1


def flooded_first(i: int) -> bool:
    """Whether run `i` of the flood bench is flooded (else quiet): pairs alternate their order,
    flooded-quiet then quiet-flooded."""
    return _FLOODED_FIRST[i % len(_FLOODED_FIRST)]


def flood_bench(
    mode: str, runs: int | None = None, watchers: int = FLOOD_WATCHERS
) -> list[dict[str, object]]:
    """Whimbrel's pauses with and without a ReadFlood, on one cluster, interleaved run by run
    (no direct baseline): the value is the pause under the flood, the baseline the same
    cluster's pause with no read of the flood in flight. `runs` migrations per side."""
    postcopy = mode == "postcopy"
    runs = runs_wanted() if runs is None else runs
    flooded, quiet = Tally(postcopy), Tally(postcopy)
    with tempfile.TemporaryDirectory() as tmp:
        ram = random_ram(Path(tmp) / "ram.bin", MEMORY_MIB) if postcopy else None
        side = WhimbrelSide(Path(tmp) / "whimbrel", postcopy, ram)
        try:
            reads = ReadFlood(side.cluster, watchers).start()
            try:
                for i in range(2 * runs):
                    if flooded_first(i):
                        with reads.flowing():
                            sample, _ = side.run(i)
                        _log("flooded", i, sample, flooded)
                    else:
                        _log("quiet", i, side.run(i)[0], quiet)
            finally:
                reads.stop()
        finally:
            side.close()
    rows = pause_rows(f"switchover.flood.{mode}", mode, ("flooded", flooded), ("quiet", quiet))
    flood = reads.summary()
    print(f"  {mode}: flood {flood}", file=sys.stderr, flush=True)
    return [{**row, "flood": flood} for row in rows]


def tls_bench(mode: str, runs: int | None = None) -> list[dict[str, object]]:
    """What mutual TLS on the control channels costs the pause: two clusters, one with TLS and
    one in the insecure loopback mode, interleaved run by run (the idle one's guest frozen).
    The value is the pause with TLS, the baseline the same run's pause without it."""
    postcopy = mode == "postcopy"
    runs = runs_wanted() if runs is None else runs
    with_tls, without = Tally(postcopy), Tally(postcopy)
    with tempfile.TemporaryDirectory() as tmp:
        ram = random_ram(Path(tmp) / "ram.bin", MEMORY_MIB) if postcopy else None
        secure = WhimbrelSide(Path(tmp) / "tls", postcopy, ram)
        try:
            plain = WhimbrelSide(Path(tmp) / "plain", postcopy, ram, tls=False)
            try:
                for i in range(runs):
                    with plain.guest_frozen():
                        _log("tls", i, secure.run(i)[0], with_tls)
                    with secure.guest_frozen():
                        _log("plain", i, plain.run(i)[0], without)
            finally:
                plain.close()
        finally:
            secure.close()
    return pause_rows(f"switchover.tls.{mode}", mode, ("tls", with_tls), ("plain", without))
