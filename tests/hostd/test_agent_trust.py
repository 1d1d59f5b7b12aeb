"""hostd opens its stream only to a server presenting the coordinator's certificate: a server
with a valid certificate of the same CA for the same address, but naming a host, never sees a
Hello (and so can send no command)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from hostd.agent import Agent
from hostd.drivers.network import NullNetworkDriver
from whimbrel import pki, tls
from whimbrel.v1 import host_pb2, host_pb2_grpc


class RecordingHostService(host_pb2_grpc.HostServiceServicer):
    def __init__(self) -> None:
        self.hellos: list[host_pb2.Hello] = []

    async def Connect(
        self, request_iterator: AsyncIterator[host_pb2.HostMessage], context: Any
    ) -> AsyncIterator[host_pb2.CoordinatorMessage]:
        first = await anext(aiter(request_iterator))
        self.hellos.append(first.hello)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "recorded")
        yield host_pb2.CoordinatorMessage()  # unreachable: makes this a stream handler


async def serve_as(issued: pki.Issued) -> tuple[grpc.aio.Server, str, RecordingHostService]:
    server = grpc.aio.server()
    service = RecordingHostService()
    host_pb2_grpc.add_HostServiceServicer_to_server(service, server)
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(issued.files))
    await server.start()
    return server, f"127.0.0.1:{port}", service


async def run_agent_for(tmp_path: Path, address: str, seconds: float) -> None:
    client = pki.ensure(tmp_path / "pki", "host", "host-a").files
    agent = Agent("host-a", address, tmp_path / "state", tmp_path / "locks", "127.0.0.1",
                  NullNetworkDriver(), tls=client)  # fmt: skip
    runner = asyncio.create_task(agent.run())
    await asyncio.sleep(seconds)
    agent.stopping.set()
    runner.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runner
    await agent.close()


async def test_hostd_says_hello_only_to_the_coordinator(tmp_path: Path) -> None:
    """An impostor server (host certificate with the coordinator's address) gets no Hello over
    several retries; the real coordinator's certificate gets host-a's Hello."""
    directory = tmp_path / "pki"
    pki.ensure(directory, "coordinator")
    impostor = pki._issue(directory, "impostor", tls.host_principal("host-b"),
                          ips=("127.0.0.1",), server=True)  # fmt: skip
    server, address, service = await serve_as(impostor)
    try:
        await run_agent_for(tmp_path, address, 1.0)
        assert service.hellos == []
    finally:
        await server.stop(None)
    server, address, service = await serve_as(pki.ensure(directory, "coordinator"))
    try:
        await run_agent_for(tmp_path, address, 1.0)
        assert service.hellos and service.hellos[0].host_id == "host-a"
    finally:
        await server.stop(None)
