"""The file lease driver: one holder at a time, generations that only grow, and a record that a
crash mid-write cannot lose (two sectors, each with its CRC)."""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import Awaitable
from pathlib import Path

import pytest

from hostd.drivers.lease import (
    LOCK_WAIT_S,
    MAX_VERSION,
    SECTOR,
    FileLeaseDriver,
    Lease,
    decode,
    encode,
)
from hostd.errors import LeaseError


async def test_acquire_release_and_hand_over(tmp_path: Path) -> None:
    """A lease moves only after its holder released it, with a higher generation."""
    leases = FileLeaseDriver(tmp_path)
    assert (await leases.acquire("vm-1", "host-a", 1)).holder == "host-a"
    with pytest.raises(LeaseError, match="held by host-a"):
        await leases.acquire("vm-1", "host-b", 2)
    released = await leases.release("vm-1", "host-a")
    assert released is not None and released.generation == 1
    assert await leases.release("vm-1", "host-a") is None  # holds nothing any more
    assert (await leases.acquire("vm-1", "host-b", 2)).generation == 2
    # What is on disk, read without the driver: the newest of the two sector records.
    data = (tmp_path / "vm-1.lease").read_bytes()
    records = [decode(data[i : i + SECTOR]) for i in (0, SECTOR)]
    newest = max((r for r in records if r), key=lambda r: r.version)
    assert (newest.lease.holder, newest.lease.generation) == ("host-b", 2)


async def test_generation_must_grow(tmp_path: Path) -> None:
    """A stale acquire (generation not above the recorded one) is refused."""
    leases = FileLeaseDriver(tmp_path)
    await leases.acquire("vm-1", "host-a", 5)
    await leases.release("vm-1", "host-a")
    with pytest.raises(LeaseError, match="not above 5"):
        await leases.acquire("vm-1", "host-b", 5)


async def test_release_by_a_non_holder_changes_nothing(tmp_path: Path) -> None:
    """Only the holder can release."""
    leases = FileLeaseDriver(tmp_path)
    await leases.acquire("vm-1", "host-a", 1)
    assert await leases.release("vm-1", "host-b") is None
    assert leases.read("vm-1").holder == "host-a"


def tear(path: Path, sector: int) -> None:
    """A crash in the middle of writing `sector`: its second half never reached the disk."""
    data = bytearray(path.read_bytes())
    start = sector * SECTOR + SECTOR // 2
    data[start : (sector + 1) * SECTOR] = bytes(SECTOR // 2)
    path.write_bytes(bytes(data))


async def test_a_torn_write_leaves_the_lease_as_it_was(tmp_path: Path) -> None:
    """Each write goes to the older sector: tearing it leaves the previous record in force."""
    leases = FileLeaseDriver(tmp_path)
    await leases.acquire("vm-1", "host-a", 1)  # version 1, sector 1
    await leases.release("vm-1", "host-a")  # version 2, sector 0
    await leases.acquire("vm-1", "host-b", 2)  # version 3, sector 1
    tear(tmp_path / "vm-1.lease", 1)  # as if the crash came during the last write
    assert leases.read("vm-1") == Lease("", 1)
    # The lease goes on from there (that write lands in the torn sector again).
    assert (await leases.acquire("vm-1", "host-b", 2)).holder == "host-b"
    assert leases.read("vm-1").holder == "host-b"


async def test_a_lease_file_without_a_valid_record_is_an_error(tmp_path: Path) -> None:
    """Garbage (or another format) is refused loudly, never read as a free lease."""
    leases = FileLeaseDriver(tmp_path)
    await leases.acquire("vm-1", "host-a", 1)
    tear(tmp_path / "vm-1.lease", 0)
    tear(tmp_path / "vm-1.lease", 1)
    with pytest.raises(LeaseError, match="no valid lease record"):
        leases.read("vm-1")
    with pytest.raises(LeaseError, match="no valid lease record"):
        await leases.acquire("vm-1", "host-b", 2)


async def _ticks_while(work: Awaitable[object]) -> tuple[int, BaseException | None]:
    """How often a 10 ms heartbeat ran while `work` ran, and what it raised: a driver that
    blocks the event loop starves every other VM of this host."""
    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    beating = asyncio.create_task(heartbeat())
    try:
        await asyncio.wait_for(work, 5)
        error = None
    except LeaseError as err:
        error = err
    finally:
        beating.cancel()
    return ticks, error


async def test_a_lock_held_elsewhere_fails_the_change_without_freezing_hostd(
    tmp_path: Path,
) -> None:
    """A process on the shared storage that holds a VM's lock for good: the change fails after
    LOCK_WAIT_S, and the event loop runs meanwhile (a blocking flock froze it for good)."""
    leases = FileLeaseDriver(tmp_path)
    await leases.acquire("vm-1", "host-a", 1)
    holder = os.open(tmp_path / "vm-1.lock", os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another open file: conflicts as another process would
    try:
        ticks, error = await _ticks_while(leases.release("vm-1", "host-a"))
    finally:
        os.close(holder)
    assert isinstance(error, LeaseError) and "held elsewhere" in str(error)
    assert ticks >= LOCK_WAIT_S / 0.01 / 2
    assert leases.read("vm-1").holder == "host-a"  # nothing changed
    assert await leases.release("vm-1", "host-a") is not None  # and once free, it works


async def test_a_fifo_planted_as_the_lease_file_is_refused_at_once(tmp_path: Path) -> None:
    """Opening a FIFO for reading waits for a writer: it froze hostd. It is refused now."""
    leases = FileLeaseDriver(tmp_path)
    os.mkfifo(tmp_path / "vm-1.lease")
    _, error = await _ticks_while(leases.acquire("vm-1", "host-a", 1))
    assert isinstance(error, LeaseError) and "not a regular file" in str(error)
    with pytest.raises(LeaseError, match="not a regular file"):
        leases.read("vm-1")


async def test_a_record_at_its_last_version_is_refused_not_overflowed(tmp_path: Path) -> None:
    """A forged record (valid CRC) at the largest version: the next write would overflow the
    format (struct.error escaped and stopped a VM's event forwarding); it is a LeaseError."""
    leases = FileLeaseDriver(tmp_path)
    (tmp_path / "vm-1.lease").write_bytes(
        encode(MAX_VERSION, Lease("host-a", 3), 0) + bytes(SECTOR)
    )
    with pytest.raises(LeaseError, match="last record version"):
        await leases.release("vm-1", "host-a")
