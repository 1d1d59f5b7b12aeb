"""Draining many hosts at once in a fleet of real processes: does the coordinator keep up?

One coordinator (mutual TLS, a fresh SQLite log), HOSTS real hostd processes, each reporting a
capacity of 2048 MiB and 32 vCPUs and running VMS_PER_HOST VMs of 64 MiB on qmpsim (so 20 VMs
use 1280 MiB of a host, and the hosts left after a drain have room for twelve more each). Once
every VM runs, the migration limits are set, DRAINED hosts are cordoned, then drained with
DrainHost calls back to back, and the bench waits (on the log) until every drain migration is
terminal.

Limits: cluster 20, per host 2 out and 2 in. Two out of a host is KubeVirt's default; 20 in
the cluster is its default of 5 per 12-odd hosts grown to 50 hosts, and it is exactly what 10
drained hosts sending 2 each can use, so the drain runs at the cluster limit throughout and
the per-host limits shape it (inbound 2 keeps a receiving host from taking more than it could
send).

Reported (one JSON object): the drain's wall time; the coordinator's CPU seconds over it (from
/proc/PID/stat, all threads) and so its average cores; events appended per second; command
latency p50/p99 (CommandIssued, the coordinator's clock, to its result, the hostd's clock:
see `drain_report`), overall and per kind; how the migrations ended; the peak resident memory
of coordinator, hostd and qmpsim processes (sampled every second) and the qmpsim PSS once all
VMs run; the time to start every VM, with the START_VM latencies; `whimbrel-audit verify
--final` on the log; and an independent recount of the migrations running at every admission
against the limits. Targets (issue 15): the drain completes, no limit is exceeded, the
coordinator uses under one core on average: each reported as `met`.

`WHIMBREL_BENCH_KEEP=1` keeps the cluster's directory (the log, every process's log).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tools import fleet
from tools.bench import drain_report
from tools.bench.switchover import percentile
from tools.cluster import BIN, Cluster
from whimbrel.v1 import common_pb2

LIMITS = common_pb2.MigrationLimits(cluster=20, per_host_outbound=2, per_host_inbound=2)
SAMPLE_S = 1.0
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_mib(pid: int) -> float:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE / 2**20
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0.0


def _pss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def _machine_used_mib() -> float:
    info = {
        k: int(v.split()[0])
        for k, v in (line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    }
    return (info["MemTotal"] - info["MemAvailable"]) / 1024


class MemorySampler:
    """Peak resident memory, summed by role, every SAMPLE_S in a thread of its own."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def roles(self) -> dict[str, list[int]]:
        pids = {name: p.popen.pid for name, p in self._cluster.processes.items()}
        coordinator = pids.pop("coordinator", 0)
        return {
            "coordinator": [coordinator],
            "hostd": list(pids.values()),
            "qmpsim": self._cluster.qemu_pids(),
        }

    def sample(self) -> None:
        for role, pids in self.roles().items():
            total = sum(_rss_mib(pid) for pid in pids)
            self.peaks[role] = max(self.peaks.get(role, 0.0), total)
        self.peaks["machine_used"] = max(self.peaks.get("machine_used", 0.0), _machine_used_mib())

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def _timed(step: Callable[[], object]) -> float:
    start = time.monotonic()
    step()
    return time.monotonic() - start


def _latency(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50_ms": round(percentile(values, 50), 1),
        "p99_ms": round(percentile(values, 99), 1),
        "max_ms": round(max(values), 1),
    }


