"""Guest-visible pause of a switchover: destination RESUME minus source STOP, by QEMU's clocks.

Whimbrel: a coordinator and two hostd processes migrate one VM back and forth N times.
Baseline, in the same run: a script drives two QEMUs over QMP directly, with no coordinator,
doing the same handoff with the same drivers: on the source's stop it releases the source lease
(the same file lease driver) and enables destination networking (the same hook), acquires the
destination lease with a higher generation, then sends `cont` to the destination. Both sides
use the same QEMU command lines (hostd's), the same guest and the same capabilities.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from hostd import qemu
from hostd.drivers.lease import FileLeaseDriver
from hostd.drivers.network import HookNetworkDriver
from hostd.executor import free_port
from hostd.qmp import QmpSession
from tools.cluster import HOOK, Cluster
from tools.guest import boot_disk, random_ram
from whimbrel import heap, tls
from whimbrel.v1 import common_pb2, migration_pb2, migration_pb2_grpc

# Migrations per side. A p99 needs about 100 samples to mean something: of 20, "p99" is in
# effect the largest, and one disk stall of the shared machine decides it.
RUNS = 100
MEMORY_MIB = 128
# Random RAM (every page real data) keeps post-copy engaged: a mostly-zero guest can finish
# pre-copy before migrate-start-postcopy takes effect.
# Post-copy runs throttle pre-copy so the switch to post-copy always happens during pass 1;
# unthrottled, a small guest can finish in pre-copy before migrate-start-postcopy takes effect.
POSTCOPY_PRECOPY_BANDWIDTH = 100_000


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def whimbrel_pauses(
    mode: int, runs: int, root: Path, ram: Path | None = None, flood: int = 0
) -> list[float]:
    """Pauses of `runs` migrations back and forth; with `flood` watchers, under a ReadFlood."""
    cluster = Cluster(root)
    reads: ReadFlood | None = None
    try:
        cluster.start("host-a", "host-b")
        cluster.define_and_start("vm-1", "host-a", memory_mib=MEMORY_MIB, ram_file=ram)
        reads = ReadFlood(cluster, flood).start() if flood else None
        pauses = []
        hosts = ["host-a", "host-b"]
        for i in range(runs):
            dest = hosts[(i + 1) % 2]
            cluster.migrations.StartMigration(
                migration_pb2.StartMigrationRequest(
                    vm="vm-1",
                    destination=dest,
                    mode=common_pb2.MigrationMode.ValueType(mode),
                    migration_id=f"m-{i}",
                )
            )
            final = cluster.watch(f"m-{i}")
            if final.phase != common_pb2.MIGRATION_PHASE_COMPLETED:
                raise RuntimeError(f"migration m-{i} ended {final.phase}: {final.reason}")
            pauses.append(final.pause_us / 1000)
            print(f"  whimbrel {i}: {pauses[-1]:.1f} ms", file=sys.stderr, flush=True)
        return pauses
    finally:
        if reads is not None:
            reads.stop()
        cluster.teardown()


class DirectHandoff:
    """The baseline: one migration driven over QMP by this script alone."""

    def __init__(self, root: Path, spec: common_pb2.VmSpec, postcopy: bool) -> None:
        self.root, self.spec, self.postcopy = root, spec, postcopy
        self.lease = FileLeaseDriver(root / "locks")
        hook = root / "hook.sh"
        hook.write_text(HOOK.format(log=root / "hook.log"))
        hook.chmod(0o755)
        self.network = HookNetworkDriver(hook, "baseline")
        self.events: dict[str, asyncio.Queue[tuple[str, dict[str, Any], int]]] = {}
        self.seen: dict[str, list[tuple[str, dict[str, Any], int]]] = {}

    async def _start(self, name: str, incoming: bool, generation: int) -> tuple[int, QmpSession]:
        paths = qemu.VmPaths(self.root / name)
        pid = await qemu.launch(
            qemu.command_line(self.spec, paths, name, incoming=incoming), paths, self.spec.name
        )
        queue: asyncio.Queue[tuple[str, dict[str, Any], int]] = asyncio.Queue()
        self.events[name] = queue
        self.seen[name] = []

        async def sink(event: str, data: dict[str, Any], time_us: int) -> None:
            queue.put_nowait((event, data, time_us))

        session = QmpSession(name, str(paths.qmp))
        await session.connect(sink)
        if not incoming:
            await self.lease.acquire(self.spec.name, name, generation)
        return pid, session

    async def _until(self, name: str, test) -> int:  # type: ignore[no-untyped-def]
        """The time of the first event of `name` passing `test`, already seen or still to
        come (QEMU's order varies: a small guest can complete post-copy before RESUME)."""
        seen = self.seen.setdefault(name, [])
        index = 0
        while True:
            while index < len(seen):
                event, data, time_us = seen[index]
                index += 1
                if test(event, data):
                    return time_us
            seen.append(await self.events[name].get())

    async def _stopped_and(self, status: str) -> int:
        """Wait for the source's STOP and MIGRATION `status`, in whichever order QEMU sends
        them (postcopy-active comes before STOP); returns STOP's time."""
        await self._until("src", lambda e, d: d.get("status") == status)
        return await self._until("src", lambda e, d: e == "STOP")

    async def run(self, generation: int) -> float:
        src_pid, src = await self._start("src", False, generation)
        dst_pid, dst = await self._start("dst", True, generation)
        try:
            caps = [{"capability": "events", "state": True}]
            if self.postcopy:
                caps.append({"capability": "postcopy-ram", "state": True})
            await dst.execute(
                "migrate-set-capabilities",
                {"capabilities": [*caps, {"capability": "late-block-activate", "state": True}]},
            )
            await self.network.apply("prepare", self.spec)
            uri = f"tcp:127.0.0.1:{free_port('127.0.0.1')}"
            await dst.execute("migrate-incoming", {"uri": uri})
            src_caps = (
                caps
                if self.postcopy
                else [*caps, {"capability": "pause-before-switchover", "state": True}]
            )
            await src.execute("migrate-set-capabilities", {"capabilities": src_caps})
            if self.postcopy:
                await src.execute(
                    "migrate-set-parameters", {"max-bandwidth": POSTCOPY_PRECOPY_BANDWIDTH}
                )
            await src.execute("migrate", {"uri": uri})
            vm = self.spec.name
            if self.postcopy:
                await src.execute("migrate-start-postcopy")
                stop_us = await self._stopped_and("postcopy-active")
                await asyncio.gather(
                    self.lease.release(vm, "src"), self.network.apply("enable", self.spec)
                )
            else:
                stop_us = await self._stopped_and("pre-switchover")
                await asyncio.gather(
                    self.lease.release(vm, "src"), self.network.apply("enable", self.spec)
                )
                await src.execute("migrate-continue", {"state": "pre-switchover"})
                await self._until("dst", lambda e, d: d.get("status") == "completed")
            await self.lease.acquire(vm, "dst", generation + 1)
            await dst.execute("cont")
            resume_us = await self._until("dst", lambda e, d: e == "RESUME")
            if self.postcopy:
                await self._until("dst", lambda e, d: d.get("status") == "completed")
            await self.lease.release(vm, "dst")
            return (resume_us - stop_us) / 1000
        finally:
            for session in (src, dst):
                await session.close()
            for pid in (src_pid, dst_pid):
                await qemu.kill(pid)


# No single baseline migration may take longer than this; a hang becomes an error.
GUARD_S = 60


async def direct_pauses(
    postcopy: bool, runs: int, root: Path, ram: Path | None = None
) -> list[float]:
    disk = boot_disk(root / "disk.img")
    spec = common_pb2.VmSpec(
        name="vm-1",
        memory_mib=MEMORY_MIB,
        vcpus=1,
        machine="pc",
        disks=[common_pb2.Disk(path=str(disk), format="raw")],
    )
    if ram is not None:
        spec.memory_backing.kind = "file"
        spec.memory_backing.path = str(ram)
    handoff = DirectHandoff(root, spec, postcopy)
    # As the daemons do once started: no full collection of start-up objects in a pause.
    heap.freeze_startup_objects()
    pauses = []
    for i in range(runs):
        try:
            pauses.append(await asyncio.wait_for(handoff.run(generation=2 * i + 1), GUARD_S))
        except TimeoutError:
            raise RuntimeError(f"direct handoff {i} did not finish in {GUARD_S}s") from None
        print(f"  direct {i}: {pauses[-1]:.1f} ms", file=sys.stderr, flush=True)
    return pauses


def bench(mode: str, runs: int = RUNS) -> list[dict[str, object]]:
    postcopy = mode == "postcopy"
    pb_mode = common_pb2.MIGRATION_MODE_POSTCOPY if postcopy else common_pb2.MIGRATION_MODE_PRECOPY
    with tempfile.TemporaryDirectory() as tmp:
        ram = random_ram(Path(tmp) / "ram.bin", MEMORY_MIB) if postcopy else None
        ours = whimbrel_pauses(pb_mode, runs, Path(tmp) / "whimbrel", ram)
        (Path(tmp) / "direct").mkdir()
        base = asyncio.run(direct_pauses(postcopy, runs, Path(tmp) / "direct", ram))
    print(f"  {mode}: whimbrel pauses ms {sorted(round(p, 1) for p in ours)}", file=sys.stderr)
    print(f"  {mode}: direct   pauses ms {sorted(round(p, 1) for p in base)}", file=sys.stderr)
    out = []
    for p in (50, 99):
        out.append(
            {
                "bench": f"switchover.pause.{mode}.p{p}_ms",
                "value": round(percentile(ours, p), 2),
                "unit": "ms",
                "baseline": round(percentile(base, p), 2),
            }
        )
    return out


# --- under a flood of reads ---------------------------------------------------------------------

# Watchers of the migration under way in the flood bench (issue 11: reads must not lengthen it).
FLOOD_WATCHERS = 50


class ReadFlood:
    """Reads against a cluster's coordinator, from a thread of their own: `watchers`
    WatchMigration streams on whichever migration is open (each re-watches the next one) and a
    ListMigrations loop, one call after another, for as long as it runs."""

    def __init__(self, cluster: Cluster, watchers: int = FLOOD_WATCHERS) -> None:
        self.address = cluster.address
        self.files = cluster.identity("user", "admin").files if cluster.tls else None
        self.watchers = watchers
        self.lists = 0
        self.updates = 0
        self.watches = 0
        self.errors = 0
        self._open = ""  # the open migration the last ListMigrations showed
        self._started = 0.0
        self._elapsed = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="read-flood", daemon=True)

    def start(self) -> ReadFlood:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        rate = self.lists / self._elapsed if self._elapsed else 0.0
        print(
            f"  flood: {self.watchers} watchers, {self.watches} watches, {self.updates} updates; "
            f"{self.lists} ListMigrations ({rate:.0f}/s); {self.errors} errors",
            file=sys.stderr, flush=True,
        )  # fmt: skip

    def _main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        channel = tls.aio_channel(self.address, self.files)
        stub = migration_pb2_grpc.MigrationServiceStub(channel)
        self._started = time.monotonic()
        tasks = [asyncio.create_task(self._list(stub))]
        tasks += [asyncio.create_task(self._watch(stub)) for _ in range(self.watchers)]
        self._ready.set()
        await self._stop.wait()
        self._elapsed = time.monotonic() - self._started
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await channel.close()

    async def _list(self, stub: migration_pb2_grpc.MigrationServiceAsyncStub) -> None:
        while True:
            try:
                listed = await stub.ListMigrations(migration_pb2.ListMigrationsRequest())
            except grpc.aio.AioRpcError:
                self.errors += 1
                await asyncio.sleep(0.1)
                continue
            self.lists += 1
            terminal = {
                common_pb2.MIGRATION_PHASE_COMPLETED,
                common_pb2.MIGRATION_PHASE_ROLLED_BACK,
                common_pb2.MIGRATION_PHASE_FENCED,
            }
            opened = [m.migration_id for m in listed.migrations if m.phase not in terminal]
            self._open = opened[0] if opened else ""

    async def _watch(self, stub: migration_pb2_grpc.MigrationServiceAsyncStub) -> None:
        watched = ""
        while True:
            if not self._open or self._open == watched:
                await asyncio.sleep(0.01)
                continue
            watched = self._open
            self.watches += 1
            request = migration_pb2.WatchMigrationRequest(migration_id=watched)
            try:
                async for _ in stub.WatchMigration(request):
                    self.updates += 1
            except grpc.aio.AioRpcError:
                self.errors += 1


