"""Stored records, the store port and the store's errors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from coordinator.log.canonical import body_bytes


class StoreError(Exception):
    """Root of the log's errors."""


class StaleEpoch(StoreError):
    """A newer coordinator epoch owns the log; appends under an older one are refused."""

    def __init__(self, mine: int, current: int) -> None:
        super().__init__(f"epoch {mine} is stale: the log belongs to epoch {current}")
        self.mine = mine
        self.current = current


class CorruptLog(StoreError):
    """The log is not a gap-free hash chain."""

    def __init__(self, seq: int, problem: str) -> None:
        super().__init__(f"log corrupt at seq {seq}: {problem}")
        self.seq = seq
        self.problem = problem


class StoreFailure(StoreError):
    """The database failed; nothing of the batch was stored."""


class LogLocked(StoreFailure):
    """Another writer holds the log's write lock (a hung coordinator, say); nothing of the
    batch was stored. Taking the log over can wait and try again."""


@dataclass(slots=True)
class PendingEvent:
    """An event to append: canonical payload bytes and the plain columns people query.

    `body` (the canonical bytes after seq and epoch) and `row` (the stored columns after what
    the writer assigns: stream, type, time_us, origin_host, origin_generation, origin_seq, then
    the tags migration_id, vm, host, then payload) are computed on creation, in the submitter's
    thread, so the log's single writer only links seq, epoch and hash. Not frozen, as
    `coordinator.core.Event` is not: one is made for every event appended.
    """

    stream: str
    type: str
    time_us: int
    payload: bytes
    origin_host: str = ""
    origin_generation: int = 0
    origin_seq: int = 0
    migration_id: str = ""
    vm: str = ""
    host: str = ""
    body: bytes = field(init=False, repr=False, compare=False)
    row: tuple[Any, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.body = body_bytes(self)
        self.row = (self.stream, self.type, self.time_us, self.origin_host,
                    self.origin_generation, self.origin_seq, *_tags_with_stream(self),
                    self.payload)  # fmt: skip


def _tags_with_stream(e: PendingEvent) -> tuple[str | None, str | None, str | None]:
    """The tag columns, with the stream's own name filled in (stream reads rely on it)."""
    migration_id, vm, host = e.migration_id, e.vm, e.host
    prefix, _, name = e.stream.partition("/")
    if prefix == "migration":
        migration_id = migration_id or name
    elif prefix == "vm":
        vm = vm or name
    elif prefix == "host":
        host = host or name
    return migration_id or None, vm or None, host or None


@dataclass(frozen=True, slots=True)
class StoredEvent:
    seq: int
    stream: str
    type: str
    epoch: int
    time_us: int
    payload: bytes
    origin_host: str
    origin_generation: int
    origin_seq: int
    prev_hash: bytes
    hash: bytes


# Result of an append per pending event: the stored event, or None for a dropped duplicate.
AppendResult = list[StoredEvent | None]
# What the writer decides per pending event: (seq, prev_hash, hash), or None for a duplicate.
Mark = tuple[int, bytes, bytes] | None


def materialize(events: Sequence[PendingEvent], marks: list[Mark], epoch: int) -> AppendResult:
    """StoredEvents from what was submitted and what the writer assigned."""
    return [
        None
        if mark is None
        else StoredEvent(
            mark[0],
            e.stream,
            e.type,
            epoch,
            e.time_us,
            e.payload,
            e.origin_host,
            e.origin_generation,
            e.origin_seq,
            mark[1],
            mark[2],
        )
        for e, mark in zip(events, marks, strict=True)
    ]


class EventStore(Protocol):
    """What the coordinator needs of a log."""

    @property
    def epoch(self) -> int: ...

    def begin_epoch(self, first: Callable[[int], PendingEvent]) -> int:
        """Take the log with a new epoch, appending `first(epoch)` in the same transaction."""
        ...

    def submit(self, events: Sequence[PendingEvent]) -> Future[AppendResult]:
        """Queue events for the next group commit; the future resolves once committed."""
        ...

    def append(self, events: Sequence[PendingEvent]) -> AppendResult:
        """Append and wait until committed."""
        ...

    async def append_async(self, events: Sequence[PendingEvent]) -> AppendResult:
        """Append from asyncio; returns once committed."""
        ...

    async def append_marks(self, events: Sequence[PendingEvent]) -> tuple[int, list[Mark]]:
        """Append from asyncio; returns (epoch, (seq, prev_hash, hash) or None per event)."""
        ...

    def submit_marks(self, events: Sequence[PendingEvent]) -> Awaitable[tuple[int, list[Mark]]]:
        """append_marks in two steps: queued now (appends commit in the order they were
        queued), awaited later. Raises at once when the log already refuses appends."""
        ...

    def read(
        self, from_seq: int = 1, stream: str | None = None, limit: int = 0
    ) -> Iterator[StoredEvent]: ...

    def head(self) -> tuple[int, bytes]:
        """The last seq and its hash ((0, zero hash) when empty)."""
        ...

    def host_high_water(self, host: str, generation: int) -> int:
        """The highest origin seq stored for (host, generation), 0 if none."""
        ...

    def wait_past(self, seq: int, timeout: float) -> bool:
        """Block until the log holds an event after `seq`, or the timeout passes."""
        ...

    def close(self) -> None: ...
