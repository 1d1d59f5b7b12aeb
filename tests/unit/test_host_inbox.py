"""A host's inbox: events read off its stream, bounded, taken in order."""

from __future__ import annotations

import asyncio

import pytest

from coordinator.host_inbox import HostInbox
from whimbrel.v1 import host_pb2


def events(first: int, count: int) -> list[host_pb2.HostEvent]:
    return [host_pb2.HostEvent(seq=seq) for seq in range(first, first + count)]


async def test_take_returns_everything_queued_in_order() -> None:
    inbox = HostInbox(100)
    await inbox.put(events(1, 3))
    await inbox.put(events(4, 2))
    assert [e.seq for e in await inbox.take() or []] == [1, 2, 3, 4, 5]


async def test_a_full_inbox_holds_the_reader_until_events_are_taken() -> None:
    """The stream is not read while the inbox is full: put waits for a take."""
    inbox = HostInbox(4)
    await inbox.put(events(1, 3))
    blocked = asyncio.create_task(inbox.put(events(4, 2)))
    await asyncio.sleep(0)
    assert not blocked.done()
    assert [e.seq for e in await inbox.take() or []] == [1, 2, 3]
    await asyncio.wait_for(blocked, 1)
    assert [e.seq for e in await inbox.take() or []] == [4, 5]


async def test_a_message_larger_than_the_bound_goes_in_parts() -> None:
    """hostd sends up to 256 events a message: with a bound of 8, each take holds at most 8."""
    inbox = HostInbox(8)
    reader = asyncio.create_task(inbox.put(events(1, 20)))
    taken: list[int] = []
    while len(taken) < 20:
        batch = await asyncio.wait_for(inbox.take(), 1)
        assert batch is not None and len(batch) <= 8
        taken += [e.seq for e in batch]
    await reader
    assert taken == list(range(1, 21))


async def test_end_is_seen_after_the_last_events() -> None:
    inbox = HostInbox(8)
    await inbox.put(events(1, 2))
    inbox.end()
    assert [e.seq for e in await inbox.take() or []] == [1, 2]
    assert await inbox.take() is None


async def test_take_waits_for_events_or_the_end() -> None:
    inbox = HostInbox(8)
    waiting = asyncio.create_task(inbox.take())
    await asyncio.sleep(0)
    assert not waiting.done()
    await inbox.put(events(7, 1))
    assert [e.seq for e in await asyncio.wait_for(waiting, 1) or []] == [7]


def test_an_inbox_holds_at_least_one_event() -> None:
    with pytest.raises(ValueError, match="at least one event"):
        HostInbox(0)
