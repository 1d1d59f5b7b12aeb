"""Hostile requests over real gRPC against a real coordinator: each ends in a clear refusal."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.message import Message

from tests.integration.conftest import Running
from whimbrel.v1 import common_pb2, eventlog_pb2, eventlog_pb2_grpc, migration_pb2, vm_pb2

C = grpc.StatusCode
# A refusal's reason well within the 8 KiB of metadata a gRPC client accepts by default.
MAX_DETAILS = 1024


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


HUGE = "x" * 70_000
HUGE_REQUESTS: list[tuple[str, Message]] = [
    ("/whimbrel.v1.VmService/GetVm", vm_pb2.GetVmRequest(name=HUGE)),
    ("/whimbrel.v1.VmService/StopVm", vm_pb2.StopVmRequest(name=HUGE)),
    ("/whimbrel.v1.VmService/DefineVm", vm_pb2.DefineVmRequest(spec=common_pb2.VmSpec(name=HUGE))),
    (
        "/whimbrel.v1.VmService/DefineVm",
        vm_pb2.DefineVmRequest(
            spec=common_pb2.VmSpec(
                name="vm-9", memory_mib=64, vcpus=1, disks=[common_pb2.Disk(path=HUGE)]
            )
        ),
    ),
    (
        "/whimbrel.v1.MigrationService/SwitchToPostcopy",
        migration_pb2.SwitchToPostcopyRequest(migration_id=HUGE),
    ),
    ("/whimbrel.v1.EventLogService/ReadEvents", eventlog_pb2.ReadEventsRequest(stream=HUGE)),
    (
        "/whimbrel.v1.EventLogService/ReadEvents",
        eventlog_pb2.ReadEventsRequest(stream="vm/" + HUGE),
    ),
]


@pytest.mark.parametrize(
    ("path", "request_"), HUGE_REQUESTS, ids=[p.rsplit("/")[-1] for p, _ in HUGE_REQUESTS]
)
async def test_a_refused_huge_value_is_quoted_cut_short(
    coordinator: Running, path: str, request_: Message
) -> None:
    """A 70,000-character name, id, path or stream is refused with INVALID_ARGUMENT and a short
    reason: quoted whole, the reason exceeded the client's metadata limit, and the client got
    RESOURCE_EXHAUSTED without it (found by the fuzz, e.g. StopVm{name: "x" * 70000})."""
    serialize = type(request_).SerializeToString
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        if path.endswith("/ReadEvents"):
            await coordinator.channel.unary_stream(path, serialize)(request_).read()
        else:
            await coordinator.channel.unary_unary(path, serialize)(request_)
    assert refused.value.code() == C.INVALID_ARGUMENT, refused.value
    details = refused.value.details() or ""
    assert "'xxxxxxxx" in details and "(70000 characters)" in details
    assert len(details) <= MAX_DETAILS
