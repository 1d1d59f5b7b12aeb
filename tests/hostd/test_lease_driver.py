"""The file lease driver: one holder at a time, generations that only grow, and a record that a
crash mid-write cannot lose (two sectors, each with its CRC)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostd.drivers.lease import SECTOR, FileLeaseDriver, Lease, decode
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
