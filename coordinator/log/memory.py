"""An in-memory EventStore for the simulator and fast tests; same contract as SQLite.

Several stores may share one `MemoryDatabase`, which plays the role of the file: that is how the
contract tests check epoch fencing between two coordinators.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from coordinator.log.chain import ZERO_HASH, link
from coordinator.log.records import (
    AppendResult,
    Mark,
    PendingEvent,
    StaleEpoch,
    StoredEvent,
    StoreError,
)


@dataclass
class MemoryDatabase:
    events: list[StoredEvent] = field(default_factory=list)
    epoch: int = 0
    high_water: dict[tuple[str, int], int] = field(default_factory=dict)
    lock: threading.Condition = field(default_factory=threading.Condition)


class MemoryEventStore:
    def __init__(self, database: MemoryDatabase | None = None) -> None:
        self.database = database or MemoryDatabase()
        self._epoch = 0

    @property
    def epoch(self) -> int:
        return self._epoch

    def begin_epoch(self, first: Callable[[int], PendingEvent]) -> int:
        db = self.database
        with db.lock:
            db.epoch += 1
            self._epoch = db.epoch
            self._store([first(db.epoch)])
        return self._epoch

    def submit(self, events: Sequence[PendingEvent]) -> Future[AppendResult]:
        future: Future[AppendResult] = Future()
        try:
            future.set_result(self.append(events))
        except Exception as err:
            future.set_exception(err)
        return future

    def append(self, events: Sequence[PendingEvent]) -> AppendResult:
        db = self.database
        with db.lock:
            if db.epoch != self._epoch:
                raise StaleEpoch(self._epoch, db.epoch)
            return self._store(events)

    async def append_async(self, events: Sequence[PendingEvent]) -> AppendResult:
        return self.append(events)

    async def append_marks(self, events: Sequence[PendingEvent]) -> tuple[int, list[Mark]]:
        return await self.submit_marks(events)

    def submit_marks(self, events: Sequence[PendingEvent]) -> Awaitable[tuple[int, list[Mark]]]:
        done: asyncio.Future[tuple[int, list[Mark]]] = asyncio.get_running_loop().create_future()
        try:
            stored = self.append(events)
        except StoreError as err:
            done.set_exception(err)
            return done
        marks = [None if e is None else (e.seq, e.prev_hash, e.hash) for e in stored]
        done.set_result((self._epoch, marks))
        return done

    def _store(self, events: Sequence[PendingEvent]) -> AppendResult:
        db = self.database
        result: AppendResult = []
        for e in events:
            if e.origin_seq:  # unnumbered (seq 0) host facts, like hello snapshots, never repeat
                key = (e.origin_host, e.origin_generation)
                if e.origin_seq <= db.high_water.get(key, 0):
                    result.append(None)
                    continue
                db.high_water[key] = e.origin_seq
            seq = len(db.events) + 1
            prev = db.events[-1].hash if db.events else ZERO_HASH
            stored = StoredEvent(
                seq,
                e.stream,
                e.type,
                self._epoch,
                e.time_us,
                e.payload,
                e.origin_host,
                e.origin_generation,
                e.origin_seq,
                prev,
                link(prev, seq, self._epoch, e.body),
            )
            db.events.append(stored)
            result.append(stored)
        db.lock.notify_all()
        return result

    def read(
        self, from_seq: int = 1, stream: str | None = None, limit: int = 0
    ) -> Iterator[StoredEvent]:
        with self.database.lock:
            events = list(self.database.events[max(from_seq, 1) - 1 :])
        if stream:
            events = [e for e in events if e.stream == stream]
        yield from events[:limit] if limit else events

    def head(self) -> tuple[int, bytes]:
        with self.database.lock:
            events = self.database.events
            return (events[-1].seq, events[-1].hash) if events else (0, ZERO_HASH)

    def host_high_water(self, host: str, generation: int) -> int:
        with self.database.lock:
            return self.database.high_water.get((host, generation), 0)

    def wait_past(self, seq: int, timeout: float) -> bool:
        with self.database.lock:
            return self.database.lock.wait_for(lambda: len(self.database.events) > seq, timeout)

    def close(self) -> None:
        pass
