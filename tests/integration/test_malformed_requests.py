"""Bytes that are no valid request message get INVALID_ARGUMENT and leave no traceback in the
coordinator's log (they got UNKNOWN and an ERROR with a traceback each: any caller could fill
the log); a caller without a role is refused as such first. On a host's stream such a message
ends the stream (it used to kill only the task reading it: the host stayed connected with its
events unread)."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from coordinator import codec
from tests.integration.conftest import Running
from whimbrel.v1 import host_pb2

GET_VM = "/whimbrel.v1.VmService/GetVm"
WATCH = "/whimbrel.v1.MigrationService/WatchMigration"
CONNECT = "/whimbrel.v1.HostService/Connect"
CUT_SHORT = b"\x0a\x05vm"  # field 1, five bytes announced, two sent
NOT_UTF8 = b"\x0a\x02\xff\xfe"  # field 1, a string, two bytes that are no UTF-8


async def _raw_unary(running: Running, user: str, payload: bytes) -> grpc.aio.AioRpcError:
    call = running.channel_as("user", user).unary_unary(GET_VM)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call(payload, timeout=10)
    return refused.value


@pytest.mark.parametrize("payload", [CUT_SHORT, NOT_UTF8])
async def test_undecodable_requests_are_invalid_arguments(
    coordinator: Running, payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        refused = await _raw_unary(coordinator, "admin", payload)
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused
        assert f"a {GET_VM} request that is no valid message" in str(refused.details())
        stream = coordinator.channel_as("user", "admin").unary_stream(WATCH)
        with pytest.raises(grpc.aio.AioRpcError) as watched:
            async for _ in stream(payload, timeout=10):
                pass
        assert watched.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # Without a role, the role decides first.
        nobody = await _raw_unary(coordinator, "nobody", payload)
        assert nobody.code() == grpc.StatusCode.PERMISSION_DENIED
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def _host_stream(running: Running) -> grpc.aio.StreamStreamCall:
    """host-a's stream, with requests sent as the bytes given."""
    connect = running.channel_as("host", "host-a").stream_stream(
        CONNECT,
        request_serializer=None,
        response_deserializer=host_pb2.CoordinatorMessage.FromString,
    )
    return connect(timeout=10)


def _hello(generation: int) -> bytes:
    hello = host_pb2.Hello(
        host_id="host-a", generation=generation, migration_address="127.0.0.1", version="t"
    )
    return host_pb2.HostMessage(hello=hello).SerializeToString()


async def _end(call: grpc.aio.StreamStreamCall) -> grpc.StatusCode:
    """The status the stream ends with, read to its end (a refusal raises on read)."""
    try:
        while await call.read() is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError as err:
        return err.code()
    return await call.code()


@pytest.mark.parametrize("payload", [CUT_SHORT, NOT_UTF8])
async def test_an_undecodable_host_message_ends_the_stream(
    coordinator: Running, payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """After its Hello, host-a sends bytes that are no HostMessage: its stream ends with
    INVALID_ARGUMENT naming the host, the host is disconnected (the log says why), and it
    connects again afterwards."""
    app = coordinator.app
    with caplog.at_level(logging.WARNING):
        call = _host_stream(coordinator)
        await call.write(_hello(1))
        welcome = await call.read()
        assert welcome.WhichOneof("kind") == "welcome"
        async with app.reading():
            head = app.store.head()[0]
        await call.write(payload)
        code = await asyncio.wait_for(_end(call), 10)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "host host-a sent no valid message" in str(await call.details())
        assert not app.world.hosts["host-a"].connected
        async with app.reading():
            after = [codec.from_stored(e) for e in app.store.read(from_seq=head + 1)]
        assert [e.type for e in after] == ["HostDisconnected"]
        assert after[0].payload.reason.startswith("stream refused: host host-a sent no valid")

        again = _host_stream(coordinator)
        await again.write(_hello(2))
        assert (await again.read()).WhichOneof("kind") == "welcome"
        assert app.world.hosts["host-a"].connected
        again.cancel()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_an_undecodable_hello_is_refused_and_appends_nothing(coordinator: Running) -> None:
    app = coordinator.app
    async with app.reading():
        head = app.store.head()[0]
    call = _host_stream(coordinator)
    await call.write(CUT_SHORT)
    code = await asyncio.wait_for(_end(call), 10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "the first message must be a Hello; it is no valid message" in str(await call.details())
    async with app.reading():
        assert app.store.head()[0] == head
    assert "host-a" not in app.world.hosts
