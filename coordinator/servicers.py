"""gRPC servicers: convert in, call the application, convert out, map errors to status codes.

This module alone chooses status codes:
    InvalidRequest -> INVALID_ARGUMENT     NotFound -> NOT_FOUND
    AlreadyExists -> ALREADY_EXISTS        IllegalTransition -> FAILED_PRECONDITION
    HostUnavailable -> UNAVAILABLE         StaleEpoch / StoreFailure -> UNAVAILABLE
    StreamRefused -> PERMISSION_DENIED (a host sent what it may not: the stream ends)
    a host message that is no valid message -> INVALID_ARGUMENT (the stream ends)
gRPC itself answers RESOURCE_EXHAUSTED beyond the server's limits (`coordinator.limits`).

Reads and watches are served from `coordinator.views`, never under the application's lock, and
wait at the read gate (`coordinator.read_gate`) while a guest is in its switchover.

Who may call what is decided before a servicer runs (`coordinator.authz`); here requests only
carry the caller's principal into the log, and a host stream's Hello must name the host of the
caller's certificate (PERMISSION_DENIED otherwise, before anything is appended).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from coordinator import convert
from coordinator.app import Coordinator
from coordinator.core import (
    AlreadyExists,
    CoreError,
    HostUnavailable,
    IllegalTransition,
    InvalidRequest,
    NotFound,
    Phase,
    policies,
    scheduling,
)
from coordinator.core import inputs as I
from coordinator.core.validate import check_migration_id, check_name
from coordinator.host_inbox import HostInbox
from coordinator.host_stream import StreamRefused
from coordinator.limits import Limits
from coordinator.log import StoredEvent, StoreError, verify_chain
from coordinator.malformed import Undecodable
from coordinator.paging import PAGE_BYTES, page
from coordinator.views import Views
from coordinator.watch_slots import TooManyWatches, WatchSlots
from whimbrel import protocol
from whimbrel.tls import host_principal, peer_principal
from whimbrel.v1 import (
    common_pb2,
    eventlog_pb2,
    eventlog_pb2_grpc,
    events_pb2,
    host_pb2,
    host_pb2_grpc,
    migration_pb2,
    migration_pb2_grpc,
    vm_pb2,
    vm_pb2_grpc,
)
from whimbrel.validate import shown

log = logging.getLogger(__name__)
EMPTY_POLICY = events_pb2.MigrationPolicy()
T = TypeVar("T")
# WatchMigration sends at most one update per this many seconds.
WATCH_INTERVAL_S = 0.05
# The largest seq a log can hold: a signed 64-bit integer.
MAX_SEQ = 2**63 - 1

_STATUS: list[tuple[type[Exception], grpc.StatusCode]] = [
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (IllegalTransition, grpc.StatusCode.FAILED_PRECONDITION),
    (HostUnavailable, grpc.StatusCode.UNAVAILABLE),
    (StoreError, grpc.StatusCode.UNAVAILABLE),
    (StreamRefused, grpc.StatusCode.PERMISSION_DENIED),
]


def status_for(err: Exception) -> grpc.StatusCode:
    for kind, code in _STATUS:
        if isinstance(err, kind):
            return code
    return grpc.StatusCode.INTERNAL


def principal(context: Any) -> str:
    """The caller's principal for the log ("" when served without TLS)."""
    return peer_principal(context) or ""


def _default_watches() -> WatchSlots:
    limits = Limits()
    return WatchSlots(limits.max_watch_streams, limits.max_watch_streams_per_caller)


async def _hold_watch_slot(held: contextlib.ExitStack, watches: WatchSlots, context: Any) -> None:
    """A watch slot of the caller's, held until `held` closes (the stream ends, however)."""
    try:
        held.enter_context(watches.taken(principal(context)))
    except TooManyWatches as err:
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED, str(err),
            trailing_metadata=protocol.ANSWERED_BY_COORDINATOR,
        )  # fmt: skip


