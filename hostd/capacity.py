"""What this host offers its VMs, reported in every hello: the machine's memory and CPUs, or
what the operator set aside for guests (`--capacity-memory-mib`, `--capacity-vcpus`).

The machine's own can change while hostd runs (memory or CPUs hot-plugged or taken away):
`watch` reads it again every CAPACITY_POLL_S and reports each change, so placement and a drain
choose destinations by what hosts offer now.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from whimbrel.v1 import common_pb2

log = logging.getLogger(__name__)

# Hot-plug is rare and a drain plans in seconds: a change is known well before it matters.
CAPACITY_POLL_S = 30.0


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


async def watch(
    read: Callable[[], common_pb2.HostCapacity],
    report: Callable[[common_pb2.HostCapacity], Awaitable[None]],
    stopping: asyncio.Event,
    interval: float = CAPACITY_POLL_S,
) -> None:
    """Until `stopping`: every `interval`, read the capacity and hand it to `report` (which
    reports it if it changed)."""
    while not stopping.is_set():
        try:
            await asyncio.wait_for(stopping.wait(), interval)
        except TimeoutError:
            pass
        else:
            return
        try:
            current = read()
        except (OSError, ValueError) as err:
            log.warning("capacity not read again (the last one reported stands): %s", err)
            continue
        await report(current)
