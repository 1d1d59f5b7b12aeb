"""hostd tells its own QEMU by what the process cannot change about itself (its pid, start time
and boot), recorded by hostd at launch: not by its command line, nor by the pidfile QEMU
writes, which a compromised QEMU can both rewrite."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from hostd import qemu
from hostd.agent import Agent
from hostd.drivers.network import NullNetworkDriver
from hostd.errors import LaunchFailed
from hostd.vm import VmRuntime
from whimbrel.v1 import common_pb2, events_pb2, host_pb2

# Stands in for a QEMU that a guest took over: it daemonizes as QEMU does (the launcher exits
# once the pidfile is written) and the daemon then execs another program under its pid, so
# nothing of QEMU's command line is left in /proc/PID/cmdline.
HIDING_QEMU = """
import os, sys
args = sys.argv[1:]
pidfile = args[args.index("-pidfile") + 1]
ready, written = os.pipe()
if os.fork():
    os.close(written)
    os.read(ready, 1)
    sys.exit(0)
os.setsid()
devnull = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(devnull, fd)
with open(pidfile, "w") as f:
    f.write(f"{os.getpid()}\\n")
os.write(written, b"x")
os.execv("/bin/sleep", ["sleep", "300"])
"""


async def _emit(*_: object) -> None:
    pass


def _vm_dir(state: Path, name: str = "vm-1") -> VmRuntime:
    """A VM's state as hostd saves it before it launches QEMU."""
    runtime = VmRuntime(common_pb2.VmSpec(name=name), state / "vms" / name, _emit)
    runtime.save()
    return runtime


def _agent(state: Path, locks: Path) -> Agent:
    return Agent("h1", "127.0.0.1:1", state, locks, "127.0.0.1", NullNetworkDriver())


@contextlib.asynccontextmanager
async def hiding_qemu(tmp_path: Path, paths: qemu.VmPaths) -> AsyncIterator[int]:
    """Launch the hiding QEMU through hostd's own launch; killed (by its pid) at the end."""
    script = tmp_path / "hiding_qemu.py"
    script.write_text(HIDING_QEMU)
    pid = await qemu.launch([sys.executable, str(script), "-pidfile", str(paths.pidfile)],
                            paths, "vm-1")  # fmt: skip
    try:
        await _until_cmdline_lacks(pid, str(paths.pidfile))
        yield pid
    finally:
        await qemu.kill(pid)


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


async def _until_cmdline_lacks(pid: int, text: str) -> None:
    for _ in range(200):
        if text.encode() not in _cmdline(pid):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{pid} still shows {text} on its command line")


@contextlib.contextmanager
def decoy(paths: qemu.VmPaths) -> Iterator[subprocess.Popen[bytes]]:
    """A process whose command line names the VM's pidfile, as the old check wants to see."""
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)", str(paths.pidfile)]
    )
    try:
        yield process
    finally:
        process.kill()
        process.wait()


async def test_launch_refuses_a_second_qemu_beside_one_that_changed_its_command_line(
    tmp_path: Path,
) -> None:
    """A QEMU that exec'd another program under its pid still runs the VM's disks: a second
    launch for the VM is refused, whatever the first one's command line says now."""
    paths = _vm_dir(tmp_path / "state").paths
    async with hiding_qemu(tmp_path, paths) as pid:
        with pytest.raises(LaunchFailed, match=f"QEMU {pid} of vm-1 still runs"):
            await qemu.launch(["/bin/false"], paths, "vm-1")


async def test_reattach_keeps_a_qemu_that_changed_its_command_line(tmp_path: Path) -> None:
    """After a hostd restart, the QEMU hostd launched is watched again though its command line
    no longer names its files: its spec stays, and no exit is reported."""
    state = tmp_path / "state"
    paths = _vm_dir(state).paths
    async with hiding_qemu(tmp_path, paths) as pid:
        agent = _agent(state, tmp_path / "locks")
        try:
            await agent.reattach()  # its QMP never answers: tracked all the same
            assert agent.executor.vms["vm-1"].pid == pid
            assert (paths.root / "spec.pb").exists()
            kinds = [e.payload.WhichOneof("kind") for e in agent.pending]
            assert "qemu_exited" not in kinds
        finally:
            await agent.close()