def mapped(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Turn core and store errors into gRPC statuses with their message."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> T:
        try:
            return await fn(self, request, context)
        except (CoreError, StoreError) as err:
            await context.abort(
                status_for(err), str(err), trailing_metadata=protocol.ANSWERED_BY_COORDINATOR
            )
            raise  # unreachable: abort raises

    return wrapper


class MigrationServicer(migration_pb2_grpc.MigrationServiceServicer):
    def __init__(
        self,
        app: Coordinator,
        views: Views | None = None,
        watches: WatchSlots | None = None,
        page_bytes: int = PAGE_BYTES,
    ) -> None:
        self.app = app
        self.views = views or Views(app)
        self.watches = watches or _default_watches()
        self.page_bytes = page_bytes

    async def _get(self, migration_id: str) -> migration_pb2.Migration:
        check_migration_id(migration_id)
        return await self.views.migration(migration_id)

    @mapped
    async def StartMigration(
        self, request: migration_pb2.StartMigrationRequest, context: Any
    ) -> migration_pb2.Migration:
        migration_id = request.migration_id or f"m-{uuid.uuid4().hex[:12]}"
        await self.app.request(
            I.StartMigration(
                migration_id,
                request.vm,
                request.destination,
                request.mode,
                request.policy,
                self.app.clock(),
                principal(context),
                request.policy_name,
            )
        )
        # A caller that sent W3C trace context in the gRPC metadata (any OpenTelemetry-
        # instrumented client does) gets its span linked from the migration's trace (its root
        # span leaves when the migration ends). Only once the request was accepted: a refused
        # one changes nothing, not even the link of the migration it named.
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        self.app.telemetry.requested_by(migration_id, metadata)
        return await self._get(migration_id)

    @mapped
    async def GetMigration(
        self, request: migration_pb2.GetMigrationRequest, context: Any
    ) -> migration_pb2.Migration:
        return await self._get(request.migration_id)

    @mapped
    async def ListMigrations(
        self, request: migration_pb2.ListMigrationsRequest, context: Any
    ) -> migration_pb2.ListMigrationsResponse:
        if request.vm:
            check_name("VM", request.vm)
        if not request.page_size and not request.page_token:
            whole = await self.views.migration_list(request.vm, request.open_only)
            if whole.ByteSize() <= self.page_bytes:
                return whole

        def kept(m: migration_pb2.Migration) -> bool:
            terminal = Phase(m.phase).terminal
            return (not request.vm or m.vm == request.vm) and not (request.open_only and terminal)

        migrations, token = page(
            await self.views.migrations(), lambda m: m.migration_id, kept,
            request.page_size, request.page_token, self.page_bytes,
        )  # fmt: skip
        return migration_pb2.ListMigrationsResponse(migrations=migrations, next_page_token=token)

    async def WatchMigration(
        self, request: migration_pb2.WatchMigrationRequest, context: Any
    ) -> AsyncIterator[migration_pb2.Migration]:
        try:
            current = await self._get(request.migration_id)
        except CoreError as err:
            await context.abort(status_for(err), str(err))
        with contextlib.ExitStack() as held:
            await _hold_watch_slot(held, self.watches, context)
            gate = self.app.read_gate
            last = None
            loop = asyncio.get_running_loop()
            sent_at = -WATCH_INTERVAL_S
            while True:
                # Taken before the read: a change committed while the update is sent still
                # wakes this watcher.
                change = gate.next_change()
                current = await self._get(request.migration_id)
                if current != last:
                    yield current
                    last, sent_at = current, loop.time()
                if Phase(current.phase).terminal:
                    return
                # Woken by changes only while the read gate is open: the commits of a
                # switchover wake no watcher, and its end wakes each once, for the latest state.
                await gate.wait(change, max_wait=5)
                # And at most one update per interval otherwise: a busy migration's commits
                # come milliseconds apart. The latest state is sent; the end is never skipped.
                await asyncio.sleep(max(0.0, sent_at + WATCH_INTERVAL_S - loop.time()))

    @mapped
    async def AbortMigration(
        self, request: migration_pb2.AbortMigrationRequest, context: Any
    ) -> migration_pb2.Migration:
        await self.app.request(
            I.AbortMigration(
                request.migration_id, request.reason, self.app.clock(), principal(context)
            )
        )
        return await self._get(request.migration_id)

    @mapped
    async def SwitchToPostcopy(
        self, request: migration_pb2.SwitchToPostcopyRequest, context: Any
    ) -> migration_pb2.Migration:
        await self.app.request(
            I.SwitchToPostcopy(request.migration_id, self.app.clock(), principal(context))
        )
        return await self._get(request.migration_id)

    @mapped
    async def SetMigrationParameters(
        self, request: migration_pb2.SetMigrationParametersRequest, context: Any
    ) -> migration_pb2.Migration:
        await self.app.request(
            I.TuneMigration(
                request.migration_id, request.max_bandwidth, request.max_postcopy_bandwidth,
                request.reason, self.app.clock(), principal(context),
            )
        )  # fmt: skip
        return await self._get(request.migration_id)

    @mapped
    async def CompleteMigration(
        self, request: migration_pb2.CompleteMigrationRequest, context: Any
    ) -> migration_pb2.Migration:
        await self.app.request(
            I.CompleteMigration(
                request.migration_id, request.reason, self.app.clock(), principal(context)
            )
        )
        return await self._get(request.migration_id)

    @mapped
    async def DefinePolicy(
        self, request: migration_pb2.DefinePolicyRequest, context: Any
    ) -> migration_pb2.NamedPolicy:
        await self.app.request(
            I.DefinePolicy(
                request.name, request.policy, request.reason, self.app.clock(), principal(context)
            )
        )
        listed = await self.ListPolicies(migration_pb2.ListPoliciesRequest(), context)
        return next(p for p in listed.policies if p.name == request.name)

    @mapped
    async def ListPolicies(
        self, request: migration_pb2.ListPoliciesRequest, context: Any
    ) -> migration_pb2.ListPoliciesResponse:
        async with self.app.reading() as world:
            named = [
                migration_pb2.NamedPolicy(
                    name=name, policy=policy, effective=policies.resolve(world, name, EMPTY_POLICY)
                )
                for name, policy in sorted(world.policies.items())
            ]
            return migration_pb2.ListPoliciesResponse(
                policies=named, default_name=world.default_policy
            )

    @mapped
    async def SetDefaultPolicy(
        self, request: migration_pb2.SetDefaultPolicyRequest, context: Any
    ) -> migration_pb2.ListPoliciesResponse:
        await self.app.request(
            I.SetDefaultPolicy(request.name, request.reason, self.app.clock(), principal(context))
        )
        return await self.ListPolicies(migration_pb2.ListPoliciesRequest(), context)

    @mapped
    async def GetMigrationLimits(
        self, request: migration_pb2.GetMigrationLimitsRequest, context: Any
    ) -> common_pb2.MigrationLimits:
        async with self.app.reading() as world:
            return scheduling.limits(world)

    @mapped
    async def SetMigrationLimits(
        self, request: migration_pb2.SetMigrationLimitsRequest, context: Any
    ) -> common_pb2.MigrationLimits:
        await self.app.request(
            I.SetMigrationLimits(
                request.limits, request.reason, self.app.clock(), principal(context)
            )
        )
        async with self.app.reading() as world:
            return scheduling.limits(world)


class VmServicer(vm_pb2_grpc.VmServiceServicer):
    def __init__(
        self, app: Coordinator, views: Views | None = None, page_bytes: int = PAGE_BYTES
    ) -> None:
        self.app = app
        self.views = views or Views(app)
        self.page_bytes = page_bytes

    async def _get(self, name: str) -> vm_pb2.Vm:
        check_name("VM", name)
        return await self.views.vm(name)

    @mapped
    async def DefineVm(self, request: vm_pb2.DefineVmRequest, context: Any) -> vm_pb2.Vm:
        await self.app.request(I.DefineVm(request.spec, self.app.clock(), principal(context)))
        return await self._get(request.spec.name)

    @mapped
    async def StartVm(self, request: vm_pb2.StartVmRequest, context: Any) -> vm_pb2.Vm:
        await self.app.request(
            I.StartVm(request.name, request.host, self.app.clock(), principal(context))
        )
        return await self._get(request.name)

    @mapped
    async def StopVm(self, request: vm_pb2.StopVmRequest, context: Any) -> vm_pb2.Vm:
        await self.app.request(
            I.StopVm(request.name, request.force, self.app.clock(), principal(context))
        )
        return await self._get(request.name)

    @mapped
    async def GetVm(self, request: vm_pb2.GetVmRequest, context: Any) -> vm_pb2.Vm:
        return await self._get(request.name)

    @mapped
    @mapped
    async def ListVms(self, request: vm_pb2.ListVmsRequest, context: Any) -> vm_pb2.ListVmsResponse:
        if not request.page_size and not request.page_token:
            whole = await self.views.vm_list()
            if whole.ByteSize() <= self.page_bytes:
                return whole
        vms, token = page(
            await self.views.vms(), lambda v: v.spec.name, lambda v: True,
            request.page_size, request.page_token, self.page_bytes,
        )  # fmt: skip
        return vm_pb2.ListVmsResponse(vms=vms, next_page_token=token)


class HostServicer(host_pb2_grpc.HostServiceServicer):
    def __init__(
        self, app: Coordinator, views: Views | None = None, queue_events: int = 1024
    ) -> None:
        self.app = app
        self.views = views or Views(app)
        # A host's events read off its stream and not yet folded, at most.
        self.queue_events = queue_events

    async def Connect(
        self, request_iterator: AsyncIterator[host_pb2.HostMessage | Undecodable], context: Any
    ) -> AsyncIterator[host_pb2.CoordinatorMessage]:
        first = await anext(aiter(request_iterator), None)
        if isinstance(first, Undecodable):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the first message must be a Hello; it is no valid message: {first.error}",
            )
            return
        if first is None or first.WhichOneof("kind") != "hello":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first message must be a Hello"
            )
            return
        caller = peer_principal(context)
        if caller is not None and caller != host_principal(first.hello.host_id):
            # Otherwise any host (or a stolen host key) could take another host's commands and
            # lock the real one out with a higher generation.
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{caller} may not connect as host {first.hello.host_id!r}",
            )
            return
        try:
            session, _ = await self.app.host_connected(first.hello)
        except (CoreError, StoreError, StreamRefused) as err:
            await context.abort(status_for(err), str(err))
            return

        received = HostInbox(self.queue_events)
        # Why the coordinator ends the stream: (status, what the host sent that it may not).
        refused: list[tuple[grpc.StatusCode, str]] = []

        async def read_events() -> None:
            try:
                async for message in request_iterator:
                    if isinstance(message, Undecodable):
                        # What was read before it is folded if it was already queued; the
                        # rest the host sends again, as it does whatever was not acknowledged.
                        why = f"host {session.host_id} sent no valid message: {message.error}"
                        log.warning("refused: %s", why)
                        refused.append((grpc.StatusCode.INVALID_ARGUMENT, why))
                        session.close()
                        return
                    kind = message.WhichOneof("kind")
                    if kind == "event":
                        await received.put([message.event])
                    elif kind == "events":
                        await received.put(message.events.events)
            except Exception:
                # A reader gone alone would leave the host connected, its events unread.
                session.close()
                raise
            received.end()

        async def process_events() -> None:
            # Everything that arrived while the previous batch was being folded goes into the
            # next one; a batch is folded as soon as the previous one is queued for commit, not
            # committed (commits land in order).
            committing: list[asyncio.Future[None]] = []
            while (batch := await received.take()) is not None:
                try:
                    committing.append(await self.app.queue_host_events(session, batch))
                except StreamRefused as err:
                    refused.append((grpc.StatusCode.PERMISSION_DENIED, str(err)))
                    break
                # A failed commit ends the stream (the coordinator stops itself).
                while committing and committing[0].done():
                    committing.pop(0).result()
            for commit in committing:
                await commit
            session.close()

        reader = asyncio.create_task(read_events(), name=f"hostd-reader-{session.host_id}")
        processor = asyncio.create_task(process_events(), name=f"hostd-events-{session.host_id}")
        reason = "stream closed"
        try:
            while (message := await session.outbox.get()) is not None:
                yield message
            for task in (reader, processor):
                if task.done() and not task.cancelled() and task.exception() is not None:
                    reason = f"stream failed: {task.exception()}"
            if refused:
                code, why = refused[0]
                reason = f"stream refused: {why}"
                await context.abort(code, why)
        finally:
            reader.cancel()
            processor.cancel()
            # A coordinator fenced by a newer one cannot append the stream's end (the log is
            # the newer one's, which records its own hosts); it is stopping itself already.
            with contextlib.suppress(StoreError):
                await self.app.host_disconnected(session, reason)

    @mapped
    async def ListHosts(
        self, request: host_pb2.ListHostsRequest, context: Any
    ) -> host_pb2.ListHostsResponse:
        return await self.views.host_list()

    async def _host(self, host_id: str) -> host_pb2.Host:
        for host in await self.views.hosts():
            if host.host_id == host_id:
                return host
        raise NotFound("host", host_id)

    @mapped
    async def CordonHost(self, request: host_pb2.CordonHostRequest, context: Any) -> host_pb2.Host:
        cordon = I.CordonHost(
            request.host_id, True, request.reason, self.app.clock(), principal(context)
        )
        await self.app.request(cordon)
        return await self._host(request.host_id)

    @mapped
    async def UncordonHost(
        self, request: host_pb2.UncordonHostRequest, context: Any
    ) -> host_pb2.Host:
        uncordon = I.CordonHost(
            request.host_id, False, request.reason, self.app.clock(), principal(context)
        )
        await self.app.request(uncordon)
        return await self._host(request.host_id)

    @mapped
    async def DrainHost(
        self, request: host_pb2.DrainHostRequest, context: Any
    ) -> host_pb2.DrainHostResponse:
        if request.mode not in common_pb2.MigrationMode.values():
            raise InvalidRequest(f"unknown migration mode {request.mode}")
        drain = I.DrainHost(
            request.host_id, request.mode, request.reason, self.app.clock(), principal(context)
        )
        recorded = await self.app.request(drain)
        plan = next(
            e.payload for e in recorded if isinstance(e.payload, events_pb2.HostDrainStarted)
        )
        return host_pb2.DrainHostResponse(
            host=await self._host(request.host_id),
            migration_ids=plan.migration_ids,
            not_moved=plan.not_moved,
        )


