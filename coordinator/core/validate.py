"""Validation of names, VM specs and migration policies (raises InvalidRequest)."""

from __future__ import annotations

import re

from coordinator.core.errors import InvalidRequest
from whimbrel.v1 import common_pb2, events_pb2

NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
MIGRATION_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
DISK_FORMATS = ("raw", "qcow2")
DISK_INTERFACES = ("", "ide", "virtio")
NIC_MODELS = ("", "virtio-net-pci", "e1000")
MACHINES = ("", "pc", "q35")

DEFAULT_POLICY = events_pb2.MigrationPolicy(
    parameters=events_pb2.MigrationParameters(downtime_limit_ms=300),
    auto_postcopy_min_passes=3,
    min_shrink_percent=10,
    auto_postcopy_max_passes=10,
    max_recovery_attempts=3,
    recovery_attempt_timeout_ms=30_000,
)


def check_name(kind: str, name: str) -> None:
    if not NAME.match(name):
        raise InvalidRequest(
            f"{kind} name {name!r} is invalid: 1-63 characters of [a-z0-9-], starting with a letter"
        )


def check_migration_id(migration_id: str) -> None:
    if not MIGRATION_ID.match(migration_id):
        raise InvalidRequest(
            f"migration id {migration_id!r} is invalid: 1-64 characters of [A-Za-z0-9._-]"
        )


def check_spec(spec: common_pb2.VmSpec) -> None:
    check_name("VM", spec.name)
    if not 16 <= spec.memory_mib <= 1048576:
        raise InvalidRequest(f"memory_mib {spec.memory_mib} is out of range 16..1048576")
    if not 1 <= spec.vcpus <= 256:
        raise InvalidRequest(f"vcpus {spec.vcpus} is out of range 1..256")
    if spec.machine not in MACHINES:
        raise InvalidRequest(f"machine {spec.machine!r} is not one of pc, q35")
    for disk in spec.disks:
        if not disk.path.startswith("/"):
            raise InvalidRequest(f"disk path {disk.path!r} must be absolute")
        if disk.format not in DISK_FORMATS:
            raise InvalidRequest(f"disk format {disk.format!r} is not one of raw, qcow2")
        if disk.interface not in DISK_INTERFACES:
            raise InvalidRequest(f"disk interface {disk.interface!r} is not one of ide, virtio")
    macs = set()
    for nic in spec.nics:
        if not MAC.match(nic.mac):
            raise InvalidRequest(f"NIC MAC {nic.mac!r} is not of the form 52:54:00:xx:xx:xx")
        if nic.mac in macs:
            raise InvalidRequest(f"NIC MAC {nic.mac} appears twice")
        macs.add(nic.mac)
        if nic.model not in NIC_MODELS:
            raise InvalidRequest(f"NIC model {nic.model!r} is not one of virtio-net-pci, e1000")
        if nic.tap and not re.match(r"^[A-Za-z0-9_-]{1,15}$", nic.tap):
            raise InvalidRequest(f"tap name {nic.tap!r} is invalid (at most 15 of [A-Za-z0-9_-])")
    check_kernel_boot(spec)
    backing = spec.memory_backing
    if backing.kind not in ("", "ram", "file"):
        raise InvalidRequest(f"memory backing {backing.kind!r} is not one of ram, file")
    if backing.kind == "file" and not backing.path.startswith("/"):
        raise InvalidRequest("a file memory backing needs an absolute path")


def check_kernel_boot(spec: common_pb2.VmSpec) -> None:
    if not spec.kernel:
        if spec.initrd or spec.append:
            raise InvalidRequest("initrd and append need a kernel")
        return
    if not spec.kernel.startswith("/"):
        raise InvalidRequest(f"kernel path {spec.kernel!r} must be absolute")
    if spec.initrd and not spec.initrd.startswith("/"):
        raise InvalidRequest(f"initrd path {spec.initrd!r} must be absolute")
    if len(spec.append) > 1024 or not all(" " <= c <= "~" for c in spec.append):
        raise InvalidRequest("append must be at most 1024 characters of printable ASCII")


def effective_policy(requested: events_pb2.MigrationPolicy) -> events_pb2.MigrationPolicy:
    """The requested policy with every unset field taken from the defaults."""
    policy = events_pb2.MigrationPolicy()
    policy.CopyFrom(DEFAULT_POLICY)
    params = requested.parameters
    for name in ("max_bandwidth", "downtime_limit_ms", "max_postcopy_bandwidth"):
        if getattr(params, name):
            setattr(policy.parameters, name, getattr(params, name))
    for name in (
        "auto_postcopy_min_passes",
        "min_shrink_percent",
        "auto_postcopy_max_passes",
        "max_recovery_attempts",
        "recovery_attempt_timeout_ms",
    ):
        if getattr(requested, name):
            setattr(policy, name, getattr(requested, name))
    if policy.min_shrink_percent > 100:
        raise InvalidRequest("min_shrink_percent must be at most 100")
    if policy.parameters.downtime_limit_ms > 2000:
        raise InvalidRequest("downtime_limit_ms must be at most 2000")
    return policy
