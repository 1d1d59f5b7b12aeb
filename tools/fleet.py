"""A simulated fleet on one machine: a real coordinator and many real hostd processes, each
reporting a capacity, each running its VMs on qmpsim (tools/qmpsim/) instead of QEMU.

Used by the scale benchmarks and the CI-sized scale test: they differ in numbers only.
Everything waits on the log (`Cluster.wait_event`), never on sleeps.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from coordinator.core import Event
from tools.cluster import Cluster
from tools.guest import boot_disk
from tools.qmpsim import forkserver
from whimbrel.v1 import (
    common_pb2,
    events_pb2,
    host_pb2,
    host_pb2_grpc,
    migration_pb2,
    vm_pb2,
)

__all__ = ["QMPSIM", "Fleet", "ForkServer", "cpu_seconds", "fleet_cluster"]

REPO = Path(__file__).resolve().parents[1]
QMPSIM = REPO / "tools" / "qmpsim" / "qemu-system-x86_64"
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Fleet:
    """How many hosts, VMs and how big, and what each host offers."""

    hosts: int
    vms_per_host: int
    vm_memory_mib: int = 64
    capacity_memory_mib: int = 2048
    capacity_vcpus: int = 32

    @property
    def host_ids(self) -> list[str]:
        return [f"host-{i:02d}" for i in range(self.hosts)]

    def vm_names(self, host: str) -> list[str]:
        return [f"{host}-vm-{j:02d}" for j in range(self.vms_per_host)]

    def capacity_flags(self) -> list[str]:
        return [
            "--capacity-memory-mib", str(self.capacity_memory_mib),
            "--capacity-vcpus", str(self.capacity_vcpus),
        ]  # fmt: skip


class ForkServer:
    """qmpsim's fork server (tools/qmpsim/forkserver.py), for a fleet's hosts to share: each
    VM is forked from one interpreter that imported qmpsim once, rather than started anew."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.socket = root / "qmpsim-forkserver.sock"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ForkServer:
        args = [sys.executable, "-S", "-m", "tools.qmpsim.forkserver", str(self.socket),
                "x" * forkserver.ROOM]  # fmt: skip
        pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            args, stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=pythonpath)
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith(b"qmpsim fork server on"):
            self.stop()
            raise RuntimeError(f"the qmpsim fork server did not start: {line!r}")
        return self

    def stop(self) -> None:
        """Stop the server; the VMs it forked live on (they are hostd's to stop)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0


def fleet_cluster(
    root: Path, fleet: Fleet, env: dict[str, str] | None = None, forks: ForkServer | None = None
) -> Cluster:
    """A cluster (not started) whose hostd run qmpsim, each with the fleet's capacity; with
    `forks` (started), every VM is forked by that server."""
    qmpsim = {"WHIMBREL_QEMU": str(QMPSIM), "WHIMBREL_QMPSIM_PYTHON": sys.executable}
    if forks is not None:
        qmpsim["WHIMBREL_QMPSIM_FORKSERVER"] = str(forks.socket)
    return Cluster(
        root,
        hostd_args={h: fleet.capacity_flags() for h in fleet.host_ids},
        env={**qmpsim, **(env or {})},
    )


def start_vms(cluster: Cluster, fleet: Fleet, timeout: float = 600.0) -> None:
    """Define every VM of the fleet and start each on its host; returns once every START_VM
    succeeded. The StartVm calls go back to back, so the hosts launch in parallel."""
    placement = {vm: host for host in fleet.host_ids for vm in fleet.vm_names(host)}
    for vm in placement:
        disk = boot_disk(cluster.shared / "disks" / f"{vm}.img")
        spec = common_pb2.VmSpec(
            name=vm, memory_mib=fleet.vm_memory_mib, vcpus=1,
            disks=[common_pb2.Disk(path=str(disk), format="raw")],
        )  # fmt: skip
        cluster.vms.DefineVm(vm_pb2.DefineVmRequest(spec=spec))
    head = cluster.head()
    for vm, host in placement.items():
        cluster.vms.StartVm(vm_pb2.StartVmRequest(name=vm, host=host))
    waiting = set(placement)

    def all_started(e: Event) -> bool:
        p = e.payload
        if not isinstance(p, events_pb2.CommandSucceeded | events_pb2.CommandFailed):
            return False
        if p.kind != events_pb2.COMMAND_KIND_START_VM:
            return False
        if isinstance(p, events_pb2.CommandFailed):
            raise RuntimeError(f"{p.vm} did not start: {p.error}")
        waiting.discard(p.vm)
        return not waiting

    cluster.wait_event(all_started, timeout=timeout, from_seq=head)


def set_limits(cluster: Cluster, limits: common_pb2.MigrationLimits, reason: str) -> None:
    cluster.migrations.SetMigrationLimits(
        migration_pb2.SetMigrationLimitsRequest(limits=limits, reason=reason)
    )


def drain(cluster: Cluster, hosts: Iterable[str], reason: str) -> list[str]:
    """Cordon every host first, then drain each (DrainHost back to back); the migration ids.

    Cordoning all of them first is what keeps a drain from placing VMs on a host the next
    drain empties again: a drain cordons only its own host, and placement favours the host
    with the most free memory, which the hosts still to be drained are."""
    stub = host_pb2_grpc.HostServiceStub(cluster.grpc)
    hosts = list(hosts)
    for host in hosts:
        stub.CordonHost(host_pb2.CordonHostRequest(host_id=host, reason=reason))
    ids: list[str] = []
    for host in hosts:
        response = stub.DrainHost(host_pb2.DrainHostRequest(host_id=host, reason=reason))
        if response.not_moved:
            raise RuntimeError(f"drain of {host} cannot move: {response.not_moved}")
        ids += response.migration_ids
    return ids


def wait_finished(
    cluster: Cluster, migration_ids: Iterable[str], from_seq: int, timeout: float = 1800.0
) -> None:
    """Until every one of these migrations is terminal (MigrationFinished)."""
    waiting = set(migration_ids)

    def all_finished(e: Event) -> bool:
        if isinstance(e.payload, events_pb2.MigrationFinished):
            waiting.discard(e.payload.migration_id)
        return not waiting

    cluster.wait_event(all_finished, timeout=timeout, from_seq=from_seq)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process `pid`, all threads (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS
