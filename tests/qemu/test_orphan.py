"""A QEMU whose QMP is unreachable when hostd restarts (issue 12, bug 3) stays tracked by its
pid until it is gone: it is reported, a destroy kills it, and a cold start neither deletes its
pidfile and socket nor starts a second QEMU on the same disk."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hostd import qemu
from hostd.agent import Agent
from hostd.drivers.network import NullNetworkDriver
from hostd.errors import LaunchFailed
from hostd.guard import Guard
from hostd.vm import VmRuntime
from tools.guest import boot_disk
from whimbrel.v1 import common_pb2, events_pb2, host_pb2

K = events_pb2


@dataclass
class Orphan:
    spec: common_pb2.VmSpec
    paths: qemu.VmPaths
    pid: int


@pytest.fixture
async def orphan(tmp_path: Path) -> AsyncIterator[Orphan]:
    """A QEMU started by an earlier hostd, its QMP socket gone (unreachable)."""
    disk = boot_disk(tmp_path / "disks" / "disk.img")
    spec = common_pb2.VmSpec(
        name="vm-1", memory_mib=64, vcpus=1, disks=[common_pb2.Disk(path=str(disk), format="raw")]
    )

    async def emit(payload: object, time_us: int) -> None:
        return None

    runtime = VmRuntime(spec, tmp_path / "state" / "vms" / "vm-1", emit)
    runtime.save()
    args = qemu.command_line(spec, runtime.paths, "host-a", incoming=False)
    pid = await qemu.launch(args, runtime.paths, "vm-1")
    runtime.paths.qmp.unlink()
    try:
        yield Orphan(spec, runtime.paths, pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def make_agent(tmp_path: Path) -> Agent:
    return Agent(
        "host-a", "127.0.0.1:1", tmp_path / "state", tmp_path / "locks", "127.0.0.1",
        NullNetworkDriver(), guard=Guard.of([str(tmp_path / "disks")], []),
    )  # fmt: skip


def payloads(a: Agent, kind: str) -> list[object]:
    return [getattr(e.payload, kind) for e in a.pending if e.payload.WhichOneof("kind") == kind]


async def test_an_orphan_with_unreachable_qmp_is_reported_and_killed_by_destroy(
    tmp_path: Path, orphan: Orphan
) -> None:
    a = make_agent(tmp_path)
    try:
        await a.reattach()
        observed = payloads(a, "vm_observed")
        assert [(o.reason, o.observation.process_alive, o.observation.qmp_reachable)  # type: ignore[attr-defined]
                for o in observed] == [("qmp-unreachable", True, False)]  # fmt: skip
        hello = await a.hello()
        assert [(v.vm, v.pid, v.process_alive) for v in hello.vms] == [("vm-1", orphan.pid, True)]
        destroy = host_pb2.Command(
            command_id="c-1", epoch=1, vm="vm-1", kind=K.COMMAND_KIND_DESTROY_VM,
            args=K.CommandArgs(force=True, reason="test"),
        )  # fmt: skip
        await a._handle(destroy)
        assert a.pending[-1].payload.WhichOneof("kind") == "command_succeeded"
        assert not qemu.alive(orphan.pid)
        exits = payloads(a, "qemu_exited")
        assert [(e.pid, e.signal) for e in exits] == [(orphan.pid, 9)]  # type: ignore[attr-defined]
    finally:
        await a.close()


async def test_a_cold_start_never_starts_a_second_qemu_beside_an_orphan(
    tmp_path: Path, orphan: Orphan
) -> None:
    a = make_agent(tmp_path)
    try:
        await a.reattach()
        start = host_pb2.Command(
            command_id="c-1", epoch=1, vm="vm-1", kind=K.COMMAND_KIND_START_VM,
            args=K.CommandArgs(spec=orphan.spec, lease_generation=1),
        )  # fmt: skip
        pidfile = orphan.paths.pidfile.read_bytes()
        await a._handle(start)
        failure = a.pending[-1].payload.command_failed
        assert "a QEMU for vm-1 already runs here" in failure.error
        assert qemu.alive(orphan.pid) and orphan.paths.pidfile.read_bytes() == pidfile
        assert a.executor.lease.read("vm-1").holder == ""
    finally:
        await a.close()
    # A hostd that lost track of it altogether still finds it by its pidfile.
    args = qemu.command_line(orphan.spec, orphan.paths, "host-a", incoming=False)
    with pytest.raises(LaunchFailed, match=f"QEMU {orphan.pid} of vm-1 still runs"):
        await qemu.launch(args, orphan.paths, "vm-1")
    assert qemu.alive(orphan.pid) and orphan.paths.pidfile.read_bytes() == pidfile
