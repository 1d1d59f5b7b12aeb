"""What a source hostd restart during pre-copy adds to the later switchover pause.

One cluster migrates a 64 MiB random-RAM guest back and forth in pre-copy, throttled so the
first pass takes a few seconds. Runs alternate: in every other one the source's hostd is
SIGKILLed once the first pass began and started again (it re-attaches to its QEMU and re-arms
the lease release that START_MIGRATION asked for); the others run undisturbed. The guest-visible
pause (destination RESUME minus source STOP, by QEMU's clocks) of both kinds is compared. A
restart sample counts only if the restarted hostd said hello before its QEMU stopped, so the
switchover really ran under the new hostd; others are rejected and counted.

Target (issue 13): a restart adds no more than 50 ms to the pause (p50 against p50).
"""

from __future__ import annotations

import signal
import tempfile
from collections.abc import Callable
from pathlib import Path

from coordinator.core import Event
from tools.bench.switchover import percentile, runs_wanted
from tools.cluster import Cluster
from tools.guest import random_ram
from whimbrel.v1 import common_pb2, events_pb2, migration_pb2

RUNS = 20  # per kind
MEMORY_MIB = 64
BANDWIDTH = 24 << 20  # bytes/s: the first pass of 64 MiB takes close to 3 s
HOSTS = ("host-a", "host-b")


def _qmp(host: str, name: str) -> Callable[[Event], bool]:
    def test(e: Event) -> bool:
        p = e.payload
        return (
            isinstance(p, events_pb2.QmpEventReceived)
            and e.origin_host == host
            and (p.event == name)
        )

    return test


def _migrate(cluster: Cluster, i: int, restart: bool) -> float | None:
    """Migration m-`i` away from where the VM runs; its pause in ms, or None if rejected."""
    source, destination = HOSTS[i % 2], HOSTS[(i + 1) % 2]
    head = cluster.head()
    policy = events_pb2.MigrationPolicy(
        parameters=events_pb2.MigrationParameters(max_bandwidth=BANDWIDTH)
    )
    cluster.migrations.StartMigration(migration_pb2.StartMigrationRequest(
        vm="vm-1", destination=destination, mode=common_pb2.MIGRATION_MODE_PRECOPY,
        policy=policy, migration_id=f"m-{i}"))  # fmt: skip
    if restart:
        cluster.wait_event(_qmp(source, "MIGRATION_PASS"), from_seq=head)
        cluster.processes[source].stop(signal.SIGKILL)
        cluster.start_hostd(source)
    final = cluster.watch(f"m-{i}")
    if final.phase != common_pb2.MIGRATION_PHASE_COMPLETED:
        raise RuntimeError(f"m-{i} ended {final.phase}: {final.reason}")
    if restart:
        events = [e for e in cluster.events() if e.seq > head]
        hello = next((e.seq for e in events if isinstance(e.payload, events_pb2.HostConnected)
                      and e.payload.host_id == source), None)  # fmt: skip
        stop = next(e.seq for e in events if _qmp(source, "STOP")(e))
        if hello is None or hello > stop:
            return None
    return final.pause_us / 1000


def bench(runs: int | None = None) -> dict[str, object]:
    n = runs or runs_wanted(RUNS)
    pauses: dict[str, list[float]] = {"plain": [], "restart": []}
    rejected = 0
    with tempfile.TemporaryDirectory(prefix="whimbrel-restart-") as tmp:
        root = Path(tmp)
        ram = random_ram(root / "ram.bin", MEMORY_MIB)
        cluster = Cluster(root / "cluster")
        cluster.hostd_args = {h: ["--allow-disk-root", str(root)] for h in HOSTS}
        try:
            cluster.start(*HOSTS)
            cluster.define_and_start("vm-1", "host-a", memory_mib=MEMORY_MIB, ram_file=ram)
            for i in range(2 * n):
                restart = i % 2 == 1
                pause = _migrate(cluster, i, restart)
                if pause is None:
                    rejected += 1
                else:
                    pauses["restart" if restart else "plain"].append(pause)
        finally:
            cluster.teardown()
    p50 = {kind: round(percentile(values, 50), 2) for kind, values in pauses.items()}
    return {
        "value": round(p50["restart"] - p50["plain"], 2),
        "unit": "ms added to the pause p50 by a source hostd restart during pre-copy",
        "baseline": p50["plain"],
        "restart_p50_ms": p50["restart"],
        "restart_max_ms": round(max(pauses["restart"]), 2),
        "plain_max_ms": round(max(pauses["plain"]), 2),
        "samples": {kind: len(values) for kind, values in pauses.items()},
        "rejected": rejected,
    }
