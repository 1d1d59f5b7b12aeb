"""Launching and killing QEMU processes.

QEMU runs daemonized (-daemonize, -pidfile) so it outlives hostd; a restarted hostd finds it by
the files under the VM's directory in the state dir: the identity hostd recorded at launch
(`qemu.identity`) and the QMP socket. The identity is the process's pid, start time and boot,
none of which the process can change; its command line and its pidfile it can rewrite, so
they identify it only in a directory an older hostd wrote, which has no record.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeGuard

from hostd import migration_tls
from hostd.errors import LaunchFailed, QemuMayRun
from whimbrel import files, priority
from whimbrel.v1 import common_pb2

QEMU = os.environ.get("WHIMBREL_QEMU", "qemu-system-x86_64")
# Linux's largest pid_max: a larger number in a file names no process (and overflows kill()).
PID_MAX_LIMIT = 1 << 22
# What hostd reads of the pidfile and of its own record, which are far smaller: a file of
# megabytes there is not one they wrote.
MAX_PIDFILE_BYTES = 32
MAX_IDENTITY_BYTES = 1024
# /proc/PID/stat: the start time is field 22, counted here from field 3, the first after the
# command name (which may hold spaces and parentheses).
_STAT_START_TIME = 22 - 3


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

    @property
    def identity(self) -> Path:
        return self.root / "qemu.identity"


@dataclass(frozen=True)
class Identity:
    """A process as no other process is, before or after it: its pid, its start time (clock
    ticks after boot) and the boot. A pid reused by another process has another start time."""

    pid: int
    start_time: int
    boot_id: str


class Found(NamedTuple):
    """The VM's QEMU as its files name it: its pid (0: none named), and whether that process
    still runs as the one hostd launched."""

    pid: int
    runs: bool


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
    its pid once the pidfile exists, with the process's identity recorded."""
    paths.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    _refuse_a_second(paths, vm)
    _remove_stale(paths, vm)
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
    try:
        pid = read_pid(paths)
    except OSError as err:
        raise LaunchFailed(f"QEMU started but its pidfile is unreadable: {err}", vm=vm) from err
    if pid is None:
        raise LaunchFailed("QEMU started but wrote no pidfile", vm=vm)
    await _record_launched(pid, paths, vm)
    return pid


def _refuse_a_second(paths: VmPaths, vm: str) -> None:
    """Refuse a launch while the VM's last QEMU may still run: an orphan (its QMP unreachable,
    or a hostd that lost track of it) is found only by its files, and a second QEMU would run
    the same disks."""
    try:
        found = find(paths)
    except (OSError, ValueError) as err:
        raise QemuMayRun(
            f"cannot tell whether a QEMU of {vm} still runs ({err}); refusing to start one", vm=vm
        ) from err
    if found.runs:
        raise QemuMayRun(
            f"QEMU {found.pid} of {vm} still runs; refusing to start a second one", vm=vm
        )


def _remove_stale(paths: VmPaths, vm: str) -> None:
    """Remove the files of the VM's last QEMU, the record first: a hostd that dies before it
    records the new QEMU then finds it by its pidfile, not as gone by the old record."""
    for stale in (paths.identity, paths.pidfile, paths.qmp, paths.log):
        try:
            stale.unlink()
        except FileNotFoundError:
            pass
        except OSError as err:
            raise LaunchFailed(f"cannot remove the stale {stale}: {err}", vm=vm) from err


async def _record_launched(pid: int, paths: VmPaths, vm: str) -> None:
    """Record the identity of QEMU `pid`, just launched. A QEMU hostd could not record would
    be taken for gone by a restarted hostd while it runs the VM's disks: it is killed."""
    identity = identify(pid)
    if identity is None:
        return  # already gone: the exit watch reports it
    try:
        record_identity(paths, identity)
    except OSError as err:
        await kill(pid)
        raise LaunchFailed(
            f"QEMU {pid} killed: its identity could not be recorded: {err}", vm=vm
        ) from err


