"""Real coordinators on port 0 over real SQLite files, and hostd-like stream clients.

Every channel is mutual TLS, with a PKI made once per test session: the fixture's `channel` is
the user `admin` (role admin); `channel_as(kind, name)` opens one with another principal's
certificate (users `operator` and `viewer` have those roles, `nobody` none). A SimHostd given
the fixture's `channel` opens its stream with its own host's certificate, as a hostd does."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from coordinator.app import Coordinator
from coordinator.authz import Role, Roles
from coordinator.limits import Limits
from coordinator.log import SqliteEventStore
from coordinator.main import start_server
from tools.sim import SimHosts
from whimbrel import pki, tls
from whimbrel.v1 import common_pb2, events_pb2, host_pb2, host_pb2_grpc

ROLES = {"admin": Role.ADMIN, "operator": Role.OPERATOR, "viewer": Role.VIEWER}


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    pki.ensure(directory, "coordinator")
    return directory


@dataclass
class Running:
    app: Coordinator
    channel: grpc.aio.Channel
    address: str
    pki: Path
    roles: Roles
    _channels: dict[tuple[str, str], grpc.aio.Channel] = field(default_factory=dict)

    def identity(self, kind: str, name: str) -> pki.Issued:
        return pki.ensure(self.pki, kind, name)

    def channel_as(self, kind: str, name: str) -> grpc.aio.Channel:
        """A channel to this coordinator with the certificate of `kind` ("host", "user") `name`."""
        key = (kind, name)
        if key not in self._channels:
            files = self.identity(kind, name).files
            self._channels[key] = tls.aio_channel(self.address, files)
        return self._channels[key]

    def tls_flags(self, user: str = "admin") -> list[str]:
        return self.identity("user", user).flags()

    async def close_channels(self) -> None:
        for channel in self._channels.values():
            await channel.close()


# The Running coordinator of each fixture channel, so a SimHostd can use its host's certificate.
_RUNNING: dict[int, Running] = {}


@pytest.fixture
async def coordinator(tmp_path: Path, pki_dir: Path) -> AsyncIterator[Running]:
    async with serving(tmp_path, pki_dir) as running:
        yield running


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, pki_dir: Path, limits: Limits | None = None
) -> AsyncIterator[Running]:
    """A coordinator like the `coordinator` fixture's (within `limits`), on the log in
    `tmp_path`: a second one on the same directory replays what the first wrote."""
    store = SqliteEventStore(tmp_path / "whimbrel.db")
    app = Coordinator(store)
    await app.start()
    files = pki.ensure(pki_dir, "coordinator").files
    roles = Roles(ROLES)  # the server's own: a test changes roles in place, as a reload does
    server, port, _ = await start_server(app, "127.0.0.1:0", files, roles, limits or Limits())
    address = f"127.0.0.1:{port}"
    channel = tls.aio_channel(address, pki.ensure(pki_dir, "user", "admin").files)
    running = Running(app, channel, address, pki_dir, roles)
    _RUNNING[id(channel)] = running
    try:
        yield running
    finally:
        del _RUNNING[id(channel)]
        await running.close_channels()
        await channel.close()
        await server.stop(grace=None)
        await app.close()
        await asyncio.to_thread(store.close)


# The connected SimHostd of each (simulated world, host id).
_STREAMS: dict[tuple[int, str], SimHostd] = {}


@dataclass
class SimHostd:
    """A host stream client that answers commands with the simulated host model."""

    host_id: str
    channel: grpc.aio.Channel
    hosts: SimHosts
    generation: int = 1
    seq: int = 0
    welcome: host_pb2.Welcome | None = None
    commands: list[host_pb2.Command] = field(default_factory=list)
    acked: int = 0
    acks: list[int] = field(default_factory=list)
    answer: bool = True
    # The QEMUs its hello lists (a restarted coordinator reads a VM left out as gone).
    vms: list[common_pb2.VmObservation] = field(default_factory=list)
    capacity: common_pb2.HostCapacity | None = None
    _up: asyncio.Queue[host_pb2.HostMessage | None] = field(default_factory=asyncio.Queue)
    _task: asyncio.Task[None] | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    error: grpc.aio.AioRpcError | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        _STREAMS[(id(self.hosts), self.host_id)] = self
        running = _RUNNING.get(id(self.channel))
        channel = running.channel_as("host", self.host_id) if running else self.channel
        stub = host_pb2_grpc.HostServiceStub(channel)
        self._up.put_nowait(
            host_pb2.HostMessage(
                hello=host_pb2.Hello(
                    host_id=self.host_id,
                    generation=self.generation,
                    migration_address="127.0.0.1",
                    vms=self.vms,
                    capacity=self.capacity,
                )
            )
        )

        async def up() -> AsyncIterator[host_pb2.HostMessage]:
            while (message := await self._up.get()) is not None:
                yield message

        self._call = stub.Connect(up())
        self._task = asyncio.create_task(self._down())
        await asyncio.wait_for(self.connected.wait(), 10)
        if self.error is not None:
            raise self.error

    async def _down(self) -> None:
        try:
            await self._read()
        except grpc.aio.AioRpcError as err:
            self.error = err
            self.connected.set()

    async def wait_for_change(self, max_wait: float | None = None) -> None:
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), max_wait)

    async def _read(self) -> None:
        async for message in self._call:
            self._changed.set()
            self._changed = asyncio.Event()
            kind = message.WhichOneof("kind")
            if kind == "welcome":
                self.welcome = message.welcome
                self.connected.set()
            elif kind == "ack":
                self.acked = message.ack.seq
                self.acks.append(message.ack.seq)
            elif kind == "command":
                self.commands.append(message.command)
                if self.answer:
                    self.execute(message.command)

    def execute(self, command: host_pb2.Command) -> None:
        issued = events_pb2.CommandIssued(
            command_id=command.command_id,
            migration_id=command.migration_id,
            attempt=command.attempt,
            host_id=self.host_id,
            vm=command.vm,
            kind=command.kind,
            args=command.args,
        )
        for observation in self.hosts.answer(issued):
            # Each observation goes up the stream of the host that made it (a source's
            # command can make its destination's QEMU report, as over a real migration link).
            _STREAMS.get((id(self.hosts), observation.host), self).report(observation.payload)

    def _event(self, payload: object) -> host_pb2.HostEvent:
        from whimbrel.protocol import PAYLOAD_FIELDS

        self.seq += 1
        wrapped = events_pb2.EventPayload()
        field_name = type(payload).DESCRIPTOR.name  # type: ignore[attr-defined]
        getattr(wrapped, PAYLOAD_FIELDS[field_name]).CopyFrom(payload)
        return host_pb2.HostEvent(seq=self.seq, payload=wrapped)

    def report(self, payload: object) -> None:
        self._up.put_nowait(host_pb2.HostMessage(event=self._event(payload)))

    def report_together(self, *payloads: object) -> None:
        """Several observations in one message, as hostd sends what it recorded together."""
        events = [self._event(p) for p in payloads]
        self._up.put_nowait(host_pb2.HostMessage(events=host_pb2.HostEvents(events=events)))

    async def stop(self) -> None:
        if _STREAMS.get((id(self.hosts), self.host_id)) is self:
            del _STREAMS[(id(self.hosts), self.host_id)]
        self._up.put_nowait(None)
        if self._task is not None:
            with contextlib.suppress(grpc.aio.AioRpcError, TimeoutError):
                await asyncio.wait_for(self._task, 5)


@pytest.fixture
def sim_hosts() -> SimHosts:
    return SimHosts()


SPEC = common_pb2.VmSpec(name="vm-1", memory_mib=128, vcpus=1)


async def wait_until(predicate: Callable[[], bool], *sources: Any, limit: float = 10.0) -> None:
    """Wait, woken by each source's change notification, until `predicate()` holds."""
    async with asyncio.timeout(limit):
        while not predicate():
            waits = [asyncio.ensure_future(src.wait_for_change(1.0)) for src in sources]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