async def test_the_pid_comes_from_hostd_s_record_not_from_the_pidfile(tmp_path: Path) -> None:
    """A QEMU that rewrites its pidfile to name another process (one whose command line
    names the pidfile) does not point hostd at that process: hostd's record names the QEMU."""
    paths = _vm_dir(tmp_path / "state").paths
    async with hiding_qemu(tmp_path, paths) as pid:
        with decoy(paths) as other:
            paths.pidfile.write_text(f"{other.pid}\n")
            assert qemu.find(paths) == qemu.Found(pid, runs=True)


def test_a_recorded_pid_now_of_another_process_is_not_the_qemu(tmp_path: Path) -> None:
    """A pid the record names, reused by another process since (its start time differs), or
    recorded before a reboot (another boot id): the QEMU is gone, whatever runs there now."""
    paths = qemu.VmPaths(tmp_path)
    with decoy(paths) as other:
        identity = qemu.identify(other.pid)
        assert identity is not None
        for recorded in (
            qemu.Identity(other.pid, identity.start_time - 1, identity.boot_id),
            qemu.Identity(other.pid, identity.start_time, "another-boot"),
        ):
            qemu.record_identity(paths, recorded)
            assert qemu.find(paths) == qemu.Found(other.pid, runs=False)
        qemu.record_identity(paths, identity)
        assert qemu.find(paths) == qemu.Found(other.pid, runs=True)


def test_a_dead_recorded_qemu_is_gone(tmp_path: Path) -> None:
    """The recorded QEMU has exited: nothing runs, and a launch goes ahead."""
    paths = qemu.VmPaths(tmp_path)
    process = subprocess.Popen(["/bin/sleep", "300"])
    try:
        identity = qemu.identify(process.pid)
    finally:
        process.kill()
        process.wait()
    assert identity is not None
    qemu.record_identity(paths, identity)
    assert qemu.find(paths) == qemu.Found(process.pid, runs=False)


def test_without_a_record_the_pidfile_and_command_line_still_find_qemu(
    tmp_path: Path,
) -> None:
    """A VM directory an older hostd wrote has no record: its QEMU is found as before, by the
    pidfile and the pidfile's path on the process's command line."""
    paths = qemu.VmPaths(tmp_path)
    with decoy(paths) as process:
        paths.pidfile.write_text(f"{process.pid}\n")
        assert qemu.find(paths) == qemu.Found(process.pid, runs=True)
    assert qemu.find(paths) == qemu.Found(process.pid, runs=False)
    paths.pidfile.unlink()
    assert qemu.find(paths) == qemu.Found(0, runs=False)


async def test_launch_records_the_identity_atomically_and_privately(tmp_path: Path) -> None:
    """The record hostd writes at launch names the pid QEMU reported and that process's start
    time and boot; only hostd's user can read it."""
    paths = _vm_dir(tmp_path / "state").paths
    async with hiding_qemu(tmp_path, paths) as pid:
        record = json.loads(paths.identity.read_text())
        assert qemu.Identity(**record) == qemu.identify(pid)
        assert paths.identity.stat().st_mode & 0o777 == 0o600


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory", "garbage", "huge", "wrong-types"])
async def test_an_unreadable_record_is_an_error_not_a_gone_qemu(tmp_path: Path, kind: str) -> None:
    """A record hostd cannot read or understand says nothing about whether QEMU still runs:
    it is an error (never "gone", which would have the VM forgotten and started again), read
    without blocking, and a launch is refused over it."""
    paths = qemu.VmPaths(tmp_path)
    target = tmp_path / "elsewhere"
    target.write_text(json.dumps({"pid": 2, "start_time": 1, "boot_id": "x"}))
    if kind == "symlink":
        paths.identity.symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(paths.identity)
    elif kind == "directory":
        paths.identity.mkdir()
    elif kind == "garbage":
        paths.identity.write_bytes(b"\xff\x00{")
    elif kind == "huge":
        paths.identity.write_text(json.dumps({"pid": 2, "start_time": 1, "boot_id": "x" * 9000}))
    else:
        paths.identity.write_text(json.dumps({"pid": "2", "start_time": True, "boot_id": 1}))
    with pytest.raises((OSError, ValueError)):
        qemu.find(paths)
    with pytest.raises(LaunchFailed, match="cannot tell"):
        await qemu.launch(["/bin/false"], paths, "vm-1")