def find(paths: VmPaths) -> Found:
    """The VM's QEMU, by the identity hostd recorded at launch; failing that (a directory an
    older hostd wrote), by the pidfile and its path on the process's command line. A file
    there that cannot be read or understood raises OSError or ValueError: it says nothing
    about whether QEMU still runs."""
    recorded = read_identity(paths)
    if recorded is not None and _runs(recorded):
        return Found(recorded.pid, runs=True)
    # No record, or the one recorded is gone. A QEMU an older hostd started since (a
    # downgrade, then an upgrade: the older one leaves the record in place) is found the way
    # that hostd found it; when in doubt, a QEMU runs, which refuses a second one.
    pid = read_pid(paths)
    if pid is not None and alive(pid) and started_with(pid, paths):
        return Found(pid, runs=True)
    return Found(recorded.pid if recorded is not None else pid or 0, runs=False)


def still_recorded(paths: VmPaths, pid: int) -> bool:
    """Whether process `pid` is still the QEMU recorded at launch, as far as the record tells
    (without a record of `pid`, there is nothing to tell it by). Asked once a pidfd holds the
    process: between an earlier check and the pidfd, the QEMU may have died and its pid gone
    to another process, which a kill through that pidfd would then hit."""
    recorded = read_identity(paths)
    if recorded is None or recorded.pid != pid:
        return True
    return _runs(recorded)


def _runs(recorded: Identity) -> bool:
    """Whether the process recorded still runs: its pid alive (no zombie) and still its own."""
    return alive(recorded.pid) and identify(recorded.pid) == recorded


def identify(pid: int) -> Identity | None:
    """Process `pid`'s identity, None once it is gone."""
    stat = _proc_text(pid, "stat")
    if stat is None:
        return None
    start_time = int(stat.rsplit(")", 1)[1].split()[_STAT_START_TIME])
    return Identity(pid, start_time, _boot_id())


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def record_identity(paths: VmPaths, identity: Identity) -> None:
    """Keep `identity` as the VM's QEMU, whole or not at all (a crash leaves the old record)."""
    data = json.dumps(dataclasses.asdict(identity)).encode()
    files.write_atomically(paths.identity, data)


def read_identity(paths: VmPaths) -> Identity | None:
    """The identity hostd recorded, None when there is no record; ValueError for a record
    hostd did not write."""
    data = _read_small(paths, paths.identity.name, MAX_IDENTITY_BYTES)
    if data is None:
        return None
    fields = json.loads(data)
    if not isinstance(fields, dict) or set(fields) != {"pid", "start_time", "boot_id"}:
        raise ValueError(f"{paths.identity}: not a QEMU identity")
    pid, start_time, boot_id = fields["pid"], fields["start_time"], fields["boot_id"]
    if not (_is_pid(pid) and _is_whole(start_time) and isinstance(boot_id, str)):
        raise ValueError(f"{paths.identity}: not a QEMU identity")
    return Identity(pid, start_time, boot_id)


def read_pid(paths: VmPaths) -> int | None:
    """The pid QEMU wrote, or None (no pidfile, or no pid in it). Only a pid that can be a
    QEMU's is taken: 0, -1 or 1 handed to kill() would signal hostd's own process group,
    every process, or init. A pidfile that cannot be read raises OSError."""
    try:
        data = _read_small(paths, paths.pidfile.name, MAX_PIDFILE_BYTES)
        pid = int(data.decode("ascii").strip()) if data is not None else None
    except ValueError:
        return None
    return pid if _is_pid(pid) else None


def _read_small(paths: VmPaths, name: str, limit: int) -> bytes | None:
    """File `name` in the VM's directory, None when there is none. Opened by files.open_in:
    never through a symlink, and no FIFO (which would block hostd's event loop for good) or
    other file that is not a regular one. More than `limit` bytes raise ValueError."""
    try:
        dir_fd = files.open_dir(paths.root)
    except FileNotFoundError:
        return None
    try:
        fd = files.open_in(dir_fd, name, os.O_RDONLY)
    except FileNotFoundError:
        return None
    finally:
        os.close(dir_fd)
    with open(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{paths.root / name} holds more than {limit} bytes")
    return data


def _is_whole(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_pid(value: object) -> TypeGuard[int]:
    return _is_whole(value) and 1 < value <= PID_MAX_LIMIT


def started_with(pid: int, paths: VmPaths) -> bool:
    """Whether process `pid` is a QEMU started with these paths (a pid in a stale pidfile may
    have been reused by another process). Only for a VM directory without hostd's record: a
    QEMU can change its own command line."""
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
