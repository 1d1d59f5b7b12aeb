"""Watch streams (events --follow, migration watch) have room of their own: one caller holding
many cannot take the room hosts and operators need (a review held every one of the server's
1024 slots with a viewer's follow streams, and hosts could not connect)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from coordinator.limits import Limits
from tests.integration.conftest import Running, SimHostd, serving
from tools.sim import SimHosts
from whimbrel.v1 import eventlog_pb2, eventlog_pb2_grpc, host_pb2, host_pb2_grpc

LIMITS = Limits(max_watch_streams=3, max_watch_streams_per_caller=2)


class Follower:
    """A ReadEvents stream with follow, open until closed, as `user`."""

    def __init__(self, running: Running, user: str) -> None:
        stub = eventlog_pb2_grpc.EventLogServiceStub(running.channel_as("user", user))
        self.call = stub.ReadEvents(eventlog_pb2.ReadEventsRequest(from_seq=1, follow=True))

    async def opened(self) -> None:
        """Once the coordinator served it: the log's first event came."""
        await asyncio.wait_for(self.call.read(), 10)

    async def refusal(self) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(self.call.read(), 10)
        return refused.value

    def close(self) -> None:
        self.call.cancel()


async def test_one_caller_cannot_hold_every_watch_and_no_watcher_holds_out_a_host(
    tmp_path: Path, pki_dir: Path
) -> None:
    async with serving(tmp_path, pki_dir, LIMITS) as running:
        viewer = [Follower(running, "viewer") for _ in range(2)]
        for follower in viewer:
            await follower.opened()
        third = Follower(running, "viewer")
        refused = await third.refusal()
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "spiffe://whimbrel/user/viewer already has 2 watch streams open" in str(
            refused.details()
        )
        admin = Follower(running, "admin")
        await admin.opened()
        over = await Follower(running, "operator").refusal()
        assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "3 watch streams are open (at most 3" in str(over.details())
        # Everything else keeps its room: a host connects, an operator's call is served.
        host = SimHostd("host-a", running.channel, SimHosts())
        await host.start()
        hosts = host_pb2_grpc.HostServiceStub(running.channel_as("user", "operator"))
        listed = await hosts.ListHosts(host_pb2.ListHostsRequest())
        assert [h.host_id for h in listed.hosts] == ["host-a"]
        # A closed watch gives its room back.
        viewer[0].close()
        again = Follower(running, "viewer")
        await asyncio.wait_for(_until_opened(again, running), 10)
        for follower in (viewer[1], admin, again):
            follower.close()
        await host.stop()


async def _until_opened(follower: Follower, running: Running) -> None:
    """The slot of a cancelled stream is given back once the server has seen the cancel: until
    then a new stream may still be refused, so it is tried again."""
    while True:
        try:
            await follower.opened()
            return
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            follower = Follower(running, "viewer")
            await asyncio.sleep(0.05)
