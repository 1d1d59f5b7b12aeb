"""A unit of work is never cut in half: when the RPC that asked for it is cancelled while its
commit is in flight, the commit and the sends still happen, and the next unit sees a log that
agrees with the world."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence

from coordinator import codec
from coordinator.app import Coordinator
from coordinator.core import inputs as I
from coordinator.log import MemoryEventStore, PendingEvent
from coordinator.log.records import Mark
from whimbrel.v1 import common_pb2


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
