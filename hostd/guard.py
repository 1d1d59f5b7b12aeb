"""What hostd lets a command do, whatever the coordinator says.

A wrong coordinator (a bug, a stolen certificate, a forged log) must not be able to make hostd
hurt the host or a VM, so every command is checked here before it acts:

- names (VM, migration) by the rules shared with the coordinator (`whimbrel.validate`): they
  become file names in the state dir and the shared lockspace;
- a VM spec's fields, again; its disks and memory file only under the allowed roots (resolved
  with realpath, so no symlink leads out), regular files only unless block devices are
  allowed; a direct-boot kernel and initrd only under the allowed kernel roots (QEMU only
  reads them, so a kernel root such as /boot is never a place a guest could write to);
  its bridges only those allowed;
- migration URIs only `tcp:<IP>:<port>`: QEMU would run `exec:` as a shell command, and a
  host name could resolve anywhere.

Every refusal is a CommandRejected naming what was wrong.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hostd.errors import CommandRejected
from whimbrel import files, validate
from whimbrel.v1 import common_pb2, host_pb2

__all__ = ["Guard", "check_migration_uri", "check_names"]

_PORT = re.compile(r"[0-9]{1,5}")
_IP_TEXT = re.compile(r"[0-9A-Fa-f.:]+")


def check_names(c: host_pb2.Command) -> None:
    """The command's VM and migration names, and its spec's name, are valid and agree."""
    try:
        validate.check_name("VM", c.vm)  # every command acts on one VM
        if c.migration_id:
            validate.check_migration_id(c.migration_id)
        if c.args.peer_host:
            validate.check_name("peer host", c.args.peer_host)  # in QEMU's TLS checks
    except validate.Invalid as err:
        raise CommandRejected(f"refused: {err}", vm=c.vm) from err
    if c.args.HasField("spec") and c.args.spec.name != c.vm:
        raise CommandRejected(
            f"refused: the spec names VM {c.args.spec.name!r}, the command {c.vm!r}", vm=c.vm
        )


def check_migration_uri(uri: str, vm: str = "") -> str:
    """`uri` if it is `tcp:<IP>:<port>` (IPv6 in brackets); raises CommandRejected otherwise."""
    scheme, _, rest = uri.partition(":")
    host, sep, port = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
        # Digits, dots and colons only: Python takes anything after a `%` as an IPv6 scope,
        # where QEMU would read `]`, `,` and options of its own.
        ok = (
            scheme == "tcp"
            and bool(_IP_TEXT.fullmatch(host))
            and bool(sep)
            and bool(_PORT.fullmatch(port))
            and 0 < int(port) < 65536
        )
    except ValueError:
        ok = False
    if not ok:
        raise CommandRejected(
            f"refused migration URI {uri!r}: only tcp:<IP address>:<port> is allowed", vm=vm
        )
    return uri


@dataclass(frozen=True)
class Guard:
    # Directories disks and memory files must resolve under (realpath); none: no disks at all.
    disk_roots: tuple[Path, ...] = ()
    allow_block_devices: bool = False
    # Bridges a NIC may name.
    bridges: frozenset[str] = field(default_factory=frozenset)
    # Directories a direct-boot kernel and initrd must resolve under.
    kernel_roots: tuple[Path, ...] = ()

    @classmethod
    def of(
        cls,
        disk_roots: Iterable[str],
        bridges: Iterable[str],
        allow_block_devices: bool = False,
        kernel_roots: Iterable[str] = (),
    ) -> Guard:
        return cls(
            _resolved(disk_roots), allow_block_devices, frozenset(bridges), _resolved(kernel_roots)
        )

    def spec(self, spec: common_pb2.VmSpec, *, incoming: bool = False) -> common_pb2.VmSpec:
        """A copy of `spec` with every file resolved, for QEMU's command line; raises
        CommandRejected for anything this host does not allow. A migration destination
        (`incoming`) backs RAM anonymously, so the source's memory file is not its concern."""
        try:
            validate.check_spec(spec)
        except validate.Invalid as err:
            raise CommandRejected(f"refused: {err}", vm=spec.name) from err
        resolved = common_pb2.VmSpec()
        resolved.CopyFrom(spec)
        for disk in resolved.disks:
            disk.path = self._file(disk.path, "disk", spec.name, self.allow_block_devices)
            if disk.format == "qcow2":
                os.close(self.open_disk(disk.path, spec.name, disk.format, os.O_RDONLY))
        backing = resolved.memory_backing
        if backing.kind == "file" and not incoming:
            backing.path = self._file(backing.path, "memory file", spec.name, block=False)
        # Both ends need the kernel: QEMU sizes the boot ROM it migrates from the files.
        for what in ("kernel", "initrd"):
            if getattr(resolved, what):
                path = self._file(getattr(resolved, what), what, spec.name, block=False,
                                  roots=self.kernel_roots, flag="--allow-kernel-root")  # fmt: skip
                setattr(resolved, what, path)
        for nic in spec.nics:
            if nic.bridge and nic.bridge not in self.bridges:
                allowed = ", ".join(sorted(self.bridges)) or "none"
                raise CommandRejected(
                    f"refused: bridge {nic.bridge!r} of NIC {nic.mac} is not allowed here "
                    f"(--allow-bridge: {allowed})",
                    vm=spec.name,
                )
        return resolved

    def open_disk(self, path: str, vm: str, fmt: str, flags: int = os.O_RDWR) -> int:
        """A descriptor of disk `path` (as `spec` resolved it) for QEMU to open again through
        /proc/self/fd: opened beneath its allowed root without following a symlink, so a
        directory swapped for one since the check cannot send QEMU elsewhere. A qcow2 image
        is checked through the descriptor, so the header judged is the one QEMU reads."""
        real = Path(path)
        root = next((r for r in self.disk_roots if real.is_relative_to(r)), None)
        if root is None:
            raise CommandRejected(f"refused: disk {path!r} is not under an allowed root", vm=vm)
        try:
            fd = files.open_beneath(root, real, flags, block=self.allow_block_devices)
        except OSError as err:
            raise CommandRejected(f"refused: disk {path!r}: {err.strerror or err}", vm=vm) from err
        if fmt == "qcow2":
            try:
                _refuse_other_files(fd, path, vm)
            except BaseException:
                os.close(fd)
                raise
        return fd

    def _file(
        self,
        path: str,
        what: str,
        vm: str,
        block: bool,
        roots: tuple[Path, ...] | None = None,
        flag: str = "--allow-disk-root",
    ) -> str:
        allowed = self.disk_roots if roots is None else roots
        real = Path(os.path.realpath(path))
        if not any(real.is_relative_to(root) for root in allowed):
            names = ", ".join(str(r) for r in allowed) or "none"
            raise CommandRejected(
                f"refused: {what} {path!r} is not under an allowed root ({flag}: {names})",
                vm=vm,
            )
        try:
            mode = os.stat(real).st_mode
        except OSError as err:
            raise CommandRejected(f"refused: {what} {path!r}: {err.strerror}", vm=vm) from err
        if not (stat.S_ISREG(mode) or (block and stat.S_ISBLK(mode))):
            kind = "a block device" if stat.S_ISBLK(mode) else "not a regular file"
            hint = " (--allow-block-devices is off)" if stat.S_ISBLK(mode) else ""
            raise CommandRejected(f"refused: {what} {path!r} is {kind}{hint}", vm=vm)
        return str(real)


