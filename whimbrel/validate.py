"""Checks shared by the coordinator and hostd: names and the fields of a VM spec.

Names become file names (the lease in the shared lockspace, a VM's directory in the state dir)
and QEMU option values, so one definition serves both sides: the coordinator refuses a bad
request, and hostd refuses a bad command even from a coordinator that let it through. A name
never contains `/` nor starts with `.`; `fullmatch`, because `$` also matches before a final
newline. A refused value is shown cut to SHOWN characters: the message travels back as a gRPC
status, whose details a client refuses beyond a few KiB of metadata.

Invalid        root (a ValueError); its message names the field and the value refused
"""

from __future__ import annotations

import argparse
import re

from whimbrel.v1 import common_pb2

__all__ = [
    "DISK_FORMATS",
    "DISK_INTERFACES",
    "MACHINES",
    "NIC_MODELS",
    "Invalid",
    "check_migration_id",
    "check_name",
    "check_path",
    "check_spec",
    "shown",
]

# VMs and hosts: lowercase, so a name is also a valid DNS label and a QEMU -name.
NAME = re.compile(r"[a-z][a-z0-9-]{0,62}")
# Migration ids: operators may choose their own; a first character that is neither `.` nor `-`.
MIGRATION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
TAP = re.compile(r"[A-Za-z0-9_-]{1,15}")
# A Linux interface name (at most 15 bytes), never `.` or `..`.
BRIDGE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}")
DISK_FORMATS = ("raw", "qcow2")
DISK_INTERFACES = ("", "ide", "virtio")
NIC_MODELS = ("", "virtio-net-pci", "e1000")
MACHINES = ("", "pc", "q35")
MEMORY_BACKINGS = ("", "ram", "file")
SHOWN = 80
# Linux's PATH_MAX. Paths reach QEMU's command line and every listing of the VM.
MAX_PATH = 4096
# Far beyond a real VM (QEMU's IDE bus takes 4 disks), small enough that a listing of every VM
# stays within a gRPC message.
MAX_DISKS = 32
MAX_NICS = 32


class Invalid(ValueError):
    pass


def shown(value: str) -> str:
    """`value` as a message quotes it, cut to SHOWN characters."""
    if len(value) <= SHOWN:
        return repr(value)
    return f"{value[:SHOWN]!r}... ({len(value)} characters)"


def check_name(kind: str, name: str) -> None:
    if not NAME.fullmatch(name):
        raise Invalid(
            f"{kind} name {shown(name)} is invalid: "
            "1-63 characters of [a-z0-9-], starting with a letter"
        )


def check_migration_id(migration_id: str) -> None:
    if not MIGRATION_ID.fullmatch(migration_id):
        raise Invalid(
            f"migration id {shown(migration_id)} is invalid: 1-64 characters of [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )


def check_path(kind: str, path: str) -> None:
    """An absolute path of printable characters (no NUL, newline or escape: a path reaches a
    QEMU option, a log line and an operator's terminal), at most MAX_PATH long."""
    if len(path) > MAX_PATH:
        raise Invalid(f"{kind} path {shown(path)} is longer than {MAX_PATH} characters")
    if not path.startswith("/"):
        raise Invalid(f"{kind} path {shown(path)} must be absolute")
    if not path.isprintable():
        raise Invalid(f"{kind} path {shown(path)} contains control characters")


def check_spec(spec: common_pb2.VmSpec) -> None:
    """Every field of a VM spec that reaches a file name or a QEMU option. Whether its paths
    may be used on a host is that host's own decision (hostd's allowed roots)."""
    check_name("VM", spec.name)
    if not 16 <= spec.memory_mib <= 1048576:
        raise Invalid(f"memory_mib {spec.memory_mib} is out of range 16..1048576")
    if not 1 <= spec.vcpus <= 256:
        raise Invalid(f"vcpus {spec.vcpus} is out of range 1..256")
    if spec.machine not in MACHINES:
        raise Invalid(f"machine {shown(spec.machine)} is not one of pc, q35")
    if spec.on_lost not in common_pb2.LostVmAction.values():
        raise Invalid(f"on_lost {spec.on_lost} is not a LostVmAction")
    if len(spec.disks) > MAX_DISKS or len(spec.nics) > MAX_NICS:
        raise Invalid(
            f"{len(spec.disks)} disks and {len(spec.nics)} NICs: at most {MAX_DISKS} and {MAX_NICS}"
        )
    for disk in spec.disks:
        check_path("disk", disk.path)
        if disk.format not in DISK_FORMATS:
            raise Invalid(f"disk format {shown(disk.format)} is not one of raw, qcow2")
        if disk.interface not in DISK_INTERFACES:
            raise Invalid(f"disk interface {shown(disk.interface)} is not one of ide, virtio")
    macs = set()
    for nic in spec.nics:
        # A multicast address (the first octet odd) or all zeros is no NIC's own.
        not_unicast = MAC.fullmatch(nic.mac) is None or int(nic.mac[:2], 16) & 1
        if not_unicast or nic.mac == "00:00:00:00:00:00":
            raise Invalid(
                f"NIC MAC {shown(nic.mac)} is not a unicast MAC in lower-case hex "
                "(52:54:00:xx:xx:xx, say)"
            )
        if nic.mac in macs:
            raise Invalid(f"NIC MAC {nic.mac} appears twice")
        macs.add(nic.mac)
        if nic.model not in NIC_MODELS:
            raise Invalid(f"NIC model {shown(nic.model)} is not one of virtio-net-pci, e1000")
        if nic.tap and not TAP.fullmatch(nic.tap):
            raise Invalid(f"tap name {shown(nic.tap)} is invalid (at most 15 of [A-Za-z0-9_-])")
        if nic.bridge and not BRIDGE.fullmatch(nic.bridge):
            raise Invalid(f"bridge name {shown(nic.bridge)} is not a network interface name")
    check_kernel_boot(spec)
    backing = spec.memory_backing
    if backing.kind not in MEMORY_BACKINGS:
        raise Invalid(f"memory backing {shown(backing.kind)} is not one of ram, file")
    if backing.kind == "file":
        check_path("memory backing", backing.path)
    elif backing.path:
        raise Invalid("a memory backing path needs kind file")


def check_kernel_boot(spec: common_pb2.VmSpec) -> None:
    """Direct kernel boot: absolute paths, and a command line QEMU passes to the guest as is
    (one argument, so no option of QEMU's can hide in it)."""
    if not spec.kernel:
        if spec.initrd or spec.append:
            raise Invalid("initrd and append need a kernel")
        return
    check_path("kernel", spec.kernel)
    if spec.initrd:
        check_path("initrd", spec.initrd)
    if len(spec.append) > 1024 or not all(" " <= c <= "~" for c in spec.append):
        raise Invalid("append must be at most 1024 characters of printable ASCII")


def positive_seconds(text: str) -> float:
    """A command-line flag's number of seconds (an argparse type: usage error, exit 2)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def coordinator_address(text: str) -> str:
    """HOST:PORT of a coordinator to connect to (an argparse type: usage error, exit 2). gRPC
    takes a port past 65535 modulo 65536, so 127.0.0.1:99999 would reach some other port."""
    host, sep, port = text.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT with a port in 1..65535")
    return text


def coordinator_addresses(text: str) -> str:
    """One or more comma-separated `coordinator_address`es (tried in turn)."""
    addresses = [a.strip() for a in text.split(",") if a.strip()]
    if not addresses:
        raise argparse.ArgumentTypeError(f"{text!r} names no coordinator HOST:PORT")
    return ",".join(coordinator_address(a) for a in addresses)