def test_identify_reads_start_time_and_boot_of_a_live_process() -> None:
    """A live process's identity; a dead one has none."""
    process = subprocess.Popen(["/bin/sleep", "300"])
    try:
        identity = qemu.identify(process.pid)
        assert identity is not None and identity.pid == process.pid and identity.start_time > 0
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        assert identity.boot_id == boot_id
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert qemu.identify(process.pid) is None


async def test_a_pid_reused_before_it_is_held_is_never_watched_nor_killed(tmp_path: Path) -> None:
    """Between the check that found the QEMU running and the pidfd that holds it, the QEMU may
    die and its pid go to another process. Checked again once the pidfd is held: the other
    process is not watched as the VM's QEMU, and a destroy does not kill it."""
    runtime = _vm_dir(tmp_path / "state")
    with decoy(runtime.paths) as other:
        identity = qemu.identify(other.pid)
        assert identity is not None
        # The record of a QEMU that had this pid before `other` did.
        qemu.record_identity(
            runtime.paths, qemu.Identity(other.pid, identity.start_time - 1, identity.boot_id)
        )
        runtime.track(other.pid)
        await asyncio.wait_for(runtime.exited.wait(), 5)  # reported gone at once
        await runtime.kill("destroyed")
        assert other.poll() is None  # still running
        await runtime.close()


async def test_a_start_refused_beside_a_running_qemu_keeps_the_lease(tmp_path: Path) -> None:
    """START_VM took the lease, then the launch was refused because a QEMU of the VM still
    ran here, untracked: the refusal gave the lease up, and nothing then kept another host from
    starting a second QEMU on the same disks. The lease stays where a QEMU may run."""
    state = tmp_path / "state"
    paths = _vm_dir(state).paths
    async with hiding_qemu(tmp_path, paths) as pid:
        agent = _agent(state, tmp_path / "locks")
        try:
            start = host_pb2.Command(
                command_id="c-1", vm="vm-1", kind=events_pb2.COMMAND_KIND_START_VM,
                args=events_pb2.CommandArgs(
                    spec=common_pb2.VmSpec(name="vm-1", memory_mib=64, vcpus=1),
                    lease_generation=1,
                ),
            )  # fmt: skip
            with pytest.raises(LaunchFailed, match=f"QEMU {pid} of vm-1 still runs"):
                await agent.executor.run(start)
            held = agent.executor.lease.read("vm-1")
            assert (held.holder, held.generation) == ("h1", 1)
        finally:
            await agent.close()


def test_a_qemu_an_older_hostd_started_beside_a_stale_record_is_found(tmp_path: Path) -> None:
    """After a downgrade, an older hostd launched the VM's QEMU and left the newer one's record
    of a QEMU since gone; upgraded again, hostd took the VM's QEMU for gone by that record and
    forgot it while it ran. The pidfile and command line still find it."""
    paths = qemu.VmPaths(tmp_path)
    gone = subprocess.Popen(["/bin/sleep", "300"])
    stale = qemu.identify(gone.pid)
    gone.kill()
    gone.wait()
    assert stale is not None
    qemu.record_identity(paths, stale)
    with decoy(paths) as older:
        paths.pidfile.write_text(f"{older.pid}\n")
        assert qemu.find(paths) == qemu.Found(older.pid, runs=True)
    assert qemu.find(paths).runs is False