def _resolved(roots: Iterable[str]) -> tuple[Path, ...]:
    return tuple(Path(os.path.realpath(root)) for root in roots)


# qcow2's header (docs/interop/qcow2.txt): magic, version, backing file offset (0: none), and
# from version 3 the incompatible features, whose bit 2 says the data lives in another file.
_QCOW2 = struct.Struct(">4sIQ")
_QCOW2_MAGIC = b"QFI\xfb"
_QCOW2_FEATURES = struct.Struct(">Q")
_QCOW2_FEATURES_AT = 72
_QCOW2_EXTERNAL_DATA = 1 << 2


def _refuse_other_files(fd: int, path: str, vm: str) -> None:
    """A qcow2 image names its files itself: a backing file or an external data file would
    have QEMU open (and the guest write) a file no allowed root covers. Images standing alone
    only. `fd`: the image, opened as `path`."""
    try:
        header = os.pread(fd, _QCOW2_FEATURES_AT + _QCOW2_FEATURES.size, 0)
    except OSError as err:
        raise CommandRejected(f"refused: disk {path!r}: {err.strerror}", vm=vm) from err
    if len(header) < _QCOW2.size or header[:4] != _QCOW2_MAGIC:
        raise CommandRejected(f"refused: disk {path!r} is not a qcow2 image", vm=vm)
    _magic, version, backing_offset = _QCOW2.unpack_from(header)
    external = False
    if version >= 3 and len(header) >= _QCOW2_FEATURES_AT + _QCOW2_FEATURES.size:
        (features,) = _QCOW2_FEATURES.unpack_from(header, _QCOW2_FEATURES_AT)
        external = bool(features & _QCOW2_EXTERNAL_DATA)
    if backing_offset or external:
        what = "a backing file" if backing_offset else "an external data file"
        raise CommandRejected(
            f"refused: qcow2 disk {path!r} names {what}, which no allowed root covers",
            vm=vm,
        )
