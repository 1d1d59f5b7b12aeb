"""What migration TLS costs: the guest's pause and the pre-copy transfer rate, with and without.

Two clusters (a coordinator and two hostd each) migrate a 128 MiB random-RAM guest back and
forth, one with migration TLS (the default with TLS material), one with hostd's
--no-migration-tls; their gRPC channels are mutual TLS alike. Runs alternate, TLS then
plaintext, so a slow minute of the shared machine falls on both; the idle cluster's guest is
frozen meanwhile (its boot loop would take a CPU).

- pause: destination RESUME minus source STOP, by QEMU's clocks (tools.bench.samples), for
  pre-copy and post-copy;
- rate (pre-copy, bandwidth uncapped): the source's RAM bytes transferred over the time from
  its MIGRATION "setup" to "completed", MiB/s.

`WHIMBREL_BENCH_RUNS` sets the migrations per side and mode (default 10).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from tools.bench.samples import Sample, judge
from tools.bench.switchover import frozen, percentile, runs_wanted
from tools.cluster import Cluster
from tools.guest import random_ram
from whimbrel.v1 import (
    common_pb2,
    eventlog_pb2,
    eventlog_pb2_grpc,
    events_pb2,
    migration_pb2,
)

MEMORY_MIB = 128
VM = "vm-1"
# Pre-copy: as fast as the link (and TLS) goes. Post-copy: throttled pre-copy, so the switch to
# post-copy happens in pass 1 (as the switchover bench does).
UNCAPPED = 100 << 30
POSTCOPY_PRECOPY_BANDWIDTH = 100_000


class Side:
    """A cluster migrating the VM between host-a and host-b, over TLS or in plaintext."""

    def __init__(self, root: Path, tls: bool, postcopy: bool) -> None:
        self.postcopy = postcopy
        # Under the cluster's root: hostd takes memory files only under its allowed roots.
        ram = random_ram(root / "ram", MEMORY_MIB)
        self.cluster = Cluster(root)
        if not tls:
            for host in ("host-a", "host-b"):
                self.cluster.hostd_args[host] = ["--no-migration-tls"]
        try:
            self.cluster.start("host-a", "host-b")
            self.cluster.define_and_start(VM, "host-a", memory_mib=MEMORY_MIB, ram_file=ram)
        except BaseException:
            self.cluster.teardown()
            raise

    def run(self, i: int) -> tuple[Sample, float | None]:
        """Migration i; its switchover sample and (pre-copy) its transfer rate in MiB/s."""
        head = self.cluster.head()
        bandwidth = POSTCOPY_PRECOPY_BANDWIDTH if self.postcopy else UNCAPPED
        mode = (
            common_pb2.MIGRATION_MODE_POSTCOPY
            if self.postcopy
            else common_pb2.MIGRATION_MODE_PRECOPY
        )
        policy = events_pb2.MigrationPolicy(
            parameters=events_pb2.MigrationParameters(max_bandwidth=bandwidth)
        )
        self.cluster.migrations.StartMigration(
            migration_pb2.StartMigrationRequest(
                vm=VM,
                destination=("host-b", "host-a")[i % 2],
                mode=mode,
                policy=policy,
                migration_id=f"m-{i}",
            )
        )
        final = self.cluster.watch(f"m-{i}")
        if final.phase != common_pb2.MIGRATION_PHASE_COMPLETED:
            raise RuntimeError(f"migration m-{i} ended {final.phase}: {final.reason}")
        events = self._events(head + 1)
        source, destination = events.get(final.source, []), events.get(final.destination, [])
        sample = Sample.from_events(
            [(e, d, t) for e, d, t in source if e != "stats"],
            [(e, d, t) for e, d, t in destination if e != "stats"],
        )
        return sample, None if self.postcopy else self._rate(source)

    def _events(self, from_seq: int) -> dict[str, list[tuple[str, dict[str, Any], int]]]:
        """Per host: the VM's QMP events, and its stats samples as ("stats", {...}, 0)."""
        stub = eventlog_pb2_grpc.EventLogServiceStub(self.cluster.grpc)
        by_host: dict[str, list[tuple[str, dict[str, Any], int]]] = {}
        for event in stub.ReadEvents(eventlog_pb2.ReadEventsRequest(from_seq=from_seq)):
            kind = event.payload.WhichOneof("kind")
            host = by_host.setdefault(event.origin.host_id, [])
            if kind == "qmp_event_received" and event.payload.qmp_event_received.vm == VM:
                qmp = event.payload.qmp_event_received
                host.append((qmp.event, json.loads(qmp.data_json or "{}"), event.time_us))
            elif kind == "migration_stats_sampled":
                stats = event.payload.migration_stats_sampled
                host.append(("stats", {"transferred": stats.transferred_bytes}, 0))
        return by_host

    @staticmethod
    def _rate(source: list[tuple[str, dict[str, Any], int]]) -> float | None:
        times = {d.get("status"): t for e, d, t in source if e == "MIGRATION"}
        transferred = max((d["transferred"] for e, d, _ in source if e == "stats"), default=0)
        if "setup" not in times or "completed" not in times or not transferred:
            return None
        seconds = (times["completed"] - times["setup"]) / 1e6
        return transferred / (1 << 20) / seconds

    def frozen(self) -> contextlib.AbstractContextManager[None]:
        return frozen(self.cluster.qemu_pids())

    def close(self) -> None:
        self.cluster.teardown()


def summary(pauses: list[float], rates: list[float], rejected: int) -> dict[str, Any]:
    out: dict[str, Any] = {"samples": len(pauses), "rejected": rejected}
    if pauses:
        out["pause_ms"] = {
            "p50": round(percentile(pauses, 50), 2),
            "p99": round(percentile(pauses, 99), 2),
            "max": round(max(pauses), 2),
        }
    if rates:
        out["rate_mib_s"] = {
            "median": round(statistics.median(rates), 1),
            "min": round(min(rates), 1),
            "max": round(max(rates), 1),
        }
    return out


def measure(root: Path, postcopy: bool, runs: int) -> dict[str, Any]:
    mode = "postcopy" if postcopy else "precopy"
    sides = {
        name: Side(root / f"{mode}-{name}", name == "tls", postcopy)
        for name in ("tls", "plaintext")
    }
    pauses: dict[str, list[float]] = {name: [] for name in sides}
    rates: dict[str, list[float]] = {name: [] for name in sides}
    rejected = dict.fromkeys(sides, 0)
    try:
        for i in range(runs):
            for name, side in sides.items():
                (other,) = (s for n, s in sides.items() if n != name)
                with other.frozen():
                    sample, rate = side.run(i)
                if judge(sample, postcopy=postcopy) is not None or sample.pause_ms is None:
                    rejected[name] += 1
                    continue
                pauses[name].append(sample.pause_ms)
                if rate is not None:
                    rates[name].append(rate)
    finally:
        for side in sides.values():
            side.close()
    return {name: summary(pauses[name], rates[name], rejected[name]) for name in sides}


def bench() -> dict[str, Any]:
    runs = runs_wanted(10)
    with tempfile.TemporaryDirectory(prefix="whimbrel-bench-tls-") as tmp:
        root = Path(tmp)
        result: dict[str, Any] = {"runs_per_side": runs, "memory_mib": MEMORY_MIB}
        for postcopy in (False, True):
            result["postcopy" if postcopy else "precopy"] = measure(root, postcopy, runs)
        return result


if __name__ == "__main__":
    print(json.dumps(bench(), indent=2))
