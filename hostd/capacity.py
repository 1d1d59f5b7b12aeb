"""What this host offers its VMs, reported in every hello: the machine's memory and CPUs, or
what the operator set aside for guests (`--capacity-memory-mib`, `--capacity-vcpus`)."""

from __future__ import annotations

import os
from pathlib import Path

from whimbrel.v1 import common_pb2


def machine_memory_mib(meminfo: Path = Path("/proc/meminfo")) -> int:
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024  # kB
    raise ValueError(f"{meminfo} has no MemTotal line")


def capacity(memory_mib: int | None, vcpus: int | None) -> common_pb2.HostCapacity:
    """The capacity to report: each value as given, else the machine's own."""
    return common_pb2.HostCapacity(
        memory_mib=memory_mib if memory_mib is not None else machine_memory_mib(),
        vcpus=vcpus if vcpus is not None else (os.cpu_count() or 1),
    )
