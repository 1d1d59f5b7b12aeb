"""Client-visible outage of a migrated Linux guest: the longest gap a TCP client sees.

Whimbrel: a coordinator and two hostds (`switchover.WhimbrelSide`, its hosts on a guest fabric)
migrate the Linux guest (`tools.linux_guest`) back and forth. Baseline, in the same run: the same
guest on a fabric of its own built alike, its QEMUs started in the host namespaces as hostd
starts them (hostd's command line under `ip netns exec`), its tap attached by hostd's bridge
driver, the handoff driven over QMP by `switchover.DirectHandoff` (Whimbrel's order, shared with
the switchover bench), then what Whimbrel does once the destination resumed: announce-self, and
the source's QEMU destroyed once the migration completed.

Each guest boots once; sample `i` migrates it to the other host: to host-b for an even `i`, back
to host-a for an odd one, on both sides alike. A sample: a new connection from the client
namespace (on host-a's bridge) probed every millisecond (`guest_fabric.ProbeClient`), BEFORE_S of
probes, the migration, AFTER_S of probes. Its outage is the client's longest gap between two
answers; the guest's disk counter is watched meanwhile (`guest_fabric.CounterWatch`), and the
guest's pause by QEMU's clocks (source STOP to destination RESUME) is reported beside, judged
as the switchover bench judges it (`tools.bench.samples`).

Equal terms, as in the switchover bench: the samples alternate, Whimbrel then baseline, with the
same guest, network, handoff order and migration parameters (the switchover bench's policy,
`switchover.policy_for`: the coordinator's defaults, and in post-copy a throttled pre-copy so the
switch always comes during pass 1); the side not being sampled has its guest frozen (SIGSTOP), as
its guest keeps a CPU busy; the baseline runs in a process scheduled as the daemons schedule
themselves (`switchover.DirectSide`).

Never dropped: a sample whose connection broke (an error, no connection to begin with, or no
answer left at its end) counts as a lost connection: its outage stays out of the percentiles,
its count and reason are reported. `WHIMBREL_BENCH_RUNS` overrides the migrations per side.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hostd import qemu
from hostd.drivers.network import BridgeNetworkDriver, NetworkDriver
from hostd.executor import ANNOUNCE
from hostd.qmp import QmpSession
from tools import linux_guest
from tools.bench.samples import Sample, Tally
from tools.bench.switchover import (
    VM,
    DirectHandoff,
    DirectSide,
    Scheduling,
    SeenScheduling,
    WhimbrelSide,
    compared_scheduling,
    frozen,
    percentile,
    runs_wanted,
)
from tools.guest_fabric import (
    HOSTS,
    MIGRATION_IPS,
    MIGRATION_PORT,
    CounterWatch,
    Fabric,
    ProbeClient,
    linux_vm_spec,
)
from whimbrel.v1 import common_pb2

__all__ = ["bench"]

# Migrations per side.
RUNS = 50
# Probes before and after each migration: the outage is measured against a steady connection,
# and one that recovers only through TCP's backed-off retransmissions still does so in time.
BEFORE_S = 0.5
AFTER_S = 1.0
# A client whose last answer came longer ago than this at the stop was still cut off.
SILENT_LIMIT_S = 0.25
# How long a guest may take to boot, or to write its counter again once thawed.
GUEST_WAIT_S = 60.0


def _other(host: str) -> str:
    return HOSTS[1] if host == HOSTS[0] else HOSTS[0]


# --- Whimbrel ---


class GuestWhimbrelSide(WhimbrelSide):
    """Whimbrel's side: its hosts on `fabric`, running the Linux guest from host-a."""

    def __init__(
        self, root: Path, postcopy: bool, guest: linux_guest.Guest, fabric: Fabric
    ) -> None:
        self.guest, self.fabric = guest, fabric
        self.disk = linux_guest.counter_disk(root / "shared" / f"{VM}.img")
        super().__init__(root, postcopy, None)

    def _start(self, ram: Path | None) -> None:
        self.cluster.hostd_args = {h: self.fabric.hostd_args(h, self.guest) for h in self.hosts}
        self.cluster.start(*self.hosts)
        self.cluster.define_spec_and_start(linux_vm_spec(self.guest, self.disk, VM), "host-a")


# --- the direct baseline ---


