"""Launching and killing QEMU processes.

QEMU runs daemonized (-daemonize, -pidfile) so it outlives hostd; a restarted hostd finds it by
its pidfile and QMP socket under the VM's directory in the state dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hostd import migration_tls
from hostd.errors import LaunchFailed
from whimbrel import priority
from whimbrel.v1 import common_pb2

QEMU = os.environ.get("WHIMBREL_QEMU", "qemu-system-x86_64")


def opt(value: object) -> str:
    """A value inside a QEMU option list (`key=value,key=value`): a comma is written twice, so
    no value (a disk path, say) can end its field and add an option of its own."""
    return str(value).replace(",", ",,")


@dataclass(frozen=True)
class VmPaths:
    root: Path

    @property
    def qmp(self) -> Path:
        return self.root / "qmp.sock"

    @property
    def pidfile(self) -> Path:
        return self.root / "qemu.pid"

    @property
    def log(self) -> Path:
        return self.root / "qemu.log"


def tap_name(host_id: str, vm: str, index: int) -> str:
    """A tap device name unique per host, VM and NIC, within Linux's 15 characters."""
    digest = hashlib.sha1(f"{host_id}/{vm}/{index}".encode()).hexdigest()[:10]
    return f"wb{digest}{index}"[:15]


def command_line(
    spec: common_pb2.VmSpec,
    paths: VmPaths,
    host_id: str,
    *,
    incoming: bool,
    user: str = "",
    tls_dir: Path | None = None,
    disk_fds: Sequence[int] = (),
) -> list[str]:
    """The QEMU command line for a VM: a fresh start, or a migration destination. Every value
    from the spec goes through `opt` (hostd's guard has checked the values themselves); QEMU
    runs under its seccomp sandbox (a deny-list: userfaultfd, which post-copy needs, stays
    allowed), as `user` when given. With `tls_dir`, it loads migration TLS credentials from
    there (hostd/migration_tls.py)."""
    machine = spec.machine or "pc"
    args = [
        QEMU,
        "-name",
        opt(spec.name),
        "-machine",
        f"{opt(machine)},accel=tcg",
        "-m",
        f"{int(spec.memory_mib)}M",
        "-smp",
        str(int(spec.vcpus)),
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        "none",
        "-monitor",
        "none",
        "-sandbox",
        "on",
        "-qmp",
        f"unix:{opt(paths.qmp)},server=on,wait=off",
        "-daemonize",
        "-pidfile",
        str(paths.pidfile),
        "-D",
        str(paths.log),
    ]
    # The RAM backend id is the same on both sides so the migration stream matches; a
    # destination always uses anonymous memory, whatever backs the source.
    size = f"{spec.memory_mib}M"
    backing = spec.memory_backing
    if backing.kind == "file" and not incoming:
        args += [
            "-object",
            f"memory-backend-file,id=mem,size={size},mem-path={opt(backing.path)},share=off",
        ]
    else:
        args += ["-object", f"memory-backend-ram,id=mem,size={size}"]
    args += ["-machine", "memory-backend=mem"]
    for index, disk in enumerate(spec.disks):
        interface = disk.interface or "ide"
        # A descriptor hostd opened (Guard.open_disk), passed to QEMU: its /proc/self/fd link
        # opens that very file again, whatever its path leads to by now.
        path = f"/proc/self/fd/{disk_fds[index]}" if disk_fds else opt(disk.path)
        drive = f"file={path},format={opt(disk.format or 'raw')},if={opt(interface)}"
        args += ["-drive", drive]
    if spec.kernel:
        args += ["-kernel", spec.kernel]
        if spec.initrd:
            args += ["-initrd", spec.initrd]
        if spec.append:
            args += ["-append", spec.append]
    for index, nic in enumerate(spec.nics):
        tap = tap_name(host_id, spec.name, index)
        args += [
            "-netdev",
            f"tap,id=net{index},ifname={tap},script=no,downscript=no",
            "-device",
            f"{opt(nic.model or 'virtio-net-pci')},netdev=net{index},mac={opt(nic.mac)}",
        ]
    if tls_dir is not None:
        # Loaded now, as the user hostd runs as: QEMU reads no key after it dropped to `user`.
        for object_id, endpoint in (
            (migration_tls.SERVER, "server"),
            (migration_tls.CLIENT, "client"),
        ):
            args += [
                "-object",
                f"tls-creds-x509,id={object_id},dir={opt(tls_dir)},endpoint={endpoint},"
                "verify-peer=on",
            ]
    if user:
        args += ["-runas", user]
    if incoming:
        # -S: the destination stays paused after the migration until the coordinator's cont.
        args += ["-incoming", "defer", "-S"]
    return args


