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
import gc
import logging
import os
import threading
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf.message import Message

from coordinator import checkpoint, codec, host_stream
from coordinator.core import Event, IllegalTransition, NewEvent, World, decide, evolve
from coordinator.core import inputs as I
from coordinator.core.evolve import Fact, fold
from coordinator.core.state import Command, CommandState
from coordinator.log import EventStore, PendingEvent, StaleEpoch, StoreError, StoreFailure
from coordinator.log.records import Mark
from coordinator.telemetry import Telemetry
from coordinator.telemetry.hub import migration_of
from whimbrel import failpoints, protocol
from whimbrel.v1 import common_pb2, events_pb2, host_pb2

log = logging.getLogger(__name__)
T = TypeVar("T")


def wall_clock_us() -> int:
    return time.time_ns() // 1000


# A host's events are acknowledged at most this often (HostSession.acknowledge).
ACK_INTERVAL_S = 0.02


@dataclass
class HostSession:
    """One open hostd stream."""

    host_id: str
    generation: int
    outbox: asyncio.Queue[host_pb2.CoordinatorMessage | None] = field(default_factory=asyncio.Queue)
    # generation -> highest host seq in the log (or staged), to drop re-sent events early.
    stored: dict[int, int] = field(default_factory=dict)

    # The newest acknowledgement not sent yet, and the timer that sends it.
    _ack: host_pb2.Ack | None = None
    _ack_timer: asyncio.TimerHandle | None = None

    def send(self, message: host_pb2.CoordinatorMessage) -> None:
        self.outbox.put_nowait(message)

    def acknowledge(self, ack: host_pb2.Ack) -> None:
        """Acknowledge up to `ack`, at most once per ACK_INTERVAL_S: the commits of a
        switchover come a millisecond apart, and an ack per commit woke both ends each time,
        in the guest's pause. A later ack covers the earlier ones; one never sent (the stream
        ended) only means hostd re-sends events the log already has, which it drops."""
        self._ack = ack
        if self._ack_timer is None:
            loop = asyncio.get_running_loop()
            self._ack_timer = loop.call_later(ACK_INTERVAL_S, self._send_ack)

    def _send_ack(self) -> None:
        self._ack_timer = None
        if self._ack is not None:
            self.send(host_pb2.CoordinatorMessage(ack=self._ack))
            self._ack = None

    def close(self) -> None:
        self.outbox.put_nowait(None)


def replay(store: EventStore, checkpoint_path: Path | None = None) -> World:
    """The world the log describes: from a usable checkpoint plus the events after it, or by
    folding the whole log (fast path for SQLite's raw rows)."""
    world = checkpoint.load(checkpoint_path, store) if checkpoint_path is not None else None
    from_seq = world.last_seq + 1 if world is not None else 1
    world = world or World()
    read_rows = getattr(store, "read_rows", None)
    if read_rows is not None:
        rows = read_rows(from_seq=from_seq, columns=codec.REPLAY_COLUMNS)
        facts: Iterable[Fact] = codec.decode_for_replay(rows)
    else:
        facts = (
            (e.seq, e.type, e.time_us, e.origin_host, e.payload)
            for e in map(codec.from_stored, store.read(from_seq=from_seq))
        )
    # Replay allocates millions of objects that all live on; the cyclic collector would walk
    # them over and over while they are being built. Nothing here makes garbage cycles.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        fold(world, facts)
    finally:
        if gc_was_enabled:
            gc.enable()
    return world


