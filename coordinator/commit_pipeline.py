"""The commit pipeline: events are folded into the world ahead of their commit (staged), queued
to the log as one transaction per unit of work (the store groups concurrent ones), and once a
transaction is durable its events go on to whoever acts on them (`on_committed`: sending
commands, waking watchers).

Folding ahead is safe because nothing leaves the process before the commit; if a commit fails,
the world is ahead of the log and the owner must stop (`on_failure`; a restart replays the log).
Commits land in queue order, so what a unit sends never overtakes a fact it was decided on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from coordinator import codec
from coordinator.core import Event, NewEvent, World, evolve
from coordinator.log import EventStore, StoreError, StoreFailure
from coordinator.log.records import Mark
from coordinator.telemetry import Telemetry
from coordinator.telemetry.hub import migration_of
from whimbrel import failpoints
from whimbrel.v1 import events_pb2


@dataclass
class Commit:
    """A transaction queued at the log: what it holds, and its outcome to await."""

    staged: list[Event]
    entered: list[str]  # phases entered, for the coordinator.entered-PHASE failpoints
    started: float
    marks: Awaitable[tuple[int, list[Mark]]]


class CommitPipeline:
    def __init__(
        self,
        store: EventStore,
        telemetry: Telemetry,
        on_committed: Callable[[list[Event]], None],
        on_failure: Callable[[StoreError], None],
    ) -> None:
        self.store = store
        self.telemetry = telemetry
        self.world = World()
        self._on_committed = on_committed
        self._on_failure = on_failure
        self._staged: list[Event] = []
        # Phases entered by staged events (for the coordinator.entered-PHASE failpoints).
        self._entered: list[str] = []
        # The newest queued transaction's outcome: transactions commit in queue order, so once
        # it is durable, everything queued before it is too (see `land`).
        self._newest: asyncio.Future[tuple[int, list[Mark]]] | None = None
        # Commits queued and not yet landed; `settled` is set whenever there are none.
        self.in_flight = 0
        self.settled = asyncio.Event()
        self.settled.set()

    def stage(self, new_events: Sequence[NewEvent], cause_seq: int = 0) -> list[Event]:
        """Fold events into the world ahead of their commit. Callers serialize staging.
        `cause_seq`: the event that led to these decisions, recorded in those that carry it."""
        world = self.world
        head = world.last_seq  # everything folded so far, committed or on its way
        epoch = self.store.epoch
        staged = []
        for i, new in enumerate(new_events, start=1):
            if cause_seq and "cause_seq" in new.payload.DESCRIPTOR.fields_by_name:
                new.payload.cause_seq = cause_seq  # type: ignore[attr-defined]
            event = Event(head + i, new.stream, new.type, epoch, new.time_us, new.payload,
                          new.origin_host, new.origin_generation, new.origin_seq)  # fmt: skip
            # Which migration the event concerns does not change by folding it (a request names
            # its own id), so it is looked up once, on the hot path of every host event.
            migration_id = migration_of(world, new.payload)
            concerned = world.migrations.get(migration_id)
            phase_before = concerned.phase if concerned is not None else None
            evolve(world, event)
            concerned = world.migrations.get(migration_id)
            if concerned is not None and concerned.phase != phase_before:
                self._entered.append(concerned.phase.label)
            self.telemetry.staged(world, event, migration_id)
            self._staged.append(event)
            staged.append(event)
        return staged

    def queue(self) -> Commit | None:
        """Queue everything staged as the log's next transaction."""
        staged, self._staged = self._staged, []
        if not staged:
            return None
        entered, self._entered = self._entered, []
        try:
            # A future, not any awaitable: a `land(None)` may await it too.
            marks = asyncio.ensure_future(
                self.store.submit_marks([codec.to_pending(event) for event in staged])
            )
        except StoreError as err:
            self._on_failure(err)
            raise
        self._newest = marks
        self.in_flight += 1
        self.settled.clear()
        return Commit(staged, entered, time.monotonic(), marks)

    async def land(self, commit: Commit | None) -> list[Event]:
        """Wait for a queued transaction to be durable, then hand its events on. A unit that
        queued nothing (None) still returns only once everything queued before it is durable:
        what it answers may cover earlier events (a host's ack covers all before it)."""
        if commit is None:
            if self._newest is not None:
                await asyncio.shield(self._newest)
            return []
        events = commit.staged
        try:
            _, marks = await commit.marks
            if [m[0] if m else None for m in marks] != [event.seq for event in events]:
                raise StoreFailure("the log assigned other seqs than were folded")
        except StoreError as err:
            self._on_failure(err)
            raise
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self.settled.set()
        self.telemetry.committed(len(events), time.monotonic() - commit.started)
        failpoints.hit("coordinator.after-commit")
        for phase in commit.entered:
            failpoints.hit(f"coordinator.entered-{phase}")
        if any(self._is_destination_cont(event) for event in events):
            failpoints.hit("coordinator.after-cont-intent")
        self._on_committed(events)
        return events

    async def flush(self) -> list[Event]:
        """Commit everything staged, and return once nothing is in flight."""
        committed = await self.land(self.queue())
        await self.settled.wait()
        return committed

    def _is_destination_cont(self, event: Event) -> bool:
        p = event.payload
        if (
            not isinstance(p, events_pb2.CommandIssued)
            or p.kind != events_pb2.COMMAND_KIND_RESUME_VM
        ):
            return False
        m = self.world.migrations.get(p.migration_id)
        return m is not None and p.host_id == m.destination
