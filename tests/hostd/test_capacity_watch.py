"""hostd reads its capacity again while it runs and reports each change once, durably, and its
next hello carries it; a read that fails keeps the last capacity reported."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hostd import capacity
from hostd.agent import Agent
from hostd.drivers.network import NullNetworkDriver
from whimbrel.v1 import common_pb2

START = common_pb2.HostCapacity(memory_mib=1024, vcpus=2)
GROWN = common_pb2.HostCapacity(memory_mib=2048, vcpus=2)


def agent(tmp_path: Path) -> Agent:
    return Agent("host-a", "127.0.0.1:1", tmp_path / "state", tmp_path / "locks", "127.0.0.1",
                 NullNetworkDriver(), capacity=START)  # fmt: skip


def reported(a: Agent) -> list[common_pb2.HostCapacity]:
    return [
        e.payload.host_capacity_changed.capacity
        for e in a.store.unacknowledged()
        if e.payload.WhichOneof("kind") == "host_capacity_changed"
    ]


async def test_each_change_is_reported_once_and_a_failed_read_changes_nothing(
    tmp_path: Path,
) -> None:
    a = agent(tmp_path)
    readings: list[common_pb2.HostCapacity | OSError] = [
        START, GROWN, GROWN, OSError("meminfo unreadable"), START
    ]  # fmt: skip
    done = asyncio.Event()

    def read() -> common_pb2.HostCapacity:
        value = readings.pop(0)
        if not readings:
            done.set()
        if isinstance(value, OSError):
            raise value
        return value

    watch = asyncio.create_task(capacity.watch(read, a.report_capacity, a.stopping, 0.001))
    await done.wait()
    a.stopping.set()
    await watch
    # Durable in the outbox, in order: the growth, then the way back; the same value read
    # again and the failed read reported nothing.
    assert reported(a) == [GROWN, START]
    assert (await a.hello()).capacity == START


async def test_the_watch_ends_when_hostd_stops(tmp_path: Path) -> None:
    a = agent(tmp_path)
    a.stopping.set()
    await asyncio.wait_for(capacity.watch(lambda: GROWN, a.report_capacity, a.stopping), 1)
    assert reported(a) == []