@dataclass
class _Commit:
    """A transaction queued at the log: what it holds, and its outcome to await."""

    staged: list[tuple[NewEvent, Event]]
    entered: list[str]  # phases entered, for the coordinator.entered-PHASE failpoints
    started: float
    marks: Awaitable[tuple[int, list[Mark]]]


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
        self.telemetry = telemetry or Telemetry()
        # Recovery after a restart: how long to wait for the hosts of open migrations.
        self.host_wait = host_wait
        self.recovered = asyncio.Event()
        self._recovery_started = time.monotonic()
        self._deadline: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Future[Any]] = set()
        self._ticker: asyncio.Task[None] | None = None
        # A checkpoint of the world every `checkpoint_every` events (0: never), written by a
        # forked child so the loop never waits for it; restarts then fold only the tail.
        self.checkpoint_path = checkpoint_path
        self.checkpoint_every = checkpoint_every
        self._checkpointed_seq = 0
        self._checkpointer = 0
        self.checkpoints_written = 0
        # Told each time the start waits for another writer's lock on the log.
        self.waiting_for_lock: Callable[[], None] | None = None
        self.world = World()
        self.sessions: dict[str, HostSession] = {}
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._staged: list[tuple[NewEvent, Event]] = []
        # Commits queued and not yet landed; `_settled` is set whenever there are none.
        self._in_flight = 0
        self._settled = asyncio.Event()
        self._settled.set()
        # Phases entered by staged events (for the coordinator.entered-PHASE failpoints).
        self._entered: list[str] = []
        # Set when this coordinator must stop: a newer one owns the log, or the log failed.
        self.fenced = asyncio.Event()
        self.stop_reason = ""

    # --- start --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Replay the log and take it over with a new epoch (before serving anything)."""
        started = time.monotonic()
        self.world = await asyncio.to_thread(replay, self.store, self.checkpoint_path)
        self._checkpointed_seq = self.world.last_seq
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
                    self._stage([self._host_event(host.host_id, gone)])
            self._begin_recovery()
            await self._flush()
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
        async with self._lock:
            self._advance(self.world.open_migrations)
            await self._flush()

    async def close(self) -> None:
        """Stop the clock tick and the recovery timer (the server and the store are the
        caller's)."""
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
            except StoreFailure as err:
                if "locked" not in str(err):
                    raise
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
        self._stage([NewEvent(protocol.COORDINATOR_STREAM, started, self.clock())])
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
        (event,) = self._stage([NewEvent(protocol.COORDINATOR_STREAM, finished, self.clock())])
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
            await self._flush()

    # --- staging and committing ---------------------------------------------------------------

    def _stage(self, new_events: Sequence[NewEvent], cause_seq: int = 0) -> list[Event]:
        """Fold events into the world ahead of their commit. Caller holds the lock.
        `cause_seq`: the event that led to these decisions, recorded in those that carry it."""
        head = self.world.last_seq  # everything folded so far, committed or on its way
        epoch = self.store.epoch
        staged = []
        for i, new in enumerate(new_events, start=1):
            if cause_seq and "cause_seq" in new.payload.DESCRIPTOR.fields_by_name:
                new.payload.cause_seq = cause_seq  # type: ignore[attr-defined]
            event = Event(head + i, new.stream, new.type, epoch, new.time_us, new.payload,
                          new.origin_host, new.origin_generation, new.origin_seq)  # fmt: skip
            concerned = self.world.migrations.get(migration_of(self.world, new.payload))
            phase_before = concerned.phase if concerned is not None else None
            evolve(self.world, event)
            concerned = self.world.migrations.get(migration_of(self.world, new.payload))
            if concerned is not None and concerned.phase != phase_before:
                self._entered.append(concerned.phase.label)
            self.telemetry.staged(self.world, event)
            self._staged.append((new, event))
            staged.append(event)
        return staged

    async def _flush(self) -> list[Event]:
        """Commit everything staged in one transaction, then send its commands; returns once
        nothing is in flight. Caller holds the lock."""
        committed = await self._commit(self._queue_commit())
        await self._settled.wait()
        return committed

    def _queue_commit(self) -> _Commit | None:
        """Queue everything staged as the log's next transaction. Caller holds the lock."""
        staged, self._staged = self._staged, []
        if not staged:
            return None
        entered, self._entered = self._entered, []
        try:
            marks = self.store.submit_marks([codec.to_pending(new) for new, _ in staged])
        except StoreError as err:
            self._failed(err)
            raise
        self._in_flight += 1
        self._settled.clear()
        return _Commit(staged, entered, time.monotonic(), marks)

    async def _commit(self, commit: _Commit | None) -> list[Event]:
        """Wait for a queued transaction, then send its commands. Needs no lock."""
        if commit is None:
            return []
        staged = commit.staged
        try:
            _, marks = await commit.marks
            if [m[0] if m else None for m in marks] != [event.seq for _, event in staged]:
                raise StoreFailure("the log assigned other seqs than were folded")
        except StoreError as err:
            self._failed(err)
            raise
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._settled.set()
        self.telemetry.committed(len(staged), time.monotonic() - commit.started)
        self._maybe_checkpoint()
        failpoints.hit("coordinator.after-commit")
        for phase in commit.entered:
            failpoints.hit(f"coordinator.entered-{phase}")
        if any(self._is_destination_cont(event) for _, event in staged):
            failpoints.hit("coordinator.after-cont-intent")
        for _, event in staged:
            if isinstance(event.payload, events_pb2.CommandIssued):
                self._dispatch(event.payload)
        self._changed.set()
        self._changed = asyncio.Event()
        return [event for _, event in staged]

    def _failed(self, err: StoreError) -> None:
        if isinstance(err, StaleEpoch):
            self._stop(f"a newer coordinator owns the log: {err}")
        else:
            self._stop(f"the log failed, the world is ahead of it: {err}")

    def _maybe_checkpoint(self) -> None:
        """Right after a commit the world is exactly the log up to its head: if enough events
        came since the last checkpoint, a forked child (copy-on-write, so the loop goes on at
        once) writes this world to the checkpoint file and exits."""
        if not self.checkpoint_path or not self.checkpoint_every or self._checkpointer:
            return
        seq, event_hash = self.store.head()
        if seq - self._checkpointed_seq < self.checkpoint_every or self.world.last_seq != seq:
            return
        self._checkpointed_seq = seq
        pid = os.fork()
        if pid == 0:  # the child: write, and leave without running anything of the parent's
            code = 0
            try:
                checkpoint.write(self.checkpoint_path, self.world, seq, event_hash)
            except BaseException:
                code = 1
            os._exit(code)
        self._checkpointer = pid
        loop = asyncio.get_running_loop()

        def reap() -> None:
            _, status = os.waitpid(pid, 0)
            loop.call_soon_threadsafe(self._checkpoint_done, pid, seq, status)

        threading.Thread(target=reap, name="checkpoint-reaper", daemon=True).start()

    def _checkpoint_done(self, pid: int, seq: int, status: int) -> None:
        self._checkpointer = 0
        if os.waitstatus_to_exitcode(status) == 0:
            log.info("checkpoint at seq %d written", seq)
        else:
            log.warning("checkpoint at seq %d failed (child %d: status %d)", seq, pid, status)
        self.checkpoints_written += 1

    def _is_destination_cont(self, event: Event) -> bool:
        p = event.payload
        if (
            not isinstance(p, events_pb2.CommandIssued)
            or p.kind != events_pb2.COMMAND_KIND_RESUME_VM
        ):
            return False
        m = self.world.migrations.get(p.migration_id)
        return m is not None and p.host_id == m.destination

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
            staged = self._stage(decide(self.world, request))
            self._advance_touched(staged)
            await self._flush()
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
                cause = self._stage(decided, cause)[-1].seq

    def _advance_touched(self, events: Iterable[Event]) -> None:
        touched: dict[str, int] = {}  # migration id -> the newest event touching it
        vm_names: dict[str, int] = {}
        for event in events:
            payload = event.payload
            migration_id = getattr(payload, "migration_id", "")
            if migration_id:
                touched[migration_id] = event.seq
            observation = getattr(payload, "observation", None)
            vm_name = getattr(payload, "vm", "") or getattr(observation, "vm", "")
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

    def _reconcile_vms(
        self, names: Iterable[str], causes: Mapping[str, int] | None = None, everything: int = 0
    ) -> None:
        """VMs outside migrations: stray copies destroyed, the lost-VM policy applied."""
        for name in sorted(set(names)):
            cause = (causes or {}).get(name) or everything
            while decided := decide(self.world, I.ReconcileVm(name, self.clock())):
                cause = self._stage(decided, cause)[-1].seq

    # --- hosts --------------------------------------------------------------------------------

    async def host_connected(self, hello: host_pb2.Hello) -> tuple[HostSession, int]:
        return await self._whole(self._host_connected(hello))

    async def _host_connected(self, hello: host_pb2.Hello) -> tuple[HostSession, int]:
        """Register a hostd stream; returns the session and the last stored host seq."""
        from coordinator.core.validate import check_name

        check_name("host", hello.host_id)
        async with self._lock:
            # The log's high-water mark for this host must include what is in flight.
            await self._settled.wait()
            refusal = host_stream.check_hello(self.world, hello)
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
            staged = self._stage(new)
            if not self.recovered.is_set() and not self.world.awaited_hosts:
                self._finish_recovery([])
            self._advance_touched(staged)
            self._advance(self.world.open_migrations, everything=staged[0].seq)
            await self._flush()
            welcome = host_pb2.Welcome(epoch=self.world.epoch, last_stored_seq=last)
            session.send(host_pb2.CoordinatorMessage(welcome=welcome))
            for command in self._outstanding(hello.host_id):
                self._send(session, command)
            return session, last

    async def queue_host_events(
        self, session: HostSession, events: Sequence[host_pb2.HostEvent]
    ) -> asyncio.Future[None]:
        """Fold a host's observations and what they lead to and queue their commit; returns
        a future that resolves once they are committed, their commands sent and the host's
        events acknowledged. The next batch may be folded meanwhile."""
        return await self._whole(self._host_events(session, events))

    async def _host_events(
        self, session: HostSession, events: Sequence[host_pb2.HostEvent]
    ) -> asyncio.Future[None]:
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
            refusal = host_stream.check_batch(self.world, session.host_id, [p for *_, p in fresh])
            if refusal is not None:
                log.warning("refused: %s", refusal)
                raise host_stream.StreamRefused(refusal)
            session.stored.update(stored)
            new = [
                NewEvent(
                    self._stream_for(getattr(payload, "vm", "")),
                    payload,
                    host_event.time_us or self.clock(),
                    session.host_id,
                    generation,
                    host_event.seq,
                )
                for host_event, generation, payload in fresh
                if not host_stream.moot(self.world, payload)
            ]
            if len(new) < len(fresh):
                log.info("host %s: %d events about what the world no longer tracks dropped",
                         session.host_id, len(fresh) - len(new))  # fmt: skip
            staged = self._stage(new)
            self._advance_touched(staged)
            commit = self._queue_commit()
        finished = asyncio.ensure_future(self._acknowledge(session, events, commit))
        self._background.add(finished)
        finished.add_done_callback(self._background.discard)
        # A caller cancelled while it waits (its stream ended) must not cancel the unit's end:
        # the commit's commands would never be sent.
        return asyncio.shield(finished)

    async def _acknowledge(
        self, session: HostSession, events: Sequence[host_pb2.HostEvent], commit: _Commit | None
    ) -> None:
        await self._commit(commit)
        if events:
            last = events[-1]
            generation = min(last.generation or session.generation, session.generation)
            session.acknowledge(host_pb2.Ack(generation=generation, seq=last.seq))

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
            (event,) = self._stage([self._host_event(session.host_id, payload)])
            self._advance(self.world.open_migrations, everything=event.seq)
            await self._flush()

    def _stream_for(self, vm_name: str) -> str:
        vm = self.world.vms.get(vm_name)
        if vm is not None and vm.migration_id:
            return protocol.migration_stream(vm.migration_id)
        return protocol.vm_stream(vm_name) if vm_name else protocol.COORDINATOR_STREAM

    def _outstanding(self, host_id: str) -> list[Command]:
        """Commands for `host_id` that were issued and never answered (the outbox)."""
        commands: list[Command] = []
        for migration_id in self.world.open_migrations:
            m = self.world.migrations[migration_id]
            commands += [c for c in m.commands.values() if c.host == host_id]
        for vm in self.world.vms.values():
            commands += [c for c in vm.commands.values() if c.host == host_id]
        return [c for c in commands if c.state == CommandState.ISSUED]

    def _dispatch(self, issued: events_pb2.CommandIssued) -> None:
        session = self.sessions.get(issued.host_id)
        if session is None:
            return  # stays in the outbox until the host connects
        owner = self.world.migrations.get(issued.migration_id) if issued.migration_id else None
        vm = self.world.vms.get(issued.vm)
        commands = owner.commands if owner is not None else (vm.commands if vm else {})
        command = commands.get(issued.command_id)
        if command is not None:
            self._send(session, command)

    def _send(self, session: HostSession, command: Command) -> None:
        session.send(
            host_pb2.CoordinatorMessage(
                command=host_pb2.Command(
                    command_id=command.command_id,
                    migration_id=command.migration_id,
                    attempt=command.attempt,
                    epoch=self.world.epoch,
                    vm=command.vm,
                    kind=events_pb2.CommandKind.ValueType(command.kind),
                    args=command.args,
                    trace_context=self.telemetry.command_context(command),
                )
            )
        )

    # --- reading and watching -----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[World]:
        """The world as committed, without taking the lock. Staged events are folded before
        their commit completes, so a read must wait until no commit is in flight; then the
        world is exactly the log, and stays so until the next await. The caller must not await
        while it uses the world (the next unit may fold into it meanwhile). Readers never take
        the lock: a flood of them (a watcher wakes after every commit) must not queue ahead of
        the next host events in the middle of a handoff."""
        while self._in_flight:
            await self._settled.wait()
        yield self.world

    async def wait_for_change(self, max_wait: float | None = None) -> None:
        """Return after the next committed change, or after `max_wait` seconds."""
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), max_wait)