def _anchor(seq: int, head_hash: str) -> bytes:
    """The head a VerifyLog request anchors the log to: none, or a seq with its 32-byte hash
    (64 hex digits). Half an anchor is refused rather than ignored or reported as tampering."""
    if not seq and not head_hash:
        return b""
    if not seq or not head_hash:
        raise InvalidRequest("expect_seq and expect_head_hash anchor the log together: set both")
    if seq > MAX_SEQ:
        raise InvalidRequest(f"expect_seq {seq} is beyond any seq ({MAX_SEQ})")
    try:
        digest = bytes.fromhex(head_hash)
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise InvalidRequest(
            f"expect_head_hash {shown(head_hash)} is not a SHA-256 hash (64 hex digits)"
        )
    return digest


def check_stream(stream: str) -> None:
    """A stream filter names one stream: `coordinator`, `migration/ID`, `host/ID`, `vm/NAME`."""
    if stream in ("", "coordinator"):
        return
    prefix, _, name = stream.partition("/")
    try:
        if prefix == "migration":
            return check_migration_id(name)
        if prefix == "host":
            return check_name("host", name)
        if prefix == "vm":
            return check_name("VM", name)
    except InvalidRequest as err:
        raise InvalidRequest(f"stream {shown(stream)}: {err}") from None
    raise InvalidRequest(
        f"unknown stream {shown(stream)}: coordinator, migration/ID, host/ID or vm/NAME"
    )


