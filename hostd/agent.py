"""The hostd agent: the stream to the coordinator, and commands executed at most once.

On every (re)connect hostd says hello with its generation, the highest epoch it has stored,
and a live snapshot of each VM; after the welcome it re-sends every observation the coordinator
has not acknowledged. A command from an epoch older than the highest seen is refused without
acting; a newer epoch is stored durably before the command acts. A command id runs at most once:
a repeat gets the stored result, and one interrupted by a hostd restart is reported failed,
never re-run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from hostd import qemu, tracing
from hostd.drivers.lease import FileLeaseDriver
from hostd.drivers.network import NetworkDriver
from hostd.errors import CommandRejected, HostdError, QmpError, sendable
from hostd.executor import Executor
from hostd.guard import Guard
from hostd.store import HostStore
from hostd.vm import VmRuntime
from whimbrel import failpoints, validate
from whimbrel.protocol import VERSION, kind_label, wrap
from whimbrel.tls import TlsError, TlsFiles, aio_channel, check_server_principal
from whimbrel.v1 import common_pb2, events_pb2, host_pb2, host_pb2_grpc

log = logging.getLogger("whimbrel.hostd")
# HTTP/2 pings: a coordinator that stops answering (hung, SIGSTOPped, its host gone) is noticed
# within about three seconds, even while the stream is idle, and the next address is tried.
KEEPALIVE = [
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Otherwise gRPC spaces pings on an idle connection by minutes.
    ("grpc.http2.min_time_between_pings_ms", 1000),
    ("grpc.http2.min_ping_interval_without_data_ms", 1000),
    ("grpc.http2.ping_timeout_ms", 2000),
]
# Reconnect backoff. The cap keeps the gap between attempts (1.25 s at most, jitter included)
# well inside a restarted coordinator's --host-wait, after which a host that did not say hello
# is missing and its migrations follow the recovery table: a longer gap made healthy hosts
# "missing" after a few seconds' outage. An attempt at a coordinator that is down costs a
# refused connection.
BACKOFF_FIRST, BACKOFF_MAX, BACKOFF_JITTER = 0.1, 1.0, 0.25


def reconnect_wait(delay: float) -> float:
    """The wait before the next attempt: `delay` with jitter, so hosts do not reconnect in
    lockstep."""
    return delay * random.uniform(1 - BACKOFF_JITTER, 1 + BACKOFF_JITTER)


def now_us() -> int:
    return time.time_ns() // 1000


def failed(c: host_pb2.Command, error: str, **fields: Any) -> events_pb2.EventPayload:
    """The CommandFailed answer to `c`."""
    return wrap(
        events_pb2.CommandFailed(
            command_id=c.command_id,
            attempt=c.attempt,
            kind=c.kind,
            vm=c.vm,
            error=sendable(error),
            **fields,
        )
    )


# Observations per message, and their bytes: a backlog after an outage goes up in messages far
# below the coordinator's receive limit (4 MiB by default), though one QMP event may carry
# 64 KiB of QEMU's data. A larger message is refused, and re-sent, on every reconnect.
MAX_BATCH = 256
MAX_BATCH_BYTES = 1 << 20


def _batches(events: list[host_pb2.HostEvent]) -> Iterator[list[host_pb2.HostEvent]]:
    """`events` in order, cut into runs of at most MAX_BATCH events and MAX_BATCH_BYTES (an
    event larger than that alone is a run of its own: it is sent all the same)."""
    batch: list[host_pb2.HostEvent] = []
    size = 0
    for event in events:
        event_size = event.ByteSize()
        if batch and (len(batch) == MAX_BATCH or size + event_size > MAX_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(event)
        size += event_size
    if batch:
        yield batch


def _vm_name(name: str) -> bool:
    try:
        validate.check_name("VM", name)
    except validate.Invalid:
        return False
    return True


def _put_batches(
    up: asyncio.Queue[host_pb2.HostMessage | None], events: list[host_pb2.HostEvent]
) -> None:
    for chunk in _batches(events):
        if len(chunk) == 1:
            up.put_nowait(host_pb2.HostMessage(event=chunk[0]))
        else:
            up.put_nowait(host_pb2.HostMessage(events=host_pb2.HostEvents(events=chunk)))


def _answered(
    result: events_pb2.EventPayload | None,
) -> events_pb2.CommandSucceeded | events_pb2.CommandFailed | None:
    if result is None:
        return None
    kind = result.WhichOneof("kind")
    answer = getattr(result, kind) if kind in ("command_succeeded", "command_failed") else None
    return answer


class Agent:
    def __init__(
        self,
        host_id: str,
        coordinator: str,
        state_dir: Path,
        lockspace: Path,
        migration_address: str,
        network: NetworkDriver,
        migration_port: int = 0,
        migration_advertise: str = "",
        netns: str = "",
        tls: TlsFiles | None = None,
        guard: Guard | None = None,
        qemu_user: str = "",
        capacity: common_pb2.HostCapacity | None = None,
    ) -> None:
        self.host_id = host_id
        # What this host offers its VMs, in every hello (placement reads it; 0: not reported).
        self.capacity = capacity or common_pb2.HostCapacity()
        # With TLS material, the stream is mutual TLS and the coordinator must present
        # spiffe://whimbrel/coordinator: a host's commands come from nobody else.
        self.tls = tls
        # One address, or several (comma-separated) tried in turn: a standby coordinator that
        # takes the log over when the active one hangs or dies.
        self.coordinators = [a.strip() for a in coordinator.split(",") if a.strip()]
        self._current = 0
        self.state_dir = state_dir
        self.migration_address = migration_address
        self.store = HostStore(state_dir / "hostd.db")
        self.executor = Executor(
            host_id, state_dir, migration_address, FileLeaseDriver(lockspace), network, self.emit,
            migration_port=migration_port, migration_advertise=migration_advertise, netns=netns,
            guard=guard or Guard(), qemu_user=qemu_user,
        )  # fmt: skip
        self.pending: list[host_pb2.HostEvent] = self.store.unacknowledged()
        self._new_event = asyncio.Event()
        self._inflight: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.connected = asyncio.Event()
        # Attempts to reach a coordinator that failed since the last session began.
        self._failed_attempts = 0
        self.stopping = asyncio.Event()

    @property
    def generation(self) -> int:
        return self.store.generation

    # --- observations -------------------------------------------------------------------------

    async def emit(self, payload: Message, time_us: int) -> None:
        """Durably record an observation; it is sent now and re-sent until acknowledged."""
        self._record(wrap(payload), time_us)

    async def report_capacity(self, capacity: common_pb2.HostCapacity) -> None:
        """A capacity read again: if it changed, it is reported as any observation is
        (durably, re-sent until acknowledged) and later hellos carry it."""
        if capacity == self.capacity:
            return
        log.info("capacity now %d MiB, %d vCPUs (was %d MiB, %d vCPUs)", capacity.memory_mib,
                 capacity.vcpus, self.capacity.memory_mib, self.capacity.vcpus)  # fmt: skip
        self.capacity = capacity
        await self.emit(events_pb2.HostCapacityChanged(capacity=capacity), 0)

    def _record(self, wrapped: events_pb2.EventPayload, time_us: int) -> None:
        self.pending.append(self.store.record(wrapped, time_us or now_us()))
        self._new_event.set()

    def _acknowledged(self, ack: host_pb2.Ack) -> None:
        self.store.acknowledge(ack.generation, ack.seq)
        self.pending = [
            e
            for e in self.pending
            if (e.generation, e.seq) > (ack.generation, ack.seq) or e.generation != ack.generation
        ]

    # --- VMs found on disk --------------------------------------------------------------------

    async def reattach(self) -> None:
        """Find the QEMU processes of an earlier hostd and watch them again. A VM whose state
        cannot be read or understood is logged and left as it is, unwatched: it keeps no other
        VM from being re-attached, and it is never reported gone (its QEMU may still run)."""
        vms_dir = self.state_dir / "vms"
        for root in sorted(vms_dir.iterdir()) if vms_dir.exists() else []:
            try:
                await self._reattach_vm(root)
            except Exception as err:
                log.error("%s: VM state not understood, left as it is: %r", root, err)
                log.debug("%s: reattach failure", root, exc_info=True)
                if _vm_name(root.name):  # no VM has another name; none could run as one
                    self.executor.unreadable[root.name] = repr(err)

    async def _reattach_vm(self, root: Path) -> None:
        if not (root / "spec.pb").exists():
            return
        runtime = VmRuntime.load(root, self.emit)
        if runtime.name != root.name:
            raise ValueError(f"holds the spec of VM {runtime.name!r}")
        found = qemu.find(runtime.paths)
        if found.runs:
            await self._watch_again(runtime, found.pid)
        else:
            await self._forget_gone(runtime, found.pid)

    async def _watch_again(self, runtime: VmRuntime, pid: int) -> None:
        # Tracked either way, until it is gone: a QEMU whose QMP is unreachable still runs the
        # VM's disks, is reported, and is killed by a destroy.
        self.executor.vms[runtime.name] = runtime
        self.executor.release_network_at_exit(runtime)
        try:
            await runtime.attach(pid)
            log.info("re-attached to QEMU %d of %s", pid, runtime.name)
            runtime.watch_progress()
            if runtime.continue_was_armed:
                # What START_MIGRATION asked for holds across restarts; the source may have
                # stopped in pre-switchover while no hostd watched.
                runtime.arm_continue_at_pre_switchover()
                runtime.maybe_continuing_switchover()
            if runtime.switchover_was_armed:
                # The same; the switch may even have begun while no hostd watched.
                self.executor.arm_release_at_switchover(runtime)
                await runtime.maybe_switching_over()
        except HostdError as err:
            log.error("QEMU %d of %s runs but QMP is unreachable (tracked, reported as such): "
                      "%s", pid, runtime.name, err)  # fmt: skip
            observation = await runtime.snapshot()
            await self.emit(
                events_pb2.VmObserved(observation=observation, reason="qmp-unreachable"), 0
            )

    async def _forget_gone(self, runtime: VmRuntime, pid: int) -> None:
        """A QEMU gone while no hostd watched (QEMU removes its pidfile when it exits by itself,
        e.g. a destination whose incoming migration failed): reported once, and the VM
        forgotten here (its qemu.log stays for forensics)."""
        runtime.paths.identity.unlink(missing_ok=True)
        runtime.paths.pidfile.unlink(missing_ok=True)
        (runtime.paths.root / "spec.pb").unlink()
        await self.emit(
            events_pb2.QemuExited(
                vm=runtime.name, pid=pid, exit_code=-1, reason="found gone after a hostd restart"
            ),
            0,
        )
        # Its networking may still be set up for a VM that now runs elsewhere.
        await self.executor.release_network_of_dead(runtime)

    async def hello(self) -> host_pb2.Hello:
        # Concurrently: each is bounded (SNAPSHOT_LIMIT_S), and the hello waits for them all.
        runtimes = list(self.executor.vms.values())
        snapshots = await asyncio.gather(*(runtime.snapshot() for runtime in runtimes))
        # A VM whose state could not be read may have a QEMU here: said to, never left out (a
        # VM missing from a hello is read as gone, and then started elsewhere).
        snapshots += [
            common_pb2.VmObservation(vm=name, process_alive=True, qmp_reachable=False)
            for name in sorted(self.executor.unreadable)
            if name not in self.executor.vms
        ]
        last_acked = (
            max((e.seq for e in self.pending if e.generation == self.generation), default=0) - 1
        )
        return host_pb2.Hello(
            host_id=self.host_id,
            generation=self.generation,
            highest_epoch_seen=self.store.highest_epoch,
            last_acked_seq=max(last_acked, 0),
            vms=snapshots,
            migration_address=self.migration_address,
            version=VERSION,
            capacity=self.capacity,
        )

    # --- the coordinator stream ---------------------------------------------------------------

    @property
    def coordinator(self) -> str:
        return self.coordinators[self._current]

    async def run(self) -> None:
        await self.reattach()
        delay = BACKOFF_FIRST
        while not self.stopping.is_set():
            try:
                if self.tls is not None:
                    await check_server_principal(self.coordinator, self.tls)
                async with aio_channel(self.coordinator, self.tls, KEEPALIVE) as channel:
                    await self._session(channel)
                delay = BACKOFF_FIRST
            except TlsError as err:
                self._unreachable(str(err))
            except grpc.aio.AioRpcError as err:
                self._unreachable(f"{err.code().name}: {err.details()}")
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("coordinator session failed")
            finally:
                self.connected.clear()
            if self.stopping.is_set():
                break
            self._current = (self._current + 1) % len(self.coordinators)
            wait = reconnect_wait(delay)
            log.debug("reconnecting to %s in %.2fs", self.coordinator, wait)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), wait)
            delay = min(delay * 2, BACKOFF_MAX)

    def _unreachable(self, why: str) -> None:
        """One WARNING per outage, not one per attempt: an operator can act on the first
        (and on the INFO line saying when it ended), while retries every second are noise."""
        self._failed_attempts += 1
        if self._failed_attempts == 1:
            log.warning("coordinator %s: %s; retrying about every second", self.coordinator, why)
        else:
            log.debug("coordinator %s: %s (attempt %d)", self.coordinator, why,
                      self._failed_attempts)  # fmt: skip

    async def _session(self, channel: grpc.aio.Channel) -> None:
        stub = host_pb2_grpc.HostServiceStub(channel)
        up: asyncio.Queue[host_pb2.HostMessage | None] = asyncio.Queue()
        up.put_nowait(host_pb2.HostMessage(hello=await self.hello()))

        async def messages() -> AsyncIterator[host_pb2.HostMessage]:
            while (message := await up.get()) is not None:
                yield message

        call = stub.Connect(messages())
        sender: asyncio.Task[None] | None = None
        try:
            async for message in call:
                kind = message.WhichOneof("kind")
                if kind == "welcome":
                    if message.welcome.epoch < self.store.highest_epoch:
                        log.error(
                            "coordinator epoch %d is older than %d seen: a stale coordinator",
                            message.welcome.epoch,
                            self.store.highest_epoch,
                        )
                        return
                    self.store.raise_epoch(message.welcome.epoch)
                    after = ""
                    if self._failed_attempts:
                        after = f" after {self._failed_attempts} failed attempts"
                    log.info(
                        "connected to %s%s: epoch %d, generation %d",
                        self.coordinator,
                        after,
                        message.welcome.epoch,
                        self.generation,
                    )
                    self._failed_attempts = 0
                    sender = asyncio.create_task(
                        self._send(up, message.welcome.last_stored_seq), name="hostd-sender"
                    )
                    self.connected.set()
                elif kind == "ack":
                    self._acknowledged(message.ack)
                elif kind == "command":
                    self._spawn(self._handle(message.command))
        finally:
            up.put_nowait(None)
            if sender is not None:
                sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                if sender is not None:
                    await sender

    async def _send(self, up: asyncio.Queue[host_pb2.HostMessage | None], last_stored: int) -> None:
        """Send what the log lacks: older generations unacknowledged, ours after `last_stored`.
        What was recorded together goes up in one message, so the coordinator folds it as one
        batch (a destination's lease and the acquire's result: one log transaction, not two in
        a row in the guest's pause)."""
        cursor = (self.generation, last_stored)
        _put_batches(up, [e for e in self.pending if e.generation < self.generation])
        while True:
            self._new_event.clear()
            new = [
                e
                for e in self.pending
                if e.generation == self.generation and (e.generation, e.seq) > cursor
            ]
            if new:
                _put_batches(up, new)
                cursor = (new[-1].generation, new[-1].seq)
            await self._new_event.wait()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- commands -----------------------------------------------------------------------------

    async def _handle(self, c: host_pb2.Command) -> None:
        llog = log.getChild(c.vm)
        if c.epoch < self.store.highest_epoch:
            llog.warning("refusing %s: epoch %d is older than %d", c.command_id, c.epoch,
                         self.store.highest_epoch)  # fmt: skip
            error = f"stale epoch {c.epoch}: this host has seen {self.store.highest_epoch}"
            self._record(failed(c, error, rejected=True), 0)
            return
        self.store.raise_epoch(c.epoch)
        if c.command_id in self._inflight:
            return  # a repeat of a command still running here; its result will come
        prior = self.store.command(c.command_id)
        if prior is not None:
            earlier = _answered(prior.result)
            if earlier is not None and (earlier.kind, earlier.vm) != (c.kind, c.vm):
                # An id is one command forever: another command under it gets no stored result
                # of a command it is not.
                error = (f"command id {c.command_id} was {kind_label(earlier.kind)} of VM "
                         f"{earlier.vm} here: refused")  # fmt: skip
                self._record(failed(c, error, rejected=True), 0)
                return
            interrupted = failed(c, "interrupted by a hostd restart; not executed again")
            self._record(prior.result or interrupted, 0)
            return
        self.store.command_started(c.command_id)
        kind = kind_label(c.kind)
        failpoints.hit("hostd.before-execute")
        failpoints.hit(f"hostd.before-execute.{kind}")
        self._inflight.add(c.command_id)
        started = time.monotonic()
        attributes = {"whimbrel.command.id": c.command_id, "whimbrel.command.kind": kind,
                      "whimbrel.host": self.host_id, "whimbrel.vm": c.vm}  # fmt: skip
        with tracing.command_span(f"hostd {kind}", c.trace_context, attributes) as span:
            try:
                result = await self.executor.run(c)
                failpoints.hit("hostd.after-execute")
                failpoints.hit(f"hostd.after-execute.{kind}")
                succeeded = events_pb2.CommandSucceeded(
                    command_id=c.command_id, attempt=c.attempt, kind=c.kind, vm=c.vm, result=result
                )
                outcome = wrap(succeeded)
                llog.info("%s done in %.1f ms", c.command_id, (time.monotonic() - started) * 1000)
            except HostdError as err:
                error_class = err.error_class if isinstance(err, QmpError) else ""
                rejected = isinstance(err, CommandRejected)
                outcome = failed(c, str(err), qmp_error_class=error_class, rejected=rejected)
                tracing.failed(span, err)
                llog.error("%s failed: %s", c.command_id, err)
                llog.debug("%s failure", c.command_id, exc_info=True)
            except Exception as err:
                outcome = failed(c, f"internal error: {err!r}")
                tracing.failed(span, err)
                llog.exception("%s crashed", c.command_id)
            finally:
                self._inflight.discard(c.command_id)
        self.store.command_done(c.command_id, outcome)
        self._record(outcome, 0)

    async def close(self) -> None:
        self.stopping.set()
        for task in list(self._tasks):
            task.cancel()
        for runtime in list(self.executor.vms.values()):
            await runtime.close()
        self.store.close()
