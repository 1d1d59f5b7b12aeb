"""Hostile requests over real gRPC against a real coordinator: each ends in a clear refusal."""

from __future__ import annotations

import grpc
import pytest

from tests.integration.conftest import Running
from whimbrel.v1 import eventlog_pb2, eventlog_pb2_grpc

C = grpc.StatusCode


async def test_read_events_from_beyond_any_seq_is_invalid_argument(coordinator: Running) -> None:
    """ReadEvents from a seq no log can hold (past 2^63-1) is refused, where the store failed
    with UNKNOWN (found by the fuzz: from_seq 18446744073709551614)."""
    log = eventlog_pb2_grpc.EventLogServiceStub(coordinator.channel)
    for follow in (False, True):
        request = eventlog_pb2.ReadEventsRequest(from_seq=2**64 - 2, follow=follow)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await log.ReadEvents(request).read()
        assert refused.value.code() == C.INVALID_ARGUMENT, refused.value
    last = eventlog_pb2.ReadEventsRequest(from_seq=2**63 - 1)
    assert [e async for e in log.ReadEvents(last)] == []