def _audit(db: Path) -> dict[str, object]:
    """`whimbrel-audit verify --final` on the log: its exit status and what it found."""
    done = subprocess.run(
        [str(BIN / "whimbrel-audit"), "verify", str(db), "--final", "--json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        return {"exit": done.returncode, "clean": False, "error": done.stderr[-500:]}
    problems = [f["problem"] for f in report["findings"]]
    return {
        "exit": done.returncode,
        "clean": done.returncode == 0,
        "events": report["events"],
        "findings": len(problems),
        "invariant_11_findings": sum(p.startswith("invariant 11:") for p in problems),
        "first_findings": problems[:5],
    }


def bench(
    hosts: int = 50, vms_per_host: int = 20, drained: int = 10, fork_server: bool = True
) -> dict[str, object]:
    """`fork_server`: qmpsim VMs forked from one server (False: an interpreter each)."""
    shape = fleet.Fleet(hosts=hosts, vms_per_host=vms_per_host)
    tmp = Path(tempfile.mkdtemp(prefix="whimbrel-scale-"))
    forks = fleet.ForkServer(tmp).start() if fork_server else None
    cluster = fleet.fleet_cluster(tmp / "cluster", shape, forks=forks)
    result: dict[str, object] = {"hosts": hosts, "vms": hosts * vms_per_host,
                                 "drained_hosts": drained, "fork_server": fork_server}  # fmt: skip
    try:
        with MemorySampler(cluster) as memory:
            result["cluster_start_s"] = round(_timed(lambda: cluster.start(*shape.host_ids)), 2)
            coordinator = cluster.processes["coordinator"].popen.pid
            hostd = [p.popen.pid for n, p in cluster.processes.items() if n != "coordinator"]
            cpu = fleet.cpu_seconds(coordinator)
            hostd_cpu = sum(fleet.cpu_seconds(pid) for pid in hostd)
            head = cluster.head()
            vm_start_s = _timed(lambda: fleet.start_vms(cluster, shape))
            result["vm_start"] = {
                "seconds": round(vm_start_s, 2),
                "coordinator_cpu_s": round(fleet.cpu_seconds(coordinator) - cpu, 2),
                "hostd_cpu_s": round(sum(fleet.cpu_seconds(p) for p in hostd) - hostd_cpu, 2),
                "start_vm": _latency(
                    drain_report.command_latencies_ms(
                        e for e in cluster.events() if e.seq > head
                    ).get("START_VM", [])
                ),
            }
            qmpsim = cluster.qemu_pids()
            result["qmpsim_pss_mib"] = {
                "total": round(sum(_pss_mib(p) for p in qmpsim)),
                "per_vm": round(sum(_pss_mib(p) for p in qmpsim) / max(len(qmpsim), 1), 2),
            }
            fleet.set_limits(cluster, LIMITS, "scale bench")
            victims = shape.host_ids[:drained]

            head = cluster.head()
            cpu = fleet.cpu_seconds(coordinator)
            hostd_cpu = sum(fleet.cpu_seconds(pid) for pid in hostd)
            start = time.monotonic()
            ids = fleet.drain(cluster, victims, "scale bench")
            fleet.wait_finished(cluster, ids, head)
            drain_s = time.monotonic() - start
            drain_cpu = fleet.cpu_seconds(coordinator) - cpu
            drain_hostd_cpu = sum(fleet.cpu_seconds(p) for p in hostd) - hostd_cpu
            end = cluster.head()
        cluster.teardown()
        events = cluster.events()
        during = [e for e in events if head < e.seq <= end]
        latencies = drain_report.command_latencies_ms(during)
        everything = [ms for values in latencies.values() for ms in values]
        ended = drain_report.outcomes(during, ids)
        peaks = drain_report.running_peaks(events)
        moved_onto_drained = [
            m for m, (_, dest) in drain_report.destinations(during).items() if dest in victims
        ]
        audit = _audit(cluster.db)
        cores = drain_cpu / drain_s
        result.update(
            limits={"cluster": LIMITS.cluster, "per_host_outbound": LIMITS.per_host_outbound,
                    "per_host_inbound": LIMITS.per_host_inbound},
            migrations=len(ids),
            drain_s=round(drain_s, 2),
            coordinator_cpu_s=round(drain_cpu, 2),
            coordinator_cores=round(cores, 3),
            hostd_cpu_s=round(drain_hostd_cpu, 2),
            events=len(during),
            events_per_s=round(len(during) / drain_s, 1),
            command_latency=_latency(everything),
            command_latency_by_kind={k: _latency(v) for k, v in sorted(latencies.items())},
            completed=ended.get("COMPLETED", 0),
            rolled_back=ended.get("ROLLED_BACK", 0),
            fenced=ended.get("FENCED", 0),
            peak_running={"cluster": peaks.cluster, "out_of_host": peaks.out_of_host,
                          "into_host": peaks.into_host},
            limit_violations=peaks.violations[:10],
            moved_onto_drained=len(moved_onto_drained),
            peak_rss_mib={k: round(v) for k, v in memory.peaks.items()},
            audit=audit,
        )  # fmt: skip
        result["met"] = {
            "drain_completes": ended.get("COMPLETED", 0) == len(ids),
            "no_limit_exceeded": not peaks.violations and bool(audit["clean"]),
            "coordinator_under_one_core": cores < 1.0,
        }
        return result
    finally:
        cluster.teardown()
        if forks is not None:
            forks.stop()
        if os.environ.get("WHIMBREL_BENCH_KEEP"):
            result["kept"] = str(tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
