"""The coordinator application: the loop that joins the log, the core and the hosts.

Every change goes the same way, under one lock so each decision sees the state it was made on:
decide -> append (group commit, durable) -> evolve -> send the commands just made durable. Host
observations are appended, folded, and then every migration they touch is advanced until the core
decides nothing more. A command is sent only after its CommandIssued event committed (outbox);
commands still unanswered are sent again when their host reconnects (hostd answers a repeated
command id with its stored result).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf.message import Message

from coordinator import codec, host_stream
from coordinator.checkpointer import Checkpointer
from coordinator.commit_pipeline import Commit, CommitPipeline
from coordinator.core import (
    Event,
    IllegalTransition,
    NewEvent,
    Phase,
    World,
    decide,
    evolve,
    scheduling,
)
from coordinator.core import inputs as I
from coordinator.core.state import Command
from coordinator.host_session import HostSession, issued_command, outstanding
from coordinator.log import EventStore, LogLocked, PendingEvent, StaleEpoch, StoreError
from coordinator.read_gate import ReadGate
from coordinator.replay import replay
from coordinator.telemetry import Telemetry
from whimbrel import protocol
from whimbrel.v1 import common_pb2, events_pb2, host_pb2

log = logging.getLogger(__name__)
T = TypeVar("T")


def wall_clock_us() -> int:
    return time.time_ns() // 1000


class Coordinator:
    """One message (a request, a host's event, a connect) is handled as one unit, under a lock:
    its observations are folded, every decision they lead to is taken and folded too, and all of
    it is committed in one transaction. Only then are commands sent and host events
    acknowledged. Folding ahead of the commit is safe because nothing leaves the process before
    the commit; if the commit fails, the world is ahead of the log and the coordinator stops
    (a restart replays the log).

    Host events, the hot path, hold the lock only to fold, decide and queue their commit, and
    wait for the commit outside it: the next unit (often the other host of the same handoff)
    folds on top meanwhile and its commit joins the same group. Commits land in queue order,
    so what a unit sends never overtakes a fact it was decided on. Readers of the world wait,
    without the lock, until nothing is in flight (`reading`); a host's connect reads the log's
    high-water marks under the lock, once nothing is in flight."""

    def __init__(
        self,
        store: EventStore,
        clock: Callable[[], int] = wall_clock_us,
        telemetry: Telemetry | None = None,
        host_wait: float = 30.0,
        checkpoint_path: Path | None = None,
        checkpoint_every: int = 0,
    ) -> None:
        self.store = store
        self.clock = clock
        # Recovery after a restart: how long to wait for the hosts of open migrations.
        self.host_wait = host_wait
        self.recovered = asyncio.Event()
        self._recovery_started = time.monotonic()
        self._deadline: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Future[Any]] = set()
        self._ticker: asyncio.Task[None] | None = None
        self.checkpointer = Checkpointer(checkpoint_path, checkpoint_every)
        self.checkpoint_path = checkpoint_path
        # Told each time the start waits for another writer's lock on the log.
        self.waiting_for_lock: Callable[[], None] | None = None
        self.sessions: dict[str, HostSession] = {}
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        # Shut while a guest is in its switchover: reads and watchers wait at it (read_gate).
        self.read_gate = ReadGate()
        self._queue_judged_at = -1
        self.pipeline = CommitPipeline(
            store, telemetry or Telemetry(), self._committed, self._failed
        )
        # Set when this coordinator must stop: a newer one owns the log, or the log failed.
        self.fenced = asyncio.Event()
        self.stop_reason = ""

    # --- start --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Replay the log and take it over with a new epoch (before serving anything)."""
        started = time.monotonic()
        self.pipeline.world = await asyncio.to_thread(replay, self.store, self.checkpoint_path)
        self.checkpointer.replayed_up_to(self.world.last_seq)
        self.telemetry.seed(self.world)

        def first(epoch: int) -> PendingEvent:
            payload = events_pb2.CoordinatorStarted(
                epoch=epoch, version=protocol.VERSION, pid=os.getpid()
            )
            return codec.to_pending(NewEvent(protocol.COORDINATOR_STREAM, payload, self.clock()))

        epoch = await self._take_epoch(first)
        seq, _ = self.store.head()
        # The new epoch's event, and before it whatever a previous coordinator committed after
        # the replay (it may have held the log's write lock until the new epoch fenced it).
        for stored in self.store.read(from_seq=self.world.last_seq + 1):
            evolve(self.world, codec.from_stored(stored))
        async with self._lock:
            # Streams that were open before the restart are gone now.
            for host in self.world.hosts.values():
                if host.connected:
                    gone = events_pb2.HostDisconnected(
                        host_id=host.host_id, generation=host.generation,
                        reason="coordinator restarted",
                    )  # fmt: skip
                    self.pipeline.stage([self._host_event(host.host_id, gone)])
            self._begin_recovery()
            await self.pipeline.flush()
        self._recovery_started = started
        self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="clock-tick")
        if not self.world.awaited_hosts:
            self._recovery_over()
        else:
            loop = asyncio.get_running_loop()
            self._deadline = loop.call_later(self.host_wait, self._recovery_deadline)
        log.info("coordinator epoch %d serving a log of %d events", epoch, seq)

    async def _tick(self, every: float = 1.0) -> None:
        """Decisions that depend on time alone (a post-copy recovery attempt stuck past its
        bound) need the clock to move them: advance every open migration now and then."""
        while True:
            await asyncio.sleep(every)
            if not self.world.open_migrations or self.fenced.is_set():
                continue
            with contextlib.suppress(StoreError):  # the coordinator stops itself on those
                await self._whole(self._advance_open())

    async def _advance_open(self) -> None:
        # A queued migration has nothing that time alone decides; room for it is judged when
        # an event makes some (`_admit_queued`).
        async with self._lock:
            world = self.world
            started = [
                m for m in world.open_migrations if world.migrations[m].phase != Phase.QUEUED
            ]
            self._advance(started)
            await self.pipeline.flush()

    async def close(self) -> None:
        """Stop the clock tick and the recovery timer, and open the read gate for good (the
        server and the store are the caller's)."""
        self.read_gate.close()
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None

    async def _take_epoch(self, first: Callable[[int], PendingEvent]) -> int:
        """A new epoch, waiting as long as another writer (a hung coordinator that still holds
        the log's write lock) keeps it: once it lets go, the new epoch fences it."""
        while True:
            try:
                return await asyncio.to_thread(self.store.begin_epoch, first)
            except LogLocked:
                log.warning("the log is locked by another writer (a hung coordinator?); waiting")
                if self.waiting_for_lock is not None:
                    self.waiting_for_lock()

    # --- recovery -----------------------------------------------------------------------------

    def _begin_recovery(self) -> None:
        """Record what recovery waits for: every host of an open migration. Caller holds the
        lock. Nothing is decided for a migration until its hosts said hello (their snapshots
        are the truth the log may have missed) or the bound expired."""
        open_migrations = sorted(self.world.open_migrations)
        if not open_migrations:
            return
        migrations = [self.world.migrations[mid] for mid in open_migrations]
        hosts = {m.source for m in migrations} | {m.destination for m in migrations}
        started = events_pb2.RecoveryStarted(
            open_migrations=open_migrations, awaited_hosts=sorted(hosts)
        )
        self.pipeline.stage([NewEvent(protocol.COORDINATOR_STREAM, started, self.clock())])
        log.info("recovery: %d open migrations, awaiting hosts %s (up to %.0f s)",
                 len(open_migrations), ", ".join(sorted(hosts)), self.host_wait)  # fmt: skip

    def _finish_recovery(self, missing: Sequence[str]) -> None:
        """Caller holds the lock: close recovery and decide every open migration."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        finished = events_pb2.RecoveryFinished(
            migrations_reconciled=len(self.world.open_migrations), missing_hosts=sorted(missing)
        )
        (event,) = self.pipeline.stage(
            [NewEvent(protocol.COORDINATOR_STREAM, finished, self.clock())]
        )
        if missing:
            log.warning(
                "recovery: hosts %s did not return within %.0f s; their migrations follow "
                "the recovery table", ", ".join(missing), self.host_wait,
            )  # fmt: skip
        self._advance(self.world.open_migrations, everything=event.seq)
        self._reconcile_vms(self.world.vms, everything=event.seq)
        self._recovery_over()

    def _recovery_over(self) -> None:
        self.telemetry.recovered(time.monotonic() - self._recovery_started)
        self.recovered.set()

    def _recovery_deadline(self) -> None:
        self._deadline = None
        task = asyncio.get_running_loop().create_task(self._expire_recovery())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _expire_recovery(self) -> None:
        async with self._lock:
            if self.recovered.is_set():
                return
            self._finish_recovery(sorted(self.world.awaited_hosts))
            await self.pipeline.flush()

    @property
    def telemetry(self) -> Telemetry:
        return self.pipeline.telemetry

    @telemetry.setter
    def telemetry(self, telemetry: Telemetry) -> None:
        """(Tests swap in an exporter after start.)"""
        self.pipeline.telemetry = telemetry

    @property
    def world(self) -> World:
        """The world as folded so far: committed, or staged and on its way (see `reading`)."""
        return self.pipeline.world

    def _committed(self, events: list[Event]) -> None:
        """A transaction is durable: checkpoint if due, send its commands, wake watchers."""
        self.checkpointer.after_commit(self.world, self.store)
        for event in events:
            if isinstance(event.payload, events_pb2.CommandIssued):
                self._dispatch(event.payload)
        # After the sends: a reader let go by this commit runs behind them, not ahead.
        self.read_gate.judge(self.world)
        self._changed.set()
        self._changed = asyncio.Event()

    def _failed(self, err: StoreError) -> None:
        if isinstance(err, StaleEpoch):
            self._stop(f"a newer coordinator owns the log: {err}")
        else:
            self._stop(f"the log failed, the world is ahead of it: {err}")

    def _dispatch(self, issued: events_pb2.CommandIssued) -> None:
        session = self.sessions.get(issued.host_id)
        if session is None:
            return  # stays in the outbox until the host connects
        command = issued_command(self.world, issued)
        if command is not None:
            self._send(session, command)

    def _send(self, session: HostSession, command: Command) -> None:
        session.send_command(command, self.world.epoch, self.telemetry.command_context(command))

    async def _whole(self, unit: Coroutine[Any, Any, T]) -> T:
        """Run one unit of work (fold, decide, commit, then send) to its end even if the RPC
        that asked for it is cancelled (a client or hostd hanging up): cut short between the
        commit and the sends, the world, the log and the hosts would disagree."""
        task = asyncio.ensure_future(unit)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return await asyncio.shield(task)

    def _stop(self, reason: str) -> None:
        log.error("stopping: %s", reason)
        self.stop_reason = reason
        self.fenced.set()

    def _host_event(self, host_id: str, payload: Message) -> NewEvent:
        return NewEvent(protocol.host_stream(host_id), payload, self.clock())

    # --- requests -----------------------------------------------------------------------------

    async def request(self, request: I.Input) -> list[Event]:
        return await self._whole(self._request(request))

    async def _request(self, request: I.Input) -> list[Event]:
        """Decide on an operator request (raising CoreError when refused), then advance."""
        async with self._lock:
            staged = self.pipeline.stage(decide(self.world, request))
            self._advance_touched(staged)
            await self.pipeline.flush()
            return staged

    def _advance(
        self,
        migration_ids: Iterable[str],
        causes: Mapping[str, int] | None = None,
        everything: int = 0,
    ) -> None:
        """Decide each migration until nothing more is. A decision's cause is the newest event
        that touched the migration (`causes`, else `everything`, else the migration's own
        latest: a decision of time alone), then the decision before it."""
        for migration_id in sorted(set(migration_ids)):
            cause = (causes or {}).get(migration_id) or everything
            cause = cause or self.world.migrations[migration_id].last_seq
            while True:
                decided = decide(self.world, I.Advance(migration_id, self.clock()))
                if not decided:
                    break
                cause = self.pipeline.stage(decided, cause)[-1].seq

    def _advance_touched(self, events: Iterable[Event]) -> None:
        touched: dict[str, int] = {}  # migration id -> the newest event touching it
        vm_names: dict[str, int] = {}
        for event in events:
            migration_id, _, vm_name = protocol.refs(event.payload)
            if migration_id:
                touched[migration_id] = event.seq
            vm = self.world.vms.get(vm_name) if vm_name else None
            if vm is not None:
                vm_names[vm_name] = event.seq
                if vm.migration_id:
                    touched[vm.migration_id] = event.seq
        self._advance(touched.keys() & self.world.open_migrations, touched)
        for migration_id, seq in touched.items():
            m = self.world.migrations.get(migration_id)
            if m is not None:
                vm_names[m.vm] = max(vm_names.get(m.vm, 0), seq)
        self._reconcile_vms(vm_names, vm_names)
        self._admit_queued()

    def _admit_queued(self) -> None:
        """Start the queued migrations there is room for now (a migration ended, a limit was
        raised, a host connected). Their cause: the newest event, which made the room. The
        queue is judged again only after such an event (`World.queue_changes`): judging it is
        linear in the open migrations, and most host events change nothing of it."""
        if self.world.queue_changes == self._queue_judged_at:
            return
        self._queue_judged_at = self.world.queue_changes
        if not any(
            self.world.migrations[mid].phase == Phase.QUEUED for mid in self.world.open_migrations
        ):
            return
        ready = [mid for mid, why in scheduling.waiting(self.world).items() if not why]
        self._advance(ready, everything=self.world.last_seq)

    def _reconcile_vms(
        self, names: Iterable[str], causes: Mapping[str, int] | None = None, everything: int = 0
    ) -> None:
        """VMs outside migrations: stray copies destroyed, the lost-VM policy applied."""
        for name in sorted(set(names)):
            cause = (causes or {}).get(name) or everything
            while decided := decide(self.world, I.ReconcileVm(name, self.clock())):
                cause = self.pipeline.stage(decided, cause)[-1].seq

    # --- hosts --------------------------------------------------------------------------------

    async def host_connected(self, hello: host_pb2.Hello) -> tuple[HostSession, int]:
        return await self._whole(self._host_connected(hello))

    async def _host_connected(self, hello: host_pb2.Hello) -> tuple[HostSession, int]:
        """Register a hostd stream; returns the session and the last stored host seq."""
        from coordinator.core.validate import check_name

        check_name("host", hello.host_id)
        async with self._lock:
            # The log's high-water mark for this host must include what is in flight.
            await self.pipeline.settled.wait()
            refusal = host_stream.check_hello(self.world, hello, self.clock())
            if refusal is not None:
                log.warning("refused: %s", refusal)
                raise host_stream.StreamRefused(refusal)
            current = self.world.hosts.get(hello.host_id)
            if current is not None and hello.generation < current.generation:
                raise IllegalTransition(
                    f"host {hello.host_id}", "connect", f"generation {current.generation}",
                    [f"generation >= {current.generation}"],
                )  # fmt: skip
            old = self.sessions.pop(hello.host_id, None)
            if old is not None:
                old.close()
            session = HostSession(hello.host_id, hello.generation)
            last = self.store.host_high_water(hello.host_id, hello.generation)
            session.stored[hello.generation] = last
            self.sessions[hello.host_id] = session
            connected = events_pb2.HostConnected(
                host_id=hello.host_id, generation=hello.generation,
                highest_epoch_seen=hello.highest_epoch_seen, last_acked_seq=hello.last_acked_seq,
                migration_address=hello.migration_address, version=hello.version,
                capacity=hello.capacity,
            )  # fmt: skip
            now = self.clock()
            new = [
                NewEvent(
                    protocol.host_stream(hello.host_id),
                    connected,
                    now,
                    hello.host_id,
                    hello.generation,
                )
            ]
            observations = list(hello.vms)
            # The hello lists every QEMU the host has: one the log believes in but the hello
            # leaves out is gone (a host that lost its state, a QEMU that died meanwhile).
            reported = {o.vm for o in hello.vms}
            for vm in sorted(self.world.qemus_believed_on(hello.host_id) - reported):
                observations.append(common_pb2.VmObservation(vm=vm, process_alive=False))
            for observation in observations:
                reason = "hello" if observation.vm in reported else "hello: not listed"
                snapshot = events_pb2.VmObserved(observation=observation, reason=reason)
                new.append(NewEvent(self._stream_for(observation.vm), snapshot, now,
                                    hello.host_id, hello.generation))  # fmt: skip
            staged = self.pipeline.stage(new)
            if not self.recovered.is_set() and not self.world.awaited_hosts:
                self._finish_recovery([])
            self._advance_touched(staged)
            self._advance(self.world.open_migrations, everything=staged[0].seq)
            await self.pipeline.flush()
            welcome = host_pb2.Welcome(epoch=self.world.epoch, last_stored_seq=last)
            session.send(host_pb2.CoordinatorMessage(welcome=welcome))
            for command in outstanding(self.world, hello.host_id):
                self._send(session, command)
            return session, last

    async def queue_host_events(
        self, session: HostSession, events: Sequence[host_pb2.HostEvent]
    ) -> asyncio.Future[None]:
        """Fold a host's observations and what they lead to and queue their commit; returns
        a future that resolves once they are committed, their commands sent and the host's
        events acknowledged. The next batch may be folded meanwhile.

        Unlike other units of work this one needs no `_whole`: a caller cancelled while it
        waits for the lock has had nothing done, nothing under the lock is awaited, and what
        follows the commit runs in its own shielded task."""
        async with self._lock:
            if self.sessions.get(session.host_id) is not session:
                raise IllegalTransition(
                    f"host {session.host_id} stream", "report", "replaced by a newer stream",
                    ["current"],
                )  # fmt: skip
            # Judge the batch before anything of it is staged or counted as stored: one payload
            # the host may not send refuses all of it.
            stored = dict(session.stored)
            fresh: list[tuple[host_pb2.HostEvent, int, Message]] = []
            for host_event in events:
                # Re-sent events of an earlier generation keep their own (generation, seq).
                generation = min(host_event.generation or session.generation, session.generation)
                if generation not in stored:
                    stored[generation] = self.store.host_high_water(session.host_id, generation)
                # Already in the log (a re-send after a reconnect): drop before folding.
                if host_event.seq <= stored[generation]:
                    continue
                stored[generation] = host_event.seq
                kind = host_event.payload.WhichOneof("kind")
                if kind is None:
                    continue
                fresh.append((host_event, generation, getattr(host_event.payload, kind)))
            refusal = host_stream.check_stamps(
                session.host_id, [e for e, *_ in fresh], self.clock()
            )
            moots: list[bool] = []
            if refusal is None:
                refusal, moots = host_stream.judge_batch(
                    self.world, session.host_id, [p for *_, p in fresh]
                )
            if refusal is not None:
                log.warning("refused: %s", refusal)
                raise host_stream.StreamRefused(refusal)
            session.stored.update(stored)
            new = [
                NewEvent(
                    self._stream_for(getattr(payload, "vm", ""))
                    if not isinstance(payload, events_pb2.HostCapacityChanged)
                    else protocol.host_stream(session.host_id),
                    payload,
                    host_event.time_us or self.clock(),
                    session.host_id,
                    generation,
                    host_event.seq,
                )
                for (host_event, generation, payload), moot in zip(fresh, moots, strict=True)
                if not moot
            ]
            if len(new) < len(fresh):
                log.info("host %s: %d events about what the world no longer tracks dropped",
                         session.host_id, len(fresh) - len(new))  # fmt: skip
            staged = self.pipeline.stage(new)
            self._advance_touched(staged)
            commit = self.pipeline.queue()
        ack = None
        if events:
            last = events[-1]
            generation = min(last.generation or session.generation, session.generation)
            ack = host_pb2.Ack(generation=generation, seq=last.seq)
        finished = asyncio.ensure_future(self._acknowledge(session, ack, commit))
        self._background.add(finished)
        finished.add_done_callback(self._background.discard)
        # A caller cancelled while it waits (its stream ended) must not cancel the unit's end:
        # the commit's commands would never be sent.
        return asyncio.shield(finished)

    async def _acknowledge(
        self, session: HostSession, ack: host_pb2.Ack | None, commit: Commit | None
    ) -> None:
        # With nothing of this batch to commit, land still waits for the batches before it:
        # hostd forgets every event an ack covers.
        await self.pipeline.land(commit)
        if ack is not None:
            session.acknowledge(ack)

    async def host_disconnected(self, session: HostSession, reason: str) -> None:
        return await self._whole(self._host_disconnected(session, reason))

    async def _host_disconnected(self, session: HostSession, reason: str) -> None:
        async with self._lock:
            if self.sessions.get(session.host_id) is not session:
                return
            del self.sessions[session.host_id]
            payload = events_pb2.HostDisconnected(
                host_id=session.host_id, generation=session.generation, reason=reason
            )
            (event,) = self.pipeline.stage([self._host_event(session.host_id, payload)])
            self._advance(self.world.open_migrations, everything=event.seq)
            await self.pipeline.flush()

    def _stream_for(self, vm_name: str) -> str:
        vm = self.world.vms.get(vm_name)
        if vm is not None and vm.migration_id:
            return protocol.migration_stream(vm.migration_id)
        return protocol.vm_stream(vm_name) if vm_name else protocol.COORDINATOR_STREAM

    # --- reading and watching -----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[World]:
        """The world as committed, without taking the lock. Staged events are folded before
        their commit completes, so a read must wait until no commit is in flight; then the
        world is exactly the log, and stays so until the next await. The caller must not await
        while it uses the world (the next unit may fold into it meanwhile). Readers never take
        the lock: a flood of them (a watcher wakes after every commit) must not queue ahead of
        the next host events in the middle of a handoff."""
        while self.pipeline.in_flight:
            await self.pipeline.settled.wait()
        yield self.world

    async def wait_for_change(self, max_wait: float | None = None) -> None:
        """Return after the next committed change, or after `max_wait` seconds."""
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), max_wait)
