"""QEMU as hostd builds its command line: under its seccomp sandbox, as the --qemu-user when
given, and with a comma in a disk path read as part of the file name (never as an option)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostd import qemu
from hostd.vm import VmRuntime
from tools.guest import boot_disk
from whimbrel.v1 import common_pb2


def status(pid: int, field: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return line.split(":", 1)[1].split()[0]
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.mark.parametrize("user", ["", "nobody"])
async def test_qemu_runs_sandboxed_as_its_user_and_a_comma_stays_in_the_path(
    tmp_path: Path, user: str
) -> None:
    disk = boot_disk(tmp_path / "disks" / "disk.img,file.locking=off")
    spec = common_pb2.VmSpec(
        name="vm-1", memory_mib=64, vcpus=1, disks=[common_pb2.Disk(path=str(disk), format="raw")]
    )

    async def emit(payload: object, time_us: int) -> None:
        return None

    runtime = VmRuntime(spec, tmp_path / "vm", emit)
    args = qemu.command_line(spec, runtime.paths, "host-a", incoming=False, user=user)
    pid = await qemu.launch(args, runtime.paths, "vm-1")
    try:
        await runtime.attach(pid)
        assert (await runtime.execute("query-status"))["status"] == "running"
        files = [b["inserted"]["file"] for b in await runtime.execute("query-block")]
        assert files == [str(disk)]
        assert status(pid, "Seccomp") == "2"  # a seccomp filter is in force
        assert status(pid, "Uid") == ("65534" if user else "0")
    finally:
        await runtime.kill("test over")
        await runtime.close()
