"""The coordinator's limits over real gRPC: oversize messages and calls beyond the concurrency
bound are refused with RESOURCE_EXHAUSTED, unknown stream filters with INVALID_ARGUMENT,
ReadEvents reads the log in bounded batches, VerifyLog is for admins, a host stream's queue
holds hostd back without losing an event, and reads never wait for the commit path's lock."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from coordinator import codec
from coordinator.limits import Limits
from coordinator.servicers import EventLogServicer
from tests.integration.conftest import SPEC, Running, SimHostd, serving, wait_until
from tools.sim import SimHosts
from whimbrel.v1 import (
    common_pb2,
    eventlog_pb2,
    eventlog_pb2_grpc,
    events_pb2,
    migration_pb2,
    migration_pb2_grpc,
    vm_pb2,
    vm_pb2_grpc,
)

C = grpc.StatusCode


def head(running: Running) -> int:
    return running.app.store.head()[0]


async def _running_vm(running: Running, sim_hosts: SimHosts) -> SimHostd:
    host = SimHostd("host-a", running.channel, sim_hosts)
    await host.start()
    vms = vm_pb2_grpc.VmServiceStub(running.channel)
    await vms.DefineVm(vm_pb2.DefineVmRequest(spec=SPEC))
    await vms.StartVm(vm_pb2.StartVmRequest(name="vm-1", host="host-a"))
    await wait_until(lambda: running.app.world.vms["vm-1"].status == 3, running.app, host)
    return host


async def test_an_oversize_message_is_refused_and_nothing_is_logged(tmp_path, pki_dir):
    """A request larger than max_receive_bytes is refused with RESOURCE_EXHAUSTED before any
    servicer runs."""
    async with serving(tmp_path, pki_dir, Limits(max_receive_bytes=64 * 1024)) as running:
        before = head(running)
        vms = vm_pb2_grpc.VmServiceStub(running.channel)
        huge = common_pb2.VmSpec(name="vm-1", memory_mib=128, vcpus=1)
        huge.disks.add(path="/" + "x" * 100_000, format="raw")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await vms.DefineVm(vm_pb2.DefineVmRequest(spec=huge))
        assert refused.value.code() == C.RESOURCE_EXHAUSTED, refused.value
        assert head(running) == before
        # The same server still takes a request within the bound.
        await vms.DefineVm(vm_pb2.DefineVmRequest(spec=SPEC))
        assert head(running) == before + 1


async def test_calls_beyond_max_concurrent_rpcs_are_refused(tmp_path, pki_dir):
    """With two follow streams open and a bound of two, a third call gets RESOURCE_EXHAUSTED;
    once one ends, calls are served again."""
    async with serving(tmp_path, pki_dir, Limits(max_concurrent_rpcs=2)) as running:
        log = eventlog_pb2_grpc.EventLogServiceStub(running.channel)
        follows = [log.ReadEvents(eventlog_pb2.ReadEventsRequest(follow=True)) for _ in range(2)]
        for call in follows:
            assert (await call.read()).type == "CoordinatorStarted"
        migrations = migration_pb2_grpc.MigrationServiceStub(running.channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await migrations.ListMigrations(migration_pb2.ListMigrationsRequest())
        assert refused.value.code() == C.RESOURCE_EXHAUSTED, refused.value
        follows[0].cancel()

        async def listed() -> migration_pb2.ListMigrationsResponse:
            while True:  # the server counts the cancelled call down once it has seen the end
                with contextlib.suppress(grpc.aio.AioRpcError):
                    return await migrations.ListMigrations(migration_pb2.ListMigrationsRequest())
                await asyncio.sleep(0.05)

        assert list((await asyncio.wait_for(listed(), 5)).migrations) == []
        follows[1].cancel()


@pytest.mark.parametrize(
    "stream",
    ["bogus", "bogus/x", "migration/", "migration/a b", "vm/../etc", "vm/VM-1", "host/", "host"],
)
async def test_an_unknown_stream_filter_is_invalid_argument(coordinator, stream):
    """ReadEvents names one of coordinator, migration/ID, host/ID, vm/NAME, or is refused."""
    log = eventlog_pb2_grpc.EventLogServiceStub(coordinator.channel)
    for follow in (False, True):
        call = log.ReadEvents(eventlog_pb2.ReadEventsRequest(stream=stream, follow=follow))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.read()
        assert refused.value.code() == C.INVALID_ARGUMENT, refused.value
        assert repr(stream) in str(refused.value.details())


@pytest.mark.parametrize("stream", ["", "coordinator", "vm/vm-1", "host/host-a", "migration/m-1"])
async def test_known_stream_filters_are_served(coordinator, stream):
    """Every well-formed filter reads (an empty stream is no error)."""
    log = eventlog_pb2_grpc.EventLogServiceStub(coordinator.channel)
    events = [e async for e in log.ReadEvents(eventlog_pb2.ReadEventsRequest(stream=stream))]
    assert all(e.stream == stream for e in events) if stream else events


async def test_read_events_batches_are_bounded_in_bytes_and_lose_nothing(tmp_path, pki_dir):
    """Each read takes at most read_batch_bytes of payload (or one larger event) and at most
    read_batch_events events; ReadEvents over those batches returns the whole log in order."""
    limits = Limits(read_batch_events=5, read_batch_bytes=300)
    async with serving(tmp_path, pki_dir, limits) as running:
        vms = vm_pb2_grpc.VmServiceStub(running.channel)
        for i in range(12):
            spec = common_pb2.VmSpec(name=f"vm-{i}", memory_mib=128, vcpus=1)
            # Specs of growing size: some batches end on bytes, some on the count, one event
            # is larger than the byte bound on its own.
            spec.disks.add(path="/d/" + "x" * (40 * i), format="raw")
            await vms.DefineVm(vm_pb2.DefineVmRequest(spec=spec))
        stored = list(running.app.store.read())
        assert any(len(e.payload) > limits.read_batch_bytes for e in stored)

        reader = EventLogServicer(running.app, limits)
        seq, batches = 1, []
        while batch := await asyncio.to_thread(reader._read_batch, seq, ""):
            batches.append(batch)
            seq = batch[-1].seq + 1
        assert [e.seq for b in batches for e in b] == [e.seq for e in stored]
        for batch in batches:
            assert len(batch) <= limits.read_batch_events
            assert len(batch) == 1 or sum(len(e.payload) for e in batch) <= limits.read_batch_bytes
        assert any(len(b) < limits.read_batch_events for b in batches[:-1])  # bytes ended some

        log = eventlog_pb2_grpc.EventLogServiceStub(running.channel)
        served = [e async for e in log.ReadEvents(eventlog_pb2.ReadEventsRequest())]
        assert [(e.seq, e.hash) for e in served] == [(e.seq, e.hash) for e in stored]


@pytest.mark.parametrize("user", ["viewer", "operator"])
async def test_verify_log_is_admin_only(coordinator, user):
    """VerifyLog hashes the whole log: a viewer or operator is refused, an admin is served."""
    denied = eventlog_pb2_grpc.EventLogServiceStub(coordinator.channel_as("user", user))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await denied.VerifyLog(eventlog_pb2.VerifyLogRequest())
    assert refused.value.code() == C.PERMISSION_DENIED
    assert "lacks role admin" in str(refused.value.details())
    admin = eventlog_pb2_grpc.EventLogServiceStub(coordinator.channel)
    verified = await admin.VerifyLog(eventlog_pb2.VerifyLogRequest())
    assert verified.ok and verified.head_seq == head(coordinator)


async def test_a_full_host_queue_holds_the_host_back_and_loses_nothing(
    tmp_path, pki_dir, sim_hosts
):
    """With a queue of 8 events and slow folding, 300 observations sent at once are folded in
    batches of at most 8 (the stream is not read meanwhile), and every one hostd had
    acknowledged is in the log, in order."""
    async with serving(tmp_path, pki_dir, Limits(host_queue_events=8)) as running:
        host = await _running_vm(running, sim_hosts)
        app = running.app
        batches: list[int] = []
        fold = app.queue_host_events

        async def slow(session, events):  # type: ignore[no-untyped-def]
            batches.append(len(events))
            await asyncio.sleep(0.005)
            return await fold(session, events)

        app.queue_host_events = slow  # type: ignore[method-assign]
        first = host.seq + 1
        observed = common_pb2.VmObservation(
            vm="vm-1", process_alive=True, runstate="running", qmp_reachable=True
        )
        for _ in range(300):
            host.report(events_pb2.VmObserved(observation=observed, reason="flood"))
        last = host.seq
        await wait_until(lambda: host.acked >= last, app, host, limit=30)
        assert max(batches) <= 8
        assert len(batches) >= 300 // 8
        logged = [
            e.origin_seq
            for e in map(codec.from_stored, app.store.read())
            if e.origin_host == "host-a" and e.type == "VmObserved"
        ]
        assert logged[-300:] == list(range(first, last + 1))
        assert host.error is None
        await host.stop()


async def test_reads_do_not_wait_for_a_unit_holding_the_lock(coordinator, sim_hosts):
    """While a unit of work holds the coordinator's lock (folding, deciding), Get, List and
    Watch are still answered from the committed world."""
    await _running_vm(coordinator, sim_hosts)
    app = coordinator.app
    migrations = migration_pb2_grpc.MigrationServiceStub(coordinator.channel)
    vms = vm_pb2_grpc.VmServiceStub(coordinator.channel)
    async with app._lock:
        listed = await asyncio.wait_for(vms.ListVms(vm_pb2.ListVmsRequest()), 2)
        got = await asyncio.wait_for(vms.GetVm(vm_pb2.GetVmRequest(name="vm-1")), 2)
        none = await asyncio.wait_for(
            migrations.ListMigrations(migration_pb2.ListMigrationsRequest()), 2
        )
    assert [vm.spec.name for vm in listed.vms] == ["vm-1"] and got.host == "host-a"
    assert list(none.migrations) == []


@pytest.mark.parametrize(
    ("request_", "text"),
    [
        (eventlog_pb2.VerifyLogRequest(expect_head_hash="00" * 32), "set both"),
        (eventlog_pb2.VerifyLogRequest(expect_seq=3), "set both"),
        (eventlog_pb2.VerifyLogRequest(expect_seq=3, expect_head_hash="ab"), "64 hex digits"),
        (eventlog_pb2.VerifyLogRequest(expect_seq=3, expect_head_hash="zz" * 32), "64 hex"),
        (
            eventlog_pb2.VerifyLogRequest(expect_seq=2**64 - 1, expect_head_hash="00" * 32),
            "beyond any seq",
        ),
    ],
)
async def test_verify_log_refuses_half_or_malformed_anchors(coordinator, request_, text):
    """An anchor is a seq and its 64-hex-digit hash: half of one was ignored (a clean answer to
    a question not asked) and a short hash read as tampering; both are now refused."""
    admin = eventlog_pb2_grpc.EventLogServiceStub(coordinator.channel)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await admin.VerifyLog(request_)
    assert refused.value.code() == C.INVALID_ARGUMENT
    assert text in str(refused.value.details())
    seq, digest = coordinator.app.store.head()
    anchored = eventlog_pb2.VerifyLogRequest(expect_seq=seq, expect_head_hash=digest.hex())
    assert (await admin.VerifyLog(anchored)).ok


async def test_list_migrations_refuses_a_malformed_vm_filter(coordinator):
    migrations = migration_pb2_grpc.MigrationServiceStub(coordinator.channel)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await migrations.ListMigrations(migration_pb2.ListMigrationsRequest(vm="../\n"))
    assert refused.value.code() == C.INVALID_ARGUMENT