def flood_bench(
    mode: str, runs: int = RUNS, watchers: int = FLOOD_WATCHERS
) -> list[dict[str, object]]:
    """Whimbrel's pauses without, then with, a ReadFlood (no direct baseline): the value is the
    pause under the flood, the baseline the same cluster's pause without it."""
    postcopy = mode == "postcopy"
    pb_mode = common_pb2.MIGRATION_MODE_POSTCOPY if postcopy else common_pb2.MIGRATION_MODE_PRECOPY
    with tempfile.TemporaryDirectory() as tmp:
        ram = random_ram(Path(tmp) / "ram.bin", MEMORY_MIB) if postcopy else None
        quiet = whimbrel_pauses(pb_mode, runs, Path(tmp) / "quiet", ram)
        flooded = whimbrel_pauses(pb_mode, runs, Path(tmp) / "flooded", ram, flood=watchers)
    print(f"  {mode}: quiet   pauses ms {sorted(round(p, 1) for p in quiet)}", file=sys.stderr)
    print(f"  {mode}: flooded pauses ms {sorted(round(p, 1) for p in flooded)}", file=sys.stderr)
    return [
        {
            "bench": f"switchover.flood.{mode}.p{p}_ms",
            "value": round(percentile(flooded, p), 2),
            "unit": "ms",
            "baseline": round(percentile(quiet, p), 2),
        }
        for p in (50, 99)
    ]