class EventLogServicer(eventlog_pb2_grpc.EventLogServiceServicer):
    def __init__(
        self, app: Coordinator, limits: Limits | None = None, watches: WatchSlots | None = None
    ) -> None:
        self.app = app
        self.limits = limits or Limits()
        self.watches = watches or _default_watches()
        # One verification at a time: each reads and hashes the whole log.
        self._verifying = asyncio.Lock()

    def _read_batch(self, from_seq: int, stream: str) -> list[StoredEvent]:
        """The next events from `from_seq`: at most read_batch_events of them and, past the
        first, at most read_batch_bytes of payload, so neither a long log nor large events
        make one read hold much memory."""
        batch: list[StoredEvent] = []
        size = 0
        events = self.app.store.read(
            from_seq=from_seq, stream=stream or None, limit=self.limits.read_batch_events
        )
        for stored in events:
            size += len(stored.payload)
            if batch and size > self.limits.read_batch_bytes:
                break
            batch.append(stored)
        close = getattr(events, "close", None)
        if close is not None:
            close()  # before leaving the thread: it holds a connection to the log
        return batch

    async def ReadEvents(
        self, request: eventlog_pb2.ReadEventsRequest, context: Any
    ) -> AsyncIterator[events_pb2.Event]:
        try:
            check_stream(request.stream)
            if request.from_seq > MAX_SEQ:
                # A uint64 from the wire; the store's seqs are signed 64-bit (SQLite INTEGER),
                # and a larger one would fail inside the read rather than be refused.
                raise InvalidRequest(f"from_seq {request.from_seq} is beyond any seq ({MAX_SEQ})")
        except InvalidRequest as err:
            await context.abort(status_for(err), str(err))
        with contextlib.ExitStack() as held:
            if request.follow:  # a read without it ends with the log
                await _hold_watch_slot(held, self.watches, context)
            gate = self.app.read_gate
            next_seq, sent = max(request.from_seq, 1), 0
            while True:
                change = gate.next_change()  # before the read: a commit after it is not missed
                # Every batch waits while a guest is in its switchover (coordinator.read_gate).
                await gate.opened()
                batch = await asyncio.to_thread(self._read_batch, next_seq, request.stream)
                for stored in batch:
                    next_seq = stored.seq + 1
                    yield convert.event_to_proto(stored)
                    sent += 1
                    if request.limit and sent >= request.limit:
                        return
                if not batch:
                    if not request.follow:
                        return
                    await gate.wait(change, max_wait=1)

    @mapped
    async def VerifyLog(
        self, request: eventlog_pb2.VerifyLogRequest, context: Any
    ) -> eventlog_pb2.VerifyLogResponse:
        expect = _anchor(request.expect_seq, request.expect_head_hash)
        async with self._verifying:
            result = await asyncio.to_thread(
                verify_chain, self.app.store.read(), request.expect_seq, expect
            )
        return eventlog_pb2.VerifyLogResponse(
            ok=result.ok,
            events_checked=result.events_checked,
            head_seq=result.head_seq,
            head_hash=result.head_hash.hex(),
            first_bad_seq=result.first_bad_seq,
            problem=result.problem,
        )
