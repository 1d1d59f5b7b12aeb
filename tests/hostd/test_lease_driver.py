"""The file lease driver: one holder at a time, generations that only grow, atomic files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hostd.drivers.lease import FileLeaseDriver
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
    record = json.loads((tmp_path / "vm-1.lease").read_text())
    assert (record["holder"], record["generation"]) == ("host-b", 2)


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
