"""hostd's backlog goes up in messages the coordinator accepts, however large its events."""

from __future__ import annotations

import asyncio
from pathlib import Path

from coordinator.limits import Limits
from hostd import agent as agent_module
from hostd.agent import Agent
from hostd.drivers.network import NullNetworkDriver
from whimbrel import protocol
from whimbrel.protocol import wrap
from whimbrel.v1 import events_pb2, host_pb2


def _big_stop(vm: str) -> events_pb2.QmpEventReceived:
    """A STOP whose data is as large as hostd lets one QMP event be."""
    data = '{"pad": "' + "x" * (protocol.MAX_QMP_EVENT_DATA - 12) + '"}'
    assert len(data) <= protocol.MAX_QMP_EVENT_DATA
    return events_pb2.QmpEventReceived(vm=vm, event="STOP", data_json=data)


def _drain(up: asyncio.Queue[host_pb2.HostMessage | None]) -> list[host_pb2.HostMessage]:
    messages = []
    while not up.empty():
        message = up.get_nowait()
        assert message is not None
        messages.append(message)
    return messages


def _events_of(message: host_pb2.HostMessage) -> list[host_pb2.HostEvent]:
    if message.WhichOneof("kind") == "event":
        return [message.event]
    return list(message.events.events)


async def test_a_backlog_of_large_events_goes_up_in_messages_the_coordinator_accepts(
    tmp_path: Path,
) -> None:
    """80 acted-on events of 64 KiB each, recorded while no coordinator listened (about 5 MiB
    in all): re-sent after the welcome, every message stays well under the coordinator's
    receive limit, and every event goes up once, in seq order."""
    agent = Agent("h1", "127.0.0.1:1", tmp_path / "state", tmp_path / "locks", "127.0.0.1",
                  NullNetworkDriver())  # fmt: skip
    try:
        for _ in range(80):
            await agent.emit(_big_stop("evil"), 0)
        up: asyncio.Queue[host_pb2.HostMessage | None] = asyncio.Queue()
        sender = asyncio.create_task(agent._send(up, 0))
        await asyncio.sleep(0)  # it puts the whole backlog before it first waits
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        messages = _drain(up)
        limit = Limits().max_receive_bytes
        assert max(m.ByteSize() for m in messages) <= limit // 2
        sent = [e.seq for m in messages for e in _events_of(m)]
        assert sent == [e.seq for e in agent.pending] and len(sent) == 80
    finally:
        await agent.close()


def test_an_event_larger_than_a_batch_goes_up_alone() -> None:
    """An event beyond the batch's bytes is sent all the same, alone; the small events around
    it still go up together, in order."""
    too_big = "x" * (agent_module.MAX_BATCH_BYTES + 1)
    huge = wrap(events_pb2.QmpEventReceived(vm="vm", event="STOP", data_json=too_big))
    small = wrap(events_pb2.QmpEventReceived(vm="vm", event="RESUME", data_json="{}"))
    events = [
        host_pb2.HostEvent(seq=seq, payload=huge if seq == 3 else small) for seq in range(1, 6)
    ]
    up: asyncio.Queue[host_pb2.HostMessage | None] = asyncio.Queue()
    agent_module._put_batches(up, events)
    assert [[e.seq for e in _events_of(m)] for m in _drain(up)] == [[1, 2], [3], [4, 5]]


def test_many_small_events_are_still_batched_by_count() -> None:
    """Small events go up at most MAX_BATCH to a message, as before."""
    small = wrap(events_pb2.QmpEventReceived(vm="vm", event="RESUME", data_json="{}"))
    count = agent_module.MAX_BATCH + 3
    events = [host_pb2.HostEvent(seq=seq, payload=small) for seq in range(1, count + 1)]
    up: asyncio.Queue[host_pb2.HostMessage | None] = asyncio.Queue()
    agent_module._put_batches(up, events)
    sizes = [len(_events_of(m)) for m in _drain(up)]
    assert sizes == [agent_module.MAX_BATCH, 3]