class GuestHandoff(DirectHandoff):
    """The baseline's handoffs of the Linux guest, one QEMU kept across runs: each run starts a
    destination on the other host and destroys the source once the migration completed."""

    def __init__(
        self, root: Path, spec: common_pb2.VmSpec, postcopy: bool, namespaces: dict[str, str]
    ) -> None:
        super().__init__(root, spec, postcopy)
        self.namespaces = namespaces
        # hostd's driver for `--network bridge --netns NS`.
        self.networks = {h: BridgeNetworkDriver(h, namespaces[h]) for h in HOSTS}
        self.sessions: dict[str, QmpSession] = {}
        self.at = HOSTS[0]  # where the guest runs

    def _paths(self, name: str) -> qemu.VmPaths:
        return qemu.VmPaths(self.root / name / self.spec.name)

    def _command_line(self, name: str, paths: qemu.VmPaths, incoming: bool) -> list[str]:
        # As hostd does with --netns: QEMU, its taps and its migration socket in the namespace.
        line = qemu.command_line(self.spec, paths, name, incoming=incoming)
        return ["ip", "netns", "exec", self.namespaces[name], *line]

    def _network(self, name: str) -> NetworkDriver:
        return self.networks[name]

    def _incoming_uri(self, name: str) -> str:
        return f"tcp:{MIGRATION_IPS[name]}:{MIGRATION_PORT}"

    async def setup(self) -> None:
        """The guest started on host-a at lease generation 1, as hostd's start_vm does."""
        self.sessions[self.at] = await self._start(self.at, False, 1)
        network = self._network(self.at)
        await network.apply("prepare", self.spec)
        await network.apply("enable", self.spec)

    async def run(self, generation: int) -> Sample:
        """The guest migrated to the other host; the source holds its lease below
        `generation` + 1, which the destination takes."""
        source, destination = self.at, _other(self.at)
        self.roles = (source, destination)
        # The source's events so far belong to its earlier runs (as a destination).
        self._forget(source)
        self.sessions[destination] = await self._start(destination, True, generation)
        await self._handoff(self.sessions[source], self.sessions[destination], generation)
        sample = self._sample()
        if self.at != destination:
            raise RuntimeError(f"the guest did not move to {destination}: {sample}")
        return sample

    def _forget(self, name: str) -> None:
        queue = self.events[name]
        while not queue.empty():
            queue.get_nowait()
        self.seen[name] = []

    async def _resumed(self, src: QmpSession, dst: QmpSession) -> None:
        """As Whimbrel follows a resumed destination: announce-self (hostd's ANNOUNCE), then
        the source destroyed once the migration completed."""
        source, destination = self.roles
        await dst.execute("announce-self", ANNOUNCE)
        if await self._completed(destination) is None:
            return
        await self._destroy(source)
        self.at = destination

    async def _destroy(self, name: str) -> None:
        session = self.sessions.pop(name, None)
        if session is not None:
            await session.close()
        pid = self.pids.pop(name, None)
        if pid is not None:
            await qemu.kill(pid)

    async def close(self) -> None:
        for name in list(self.sessions):
            await self._destroy(name)


def guest_handoff(
    root: Path, postcopy: bool, guest: linux_guest.Guest, disk: Path, namespaces: dict[str, str]
) -> GuestHandoff:
    """The baseline's handoff (built in the baseline's process)."""
    return GuestHandoff(root, linux_vm_spec(guest, disk, VM), postcopy, namespaces)


class GuestDirectSide(DirectSide):
    """The baseline's side: its process, its guest on `fabric`, its disk."""

    def __init__(
        self, root: Path, postcopy: bool, guest: linux_guest.Guest, fabric: Fabric
    ) -> None:
        self.root = root
        self.disk = linux_guest.counter_disk(root / f"{VM}.img")
        make = functools.partial(
            guest_handoff, root, postcopy, guest, self.disk, dict(fabric.namespaces)
        )
        super().__init__(root, postcopy, None, make)

    def qemus(self) -> list[int]:
        """The baseline's live QEMUs, as hostd would find them."""
        found = [qemu.find(qemu.VmPaths(self.root / host / VM)) for host in HOSTS]
        return [f.pid for f in found if f.runs]

    def close(self) -> None:
        try:
            super().close()
        finally:
            # QEMU runs daemonized: a baseline process that died leaves its QEMUs behind.
            for pid in self.qemus():
                asyncio.run(qemu.kill(pid))


# --- the bench ---


@dataclass(frozen=True)
class Outage:
    """What one migration did to the client and to the guest's disk."""

    gap_ms: float
    # Why the connection counts as lost ("" when it survived the migration).
    lost: str
    rewinds: int
    # The counter did not move on after the migration.
    stalled: bool


@dataclass
class OutageTally:
    """One side's outages, lost connections, rewinds, stalls and pauses."""

    postcopy: bool
    outages_ms: list[float] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    rewinds: int = 0
    stalls: int = 0
    pauses: Tally = field(init=False)

    def __post_init__(self) -> None:
        self.pauses = Tally(self.postcopy)

    def add(self, side: str, i: int, outage: Outage, sample: Sample) -> None:
        rejection = self.pauses.add(sample)
        self.rewinds += outage.rewinds
        self.stalls += outage.stalled
        if outage.lost:
            self.lost.append(outage.lost)
        else:
            self.outages_ms.append(outage.gap_ms)
        what = f"lost ({outage.lost})" if outage.lost else f"outage {outage.gap_ms:.1f} ms"
        pause = (
            f"{sample.pause_ms:.1f} ms" if rejection is None else f"rejected ({rejection.value})"
        )
        extra = (f", {outage.rewinds} rewinds" if outage.rewinds else "") + (
            ", counter stalled" if outage.stalled else ""
        )
        print(f"  {side} {i} to {HOSTS[(i + 1) % 2]}: {what}, pause {pause}{extra}",
              file=sys.stderr, flush=True)  # fmt: skip


