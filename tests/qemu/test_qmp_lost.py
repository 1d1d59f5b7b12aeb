"""A command that loses QMP because QEMU died fails only after that QEMU's exit was reported:
the coordinator must never read the failure while it still believes the VM runs (a rollback
would end with "the source runs" on a dead source)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from google.protobuf.message import Message

from hostd import qemu
from hostd.errors import QmpUnavailable
from hostd.vm import VmRuntime
from tools.guest import boot_disk
from whimbrel.v1 import common_pb2, events_pb2


async def test_qmp_lost_to_a_killed_qemu_fails_after_the_exit_report(tmp_path: Path) -> None:
    spec = common_pb2.VmSpec(
        name="vm-1", memory_mib=64, vcpus=1, machine="pc",
        disks=[common_pb2.Disk(path=str(boot_disk(tmp_path / "disk.img")), format="raw")],
    )  # fmt: skip
    reported: list[Message] = []

    async def emit(payload: Message, time_us: int) -> None:
        reported.append(payload)

    runtime = VmRuntime(spec, tmp_path / "vm", emit, role="source")
    args = qemu.command_line(spec, runtime.paths, "host-a", incoming=False)
    pid = await qemu.launch(args, runtime.paths, "vm-1")
    try:
        await runtime.attach(pid)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(QmpUnavailable):
            while True:  # until QMP notices the QEMU is gone
                await runtime.execute("query-status")
        exits = [p for p in reported if isinstance(p, events_pb2.QemuExited)]
        assert runtime.exited.is_set() and [e.pid for e in exits] == [pid]
    finally:
        await qemu.kill(pid)
        await runtime.close()
