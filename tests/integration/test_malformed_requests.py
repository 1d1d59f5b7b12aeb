"""Bytes that are no valid request message get INVALID_ARGUMENT and leave no traceback in the
coordinator's log (they got UNKNOWN and an ERROR with a traceback each: any caller could fill
the log); a caller without a role is refused as such first."""

from __future__ import annotations

import logging

import grpc
import pytest

from tests.integration.conftest import Running

GET_VM = "/whimbrel.v1.VmService/GetVm"
WATCH = "/whimbrel.v1.MigrationService/WatchMigration"
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
