"""Events read off one host's stream and not yet folded, bounded.

While the inbox is full the stream is not read, so HTTP/2 flow control holds hostd back, and
hostd keeps what it could not send until it is acknowledged: nothing is lost. Messages go in
whole (in parts of at most the bound) rather than event by event: a host's backlog arrives at
thousands of events a second, and a queue operation per event was a tenth of the coordinator's
time spent on them.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence

from whimbrel.v1 import host_pb2


class HostInbox:
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"an inbox holds at least one event, not {limit}")
        self.limit = limit
        self._parts: deque[Sequence[host_pb2.HostEvent]] = deque()
        self._count = 0
        self._ended = False
        self._room = asyncio.Event()
        self._ready = asyncio.Event()

    async def put(self, events: Sequence[host_pb2.HostEvent]) -> None:
        """Queue `events`, waiting for room for each part of at most `limit` of them."""
        for start in range(0, len(events), self.limit):
            part = events[start : start + self.limit]
            while self._count + len(part) > self.limit:
                self._room.clear()
                await self._room.wait()
            self._parts.append(part)
            self._count += len(part)
            self._ready.set()

    def end(self) -> None:
        """No more events: `take` returns None once the inbox is empty."""
        self._ended = True
        self._ready.set()

    async def take(self) -> list[host_pb2.HostEvent] | None:
        """Every event queued, in order (at least one, at most `limit`); None once ended and
        empty."""
        while not self._parts:
            if self._ended:
                return None
            self._ready.clear()
            await self._ready.wait()
        batch = [event for part in self._parts for event in part]
        self._parts.clear()
        self._count = 0
        self._room.set()
        return batch
