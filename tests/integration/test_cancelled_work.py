"""A unit of work is never cut in half: when the RPC that asked for it is cancelled while its
commit is in flight, the commit and the sends still happen, and the next unit sees a log that
agrees with the world."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence

from coordinator import codec
from coordinator.app import Coordinator
from coordinator.core import inputs as I
from coordinator.host_session import HostSession
from coordinator.log import MemoryEventStore, PendingEvent
from coordinator.log.records import Mark
from whimbrel.v1 import common_pb2, events_pb2, host_pb2


class SlowCommits(MemoryEventStore):
    """Commits wait for the test to let them through."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    def submit_marks(self, events: Sequence[PendingEvent]) -> Awaitable[tuple[int, list[Mark]]]:
        self.waiting.set()
        return asyncio.ensure_future(self._after_gate(events))

    async def _after_gate(self, events: Sequence[PendingEvent]) -> tuple[int, list[Mark]]:
        await self.gate.wait()
        return await super().submit_marks(events)


async def host_a_with_vm_1() -> tuple[SlowCommits, Coordinator, HostSession]:
    """A started coordinator with commits let through, VM vm-1 defined, host-a connected."""
    store = SlowCommits()
    store.gate.set()
    app = Coordinator(store)
    await app.start()
    await app.request(I.DefineVm(common_pb2.VmSpec(name="vm-1", memory_mib=64, vcpus=1), 1))
    session, _ = await app.host_connected(host_pb2.Hello(host_id="host-a", generation=1))
    return store, app, session


async def test_a_cancelled_request_still_commits_and_the_next_one_agrees() -> None:
    store = SlowCommits()
    store.gate.set()
    app = Coordinator(store)
    await app.start()
    store.gate.clear()
    store.waiting.clear()
    spec = common_pb2.VmSpec(name="vm-1", memory_mib=64, vcpus=1)
    first = asyncio.create_task(app.request(I.DefineVm(spec, app.clock())))
    await store.waiting.wait()
    first.cancel()  # the client hung up while the commit was in flight
    second = asyncio.create_task(
        app.request(I.DefineVm(common_pb2.VmSpec(name="vm-2", memory_mib=64, vcpus=1), 1))
    )
    await asyncio.sleep(0)
    store.gate.set()
    await second
    assert first.cancelled()
    assert not app.fenced.is_set(), app.stop_reason
    logged = [codec.from_stored(e).payload for e in store.read()]
    assert [p.spec.name for p in logged if type(p).__name__ == "VmDefined"] == ["vm-1", "vm-2"]
    assert set(app.world.vms) == {"vm-1", "vm-2"}
    await app.close()


async def test_a_host_stream_that_ends_mid_commit_still_gets_its_batch_finished() -> None:
    """The servicer cancels a stream's event processing when the stream ends; a batch whose
    commit is in flight still commits, sends what it decided and acknowledges."""
    store, app, session = await host_a_with_vm_1()
    store.gate.clear()
    exited = events_pb2.EventPayload(qemu_exited=events_pb2.QemuExited(vm="vm-1", reason="test"))
    batch = [host_pb2.HostEvent(seq=1, generation=1, time_us=1, payload=exited)]
    finished = await app.queue_host_events(session, batch)
    awaiting = asyncio.Event()

    async def processor() -> None:  # the stream's, waiting for its batch's end
        awaiting.set()
        await finished

    waiting = asyncio.create_task(processor())
    await awaiting.wait()
    waiting.cancel()  # the stream ended while the commit was in flight
    store.gate.set()
    while (message := await asyncio.wait_for(session.outbox.get(), 5)) is not None:
        if message.WhichOneof("kind") == "ack":
            break
    assert message is not None and message.ack.seq == 1
    assert not app.fenced.is_set(), app.stop_reason
    await app.close()


async def test_a_host_batch_cancelled_while_it_waits_for_the_lock_leaves_nothing() -> None:
    """A stream that ends while its batch waits for the coordinator's lock has had nothing of
    the batch folded or logged; the host sends the same events again, and they are taken."""
    store, app, session = await host_a_with_vm_1()
    exited = events_pb2.EventPayload(qemu_exited=events_pb2.QemuExited(vm="vm-1", reason="test"))
    batch = [host_pb2.HostEvent(seq=1, generation=1, time_us=1, payload=exited)]
    head = store.head()[0]
    async with app._lock:  # a unit of work holds it
        waiting = asyncio.create_task(app.queue_host_events(session, batch))
        await asyncio.sleep(0)
        waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert waiting.cancelled()
    assert store.head()[0] == head and app.world.last_seq == head
    assert 1 not in session.stored.values()
    await (await app.queue_host_events(session, batch))
    logged = [codec.from_stored(e) for e in store.read()]
    assert [e.origin_seq for e in logged if e.type == "QemuExited"] == [1]
    assert not app.fenced.is_set(), app.stop_reason
    await app.close()


async def test_a_batch_with_nothing_to_commit_is_not_acknowledged_ahead_of_the_one_before() -> None:
    """hostd forgets every event an ack covers. A batch that adds nothing to the log (its
    events already held, or about what the world no longer tracks) is acknowledged only once
    the batches before it are durable: acknowledged first, a crash before their commit would
    lose them."""
    store, app, session = await host_a_with_vm_1()
    store.gate.clear()  # the first batch's commit stays in flight
    exited = events_pb2.EventPayload(qemu_exited=events_pb2.QemuExited(vm="vm-1", reason="test"))
    first = await app.queue_host_events(
        session, [host_pb2.HostEvent(seq=1, generation=1, time_us=1, payload=exited)]
    )
    unknown = events_pb2.EventPayload(qemu_exited=events_pb2.QemuExited(vm="gone", reason="x"))
    second = await app.queue_host_events(
        session, [host_pb2.HostEvent(seq=2, generation=1, time_us=1, payload=unknown)]
    )
    for _ in range(20):  # on the parent, the second batch was acknowledged within a few turns
        await asyncio.sleep(0)
    assert not first.done() and not second.done()
    assert session._ack is None
    store.gate.set()
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert session._ack is not None and session._ack.seq == 2
    logged = [codec.from_stored(e) for e in store.read()]
    assert [e.origin_seq for e in logged if e.type == "QemuExited"] == [1]
    await app.close()