async def launch(args: list[str], paths: VmPaths, vm: str, pass_fds: Sequence[int] = ()) -> int:
    """Start QEMU daemonized, with the descriptors `pass_fds` open at the same numbers; returns
    its pid once the pidfile exists."""
    paths.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    running = read_pid(paths)
    if running is not None and alive(running) and started_with(running, paths):
        # An orphan (its QMP unreachable, or a hostd that lost track of it): its files are
        # all there is to find it by, and a second QEMU would run the same disks.
        raise LaunchFailed(
            f"QEMU {running} of {vm} still runs; refusing to start a second one", vm=vm
        )
    for stale in (paths.pidfile, paths.qmp, paths.log):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    # At nice 0 in a session of its own: the VM does not inherit hostd's priority.
    proc = await asyncio.create_subprocess_exec(
        *priority.at_normal_priority(args),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
        pass_fds=tuple(pass_fds),
    )
    output, _ = await proc.communicate()
    if proc.returncode != 0:
        # With -D, QEMU reports its errors in the log file rather than on stderr.
        text = output.decode(errors="replace").strip()
        with contextlib.suppress(FileNotFoundError):
            text = (text + "\n" + paths.log.read_text(errors="replace")).strip()
        raise LaunchFailed(f"QEMU exited with {proc.returncode}: {text}", vm=vm)
    pid = read_pid(paths)
    if pid is None:
        raise LaunchFailed("QEMU started but wrote no pidfile", vm=vm)
    return pid


def read_pid(paths: VmPaths) -> int | None:
    """The pid QEMU wrote, or None. Only a pid that can be a QEMU's is taken: 0, -1 or 1
    handed to kill() would signal hostd's own process group, every process, or init."""
    try:
        pid = int(paths.pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if pid > 1 else None


def started_with(pid: int, paths: VmPaths) -> bool:
    """Whether process `pid` is a QEMU started with these paths (a pid in a stale pidfile may
    have been reused by another process)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(paths.pidfile).encode() in cmdline


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    stat = _proc_text(pid, "stat")
    if stat is None:
        return False
    try:
        state = stat.rsplit(")", 1)[1].split()[0]
    except IndexError:
        return False
    return state != "Z"


def _proc_text(pid: int, name: str) -> str | None:
    """/proc/PID/NAME, or None once the process is gone: its directory missing, or (ESRCH)
    the process exiting while the file is read."""
    try:
        return Path(f"/proc/{pid}/{name}").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None


def can_still_act(pid: int) -> bool:
    """Whether QEMU `pid` could still act on a command written to it now: alive, and no
    SIGKILL sent to it yet. A killed process dies in the kernel before it runs another
    instruction of its own, but stays alive (not yet a zombie) for a moment after the kill:
    in that moment a command sent to it is lost for certain, not "maybe run"."""
    if not alive(pid):
        return False
    status = _proc_text(pid, "status")
    if status is None:
        return False
    sigkill = 1 << (signal.SIGKILL - 1)
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name in ("SigPnd", "ShdPnd") and int(value.strip() or "0", 16) & sigkill:
            return False
    return True


async def wait_exit(pid: int, limit: float | None = None) -> bool:
    """Wait until process `pid` has exited (pidfd: woken by the kernel, no polling)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return await wait_pidfd(fd, pid, limit)
    finally:
        os.close(fd)


async def wait_pidfd(fd: int, pid: int, limit: float | None = None) -> bool:
    """Wait until the process of pidfd `fd` (pid `pid`) has exited; False after `limit` s."""
    loop = asyncio.get_running_loop()
    gone = loop.create_future()

    def readable() -> None:
        if not gone.done():
            gone.set_result(None)

    loop.add_reader(fd, readable)
    try:
        if not alive(pid):
            return True
        await asyncio.wait_for(gone, limit)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)


async def kill(pid: int, limit: float = 10.0) -> bool:
    """SIGKILL and wait until gone (quit can hang on a paused post-copy destination)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return await wait_exit(pid, limit)