def measure(
    fabric: Fabric, disk: Path, migrate: Callable[[], tuple[Sample, Scheduling]]
) -> tuple[Outage, Sample, Scheduling]:
    """One migration (`migrate`) under a new probed connection and a counter watch."""
    watch = CounterWatch(disk)
    if not watch.wait_beyond(linux_guest.read_counter(disk), GUEST_WAIT_S):
        raise RuntimeError(f"the guest's counter on {disk} did not move before the migration")
    client = ProbeClient(fabric)
    try:
        connected = client.connected()
        watch.start()
        time.sleep(BEFORE_S)
        sample, scheduling = migrate()
        time.sleep(AFTER_S)
        moved_on = watch.wait_beyond(watch.samples[-1], GUEST_WAIT_S)
    finally:
        watch.done.set()
        result = client.stop()
    lost = ""
    if not connected:
        lost = f"no connection before the migration ({result.error})"
    elif result.error:
        lost = result.error
    elif result.silent_s > SILENT_LIMIT_S:
        lost = f"no answer in the last {result.silent_s:.2f} s"
    outage = Outage(result.longest_gap_s * 1000, lost, watch.rewinds, not moved_on)
    return outage, sample, scheduling


def _rounded(values: list[float], p: float) -> float | None:
    return round(percentile(values, p), 1) if values else None


def bench(mode: str, runs: int | None = None) -> list[dict[str, object]]:
    postcopy = mode == "postcopy"
    runs = runs_wanted(RUNS) if runs is None else runs
    guest = linux_guest.build()
    ours, base = OutageTally(postcopy), OutageTally(postcopy)
    ours_sched, base_sched = SeenScheduling(), SeenScheduling()
    with (
        tempfile.TemporaryDirectory() as tmp,
        Fabric.create() as whimbrel_net,
        Fabric.create() as direct_net,
    ):
        direct = GuestDirectSide(Path(tmp) / "direct", postcopy, guest, direct_net)
        try:
            whimbrel = GuestWhimbrelSide(Path(tmp) / "whimbrel", postcopy, guest, whimbrel_net)
            try:
                for disk in (whimbrel.disk, direct.disk):
                    if not CounterWatch(disk).wait_beyond(0, GUEST_WAIT_S):
                        raise RuntimeError(f"the guest of {disk} did not boot")
                for i in range(runs):
                    with frozen(direct.qemus()):
                        outage, sample, seen = measure(
                            whimbrel_net, whimbrel.disk, functools.partial(whimbrel.run, i)
                        )
                    ours_sched.add(seen)
                    ours.add("whimbrel", i, outage, sample)
                    with whimbrel.guest_frozen():
                        outage, sample, seen = measure(
                            direct_net, direct.disk, functools.partial(direct.run, i)
                        )
                    base_sched.add(seen)
                    base.add("direct", i, outage, sample)
            finally:
                whimbrel.close()
        finally:
            direct.close()
    for side, tally in (("whimbrel", ours), ("direct", base)):
        print(f"  {mode}: {side} outages ms {sorted(round(o, 1) for o in tally.outages_ms)}; "
              f"lost {tally.lost}; pause rejected {tally.pauses.rejected_counts()}",
              file=sys.stderr)  # fmt: skip
    scheduling = compared_scheduling(mode, ours_sched, base_sched)
    out: list[dict[str, object]] = []
    for name, p in (("p50", 50), ("p99", 99), ("max", 100)):
        value, baseline = _rounded(ours.outages_ms, p), _rounded(base.outages_ms, p)
        out.append(
            {
                "bench": f"guest.outage.{mode}.{name}_ms",
                "value": value,
                "unit": "ms",
                "baseline": baseline,
                "ratio": round(value / baseline, 3) if value and baseline else None,
                "samples": {"whimbrel": len(ours.outages_ms), "direct": len(base.outages_ms)},
                "connections_lost": {"whimbrel": len(ours.lost), "direct": len(base.lost)},
                "rewinds": {"whimbrel": ours.rewinds, "direct": base.rewinds},
                "counter_stalls": {"whimbrel": ours.stalls, "direct": base.stalls},
                "pause_ms": {
                    "whimbrel": _rounded(ours.pauses.pauses_ms, p),
                    "direct": _rounded(base.pauses.pauses_ms, p),
                },
                "pause_rejected": {
                    "whimbrel": ours.pauses.rejected_counts()["total"],
                    "direct": base.pauses.rejected_counts()["total"],
                },
                "scheduling": scheduling,
            }
        )
    return out
