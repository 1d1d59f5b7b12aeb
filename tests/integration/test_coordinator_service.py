"""The coordinator over real gRPC on loopback: health, reflection, status codes, whole flows."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import sqlite3
from contextlib import redirect_stdout
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from coordinator.core.invariants import InvariantChecker
from tests.integration.conftest import SPEC, SimHostd, wait_until
from tools.audit.cli import main as audit_main
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

PHASE = common_pb2.MigrationPhase


async def test_health_serving_and_reflection_lists_services(coordinator):
    """A fresh coordinator answers SERVING and lists whimbrel.v1 services via reflection."""
    health = health_pb2_grpc.HealthStub(coordinator.channel)
    reply = await health.Check(
        health_pb2.HealthCheckRequest(service="whimbrel.v1.MigrationService")
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(coordinator.channel)

    async def ask():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for response in stub.ServerReflectionInfo(ask()):
        names = {s.name for s in response.list_services_response.service}
        break
    assert {
        "whimbrel.v1.MigrationService",
        "whimbrel.v1.VmService",
        "whimbrel.v1.HostService",
        "whimbrel.v1.EventLogService",
        "grpc.health.v1.Health",
    } <= names


async def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value.code()


async def test_bad_input_gets_status_codes_and_leaves_no_events(coordinator, sim_hosts):
    """Each malformed or impossible request maps to its status code and appends nothing."""
    vms = vm_pb2_grpc.VmServiceStub(coordinator.channel)
    migrations = migration_pb2_grpc.MigrationServiceStub(coordinator.channel)
    host_a = SimHostd("host-a", coordinator.channel, sim_hosts)
    await host_a.start()
    await vms.DefineVm(vm_pb2.DefineVmRequest(spec=SPEC))
    await vms.StartVm(vm_pb2.StartVmRequest(name="vm-1", host="host-a"))
    await wait_until(lambda: coordinator.app.world.vms["vm-1"].status == 3, coordinator.app, host_a)
    head = coordinator.app.store.head()[0]
    C = grpc.StatusCode
    start = migrations.StartMigration
    cases = [
        (vms.DefineVm(vm_pb2.DefineVmRequest(spec=SPEC)), C.ALREADY_EXISTS),
        (
            vms.DefineVm(vm_pb2.DefineVmRequest(spec=common_pb2.VmSpec(name="Bad"))),
            C.INVALID_ARGUMENT,
        ),
        (vms.GetVm(vm_pb2.GetVmRequest(name="nope")), C.NOT_FOUND),
        (start(migration_pb2.StartMigrationRequest(vm="nope", destination="host-a")), C.NOT_FOUND),
        (start(migration_pb2.StartMigrationRequest(vm="vm-1", destination="host-z")), C.NOT_FOUND),
        (
            start(migration_pb2.StartMigrationRequest(vm="vm-1", destination="host-a")),
            C.INVALID_ARGUMENT,
        ),
        (start(migration_pb2.StartMigrationRequest(vm="vm-1", destination="")), C.INVALID_ARGUMENT),
        (
            migrations.AbortMigration(migration_pb2.AbortMigrationRequest(migration_id="m-x")),
            C.NOT_FOUND,
        ),
        (vms.StartVm(vm_pb2.StartVmRequest(name="vm-1", host="host-a")), C.FAILED_PRECONDITION),
    ]
    for call, code in cases:
        assert await _code(call) == code
    # A known but disconnected destination is UNAVAILABLE.
    host_b = SimHostd("host-b", coordinator.channel, sim_hosts)
    await host_b.start()
    await host_b.stop()
    await wait_until(lambda: not coordinator.app.world.hosts["host-b"].connected, coordinator.app)
    head = coordinator.app.store.head()[0]
    assert (
        await _code(start(migration_pb2.StartMigrationRequest(vm="vm-1", destination="host-b")))
        == C.UNAVAILABLE
    )
    assert coordinator.app.store.head()[0] == head
    assert coordinator.app.world.vms["vm-1"].migration_id == ""
    await host_a.stop()


async def _running_vm(coordinator, sim_hosts):
    hosts = [SimHostd(h, coordinator.channel, sim_hosts) for h in ("host-a", "host-b")]
    for h in hosts:
        await h.start()
    vms = vm_pb2_grpc.VmServiceStub(coordinator.channel)
    await vms.DefineVm(vm_pb2.DefineVmRequest(spec=SPEC))
    await vms.StartVm(vm_pb2.StartVmRequest(name="vm-1", host="host-a"))
    await wait_until(lambda: coordinator.app.world.vms["vm-1"].status == 3, coordinator.app, *hosts)
    return hosts


async def test_postcopy_migration_through_grpc_and_host_streams(coordinator, sim_hosts):
    """A post-copy migration driven over real gRPC streams completes; the log verifies and
    the invariant checker finds nothing."""
    hosts = await _running_vm(coordinator, sim_hosts)
    migrations = migration_pb2_grpc.MigrationServiceStub(coordinator.channel)
    m = await migrations.StartMigration(
        migration_pb2.StartMigrationRequest(
            vm="vm-1",
            destination="host-b",
            mode=common_pb2.MIGRATION_MODE_POSTCOPY,
            migration_id="m-1",
        )
    )
    assert m.phase == PHASE.MIGRATION_PHASE_PREPARING
    # The simulated QEMU reports its first pass; the policy then switches to post-copy.
    await wait_until(
        lambda: coordinator.app.world.migrations["m-1"].phase == PHASE.MIGRATION_PHASE_FINISHING,
        coordinator.app,
        *hosts,
    )
    from tools.sim import migration

    for h in hosts:
        h.report(migration(h.host_id, "vm-1", "completed").payload)
    watched = [
        w.phase
        async for w in migrations.WatchMigration(
            migration_pb2.WatchMigrationRequest(migration_id="m-1")
        )
    ]
    assert watched[-1] == PHASE.MIGRATION_PHASE_COMPLETED
    vm = await vm_pb2_grpc.VmServiceStub(coordinator.channel).GetVm(
        vm_pb2.GetVmRequest(name="vm-1")
    )
    assert (vm.host, vm.lease_holder, vm.lease_generation) == ("host-b", "host-b", 2)
    abort = migrations.AbortMigration(migration_pb2.AbortMigrationRequest(migration_id="m-1"))
    assert await _code(abort) == grpc.StatusCode.FAILED_PRECONDITION
    log = eventlog_pb2_grpc.EventLogServiceStub(coordinator.channel)
    verified = await log.VerifyLog(eventlog_pb2.VerifyLogRequest())
    assert verified.ok and verified.head_seq == coordinator.app.store.head()[0]
    from coordinator import codec

    events = [codec.from_stored(s) for s in coordinator.app.store.read()]
    assert InvariantChecker().check_quiescent(events) == []
    # The auditor's view through the live coordinator agrees: clean, nothing left in flight.
    audit = ["verify", "--against", coordinator.address, *coordinator.tls_flags(), "--final",
             "--json"]  # fmt: skip
    code, report = await asyncio.to_thread(_audit_json, audit)
    assert code == 0 and report["ok"] and report["in_flight"] == []
    assert report["head_seq"] == coordinator.app.store.head()[0]
    for h in hosts:
        await h.stop()


def _audit_json(argv: list[str]) -> tuple[int, dict[str, Any]]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = audit_main(argv)
    return code, json.loads(out.getvalue())


async def test_audit_against_a_live_coordinator_finds_tampering(coordinator, sim_hosts):
    """`verify --against` reads the live log over gRPC and names a row edited on disk."""
    await _running_vm(coordinator, sim_hosts)
    code, report = await asyncio.to_thread(
        _audit_json,
        ["verify", "--against", coordinator.address, *coordinator.tls_flags(), "--json"],
    )
    assert code == 0 and report["ok"]
    db = coordinator.app.store.path
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("DROP TRIGGER events_append_only_update")
        conn.execute("UPDATE events SET time_us = time_us + 1 WHERE seq = 3")
        conn.commit()
    code, report = await asyncio.to_thread(
        _audit_json,
        ["verify", "--against", coordinator.address, *coordinator.tls_flags(), "--json"],
    )
    assert code == 1 and report["findings"][0]["seq"] == 3
    assert "hash does not match" in report["findings"][0]["problem"]
    # A coordinator that is not there is unreadable (exit 2), not "clean".
    assert await asyncio.to_thread(audit_main, ["verify", "--against", "127.0.0.1:1"]) == 2


async def test_abort_after_point_of_no_return_is_failed_precondition(coordinator, sim_hosts):
    """Abort after the destination's cont is FAILED_PRECONDITION and appends nothing."""
    hosts = await _running_vm(coordinator, sim_hosts)
    migrations = migration_pb2_grpc.MigrationServiceStub(coordinator.channel)
    await migrations.StartMigration(
        migration_pb2.StartMigrationRequest(
            vm="vm-1",
            destination="host-b",
            mode=common_pb2.MIGRATION_MODE_POSTCOPY,
            migration_id="m-1",
        )
    )
    await wait_until(
        lambda: coordinator.app.world.migrations["m-1"].point_of_no_return_passed,
        coordinator.app,
        *hosts,
    )
    head = coordinator.app.store.head()[0]
    call = migrations.AbortMigration(migration_pb2.AbortMigrationRequest(migration_id="m-1"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "point of no return" in err.value.details()
    assert not any(e.type == "RollbackDecided" for e in coordinator.app.store.read(from_seq=head))
    for h in hosts:
        await h.stop()


async def test_commands_wait_in_outbox_until_host_reconnects(coordinator, sim_hosts):
    """A command issued while its host is away is delivered when the host comes back."""
    hosts = await _running_vm(coordinator, sim_hosts)
    host_b = hosts[1]
    host_b.answer = False
    migrations = migration_pb2_grpc.MigrationServiceStub(coordinator.channel)
    await migrations.StartMigration(
        migration_pb2.StartMigrationRequest(vm="vm-1", destination="host-b", migration_id="m-1")
    )
    await wait_until(lambda: len(host_b.commands) == 1, coordinator.app, host_b)
    await host_b.stop()
    await wait_until(lambda: not coordinator.app.world.hosts["host-b"].connected, coordinator.app)
    again = SimHostd("host-b", coordinator.channel, sim_hosts, generation=2)
    again.answer = False
    await again.start()
    await wait_until(lambda: len(again.commands) == 1, coordinator.app, again)
    assert again.commands[0].command_id == host_b.commands[0].command_id
    assert again.welcome.epoch == coordinator.app.world.epoch
    # An older generation is refused.
    stale = SimHostd("host-b", coordinator.channel, sim_hosts, generation=1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stale.start()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await again.stop()
    await hosts[0].stop()


async def test_read_events_follow_streams_new_commits(coordinator):
    """ReadEvents with follow delivers events committed after the call started."""
    log = eventlog_pb2_grpc.EventLogServiceStub(coordinator.channel)
    call = log.ReadEvents(eventlog_pb2.ReadEventsRequest(from_seq=1, follow=True))
    first = await call.read()
    assert first.type == "CoordinatorStarted" and first.payload.coordinator_started.epoch == 1
    await vm_pb2_grpc.VmServiceStub(coordinator.channel).DefineVm(vm_pb2.DefineVmRequest(spec=SPEC))
    second = await asyncio.wait_for(call.read(), 5)
    assert second.type == "VmDefined" and second.payload.vm_defined.spec.name == "vm-1"
    assert second.prev_hash == first.hash
    call.cancel()


async def test_caller_trace_context_in_grpc_metadata_is_linked_from_the_migration_trace(
    coordinator, sim_hosts
):
    """A client that sends W3C `traceparent` metadata with StartMigration finds its span
    linked from the migration's root span (whose trace id is the migration's own); a refused
    request for the same id does not replace the link."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from coordinator.telemetry import Telemetry, ids
    from coordinator.telemetry.tracing import MigrationTracer
    from tools.sim import migration

    exporter = InMemorySpanExporter()
    tracer = MigrationTracer(SimpleSpanProcessor(exporter), Resource.create({}))
    coordinator.app.telemetry = Telemetry(tracer)
    hosts = await _running_vm(coordinator, sim_hosts)
    caller_trace, caller_span = 0x1234ABCD << 64, 0xFEEDBEEF
    metadata = (("traceparent", f"00-{caller_trace:032x}-{caller_span:016x}-01"),)
    migrations = migration_pb2_grpc.MigrationServiceStub(coordinator.channel)
    await migrations.StartMigration(
        migration_pb2.StartMigrationRequest(
            vm="vm-1", destination="host-b", mode=common_pb2.MIGRATION_MODE_POSTCOPY,
            migration_id="m-1",
        ),
        metadata=metadata,
    )  # fmt: skip
    # A refused request naming the same migration changes nothing, not even its caller link.
    imposter = (("traceparent", f"00-{0xBAD:032x}-{0xBAD:016x}-01"),)
    again = migrations.StartMigration(
        migration_pb2.StartMigrationRequest(vm="vm-1", destination="host-b", migration_id="m-1"),
        metadata=imposter,
    )
    assert await _code(again) == grpc.StatusCode.ALREADY_EXISTS
    await wait_until(
        lambda: coordinator.app.world.migrations["m-1"].phase == PHASE.MIGRATION_PHASE_FINISHING,
        coordinator.app,
        *hosts,
    )
    for h in hosts:
        h.report(migration(h.host_id, "vm-1", "completed").payload)

    def roots() -> list[Any]:
        return [s for s in exporter.get_finished_spans() if s.name == "migration vm-1"]

    await wait_until(lambda: bool(roots()), coordinator.app)  # spans leave after the commit
    (root,) = roots()
    assert root.context.trace_id == ids.trace_id("m-1")
    assert [(link.context.trace_id, link.context.span_id) for link in root.links] == [
        (caller_trace, caller_span)
    ]
    for h in hosts:
        await h.stop()


async def test_observations_sent_together_are_folded_and_acknowledged_as_one_batch(
    coordinator, sim_hosts
):
    """hostd sends what it recorded together (a lease acquired and the command's result) in one
    message: the coordinator logs them in order, back to back, and acknowledges them once."""
    hosts = await _running_vm(coordinator, sim_hosts)
    host_a = hosts[0]
    await wait_until(lambda: host_a.acked == host_a.seq, coordinator.app, host_a)
    before = list(host_a.acks)
    host_a.report_together(
        events_pb2.QmpEventReceived(vm="vm-1", event="STOP", data_json="{}"),
        events_pb2.QmpEventReceived(vm="vm-1", event="RESUME", data_json="{}"),
    )
    await wait_until(lambda: host_a.acked == host_a.seq, coordinator.app, host_a)
    assert host_a.acks[len(before) :] == [host_a.seq]
    logged = [
        e
        for e in coordinator.app.store.read()
        if e.origin_host == "host-a" and e.origin_seq in (host_a.seq - 1, host_a.seq)
    ]
    assert [e.origin_seq for e in logged] == [host_a.seq - 1, host_a.seq]
    assert logged[1].seq == logged[0].seq + 1
    assert coordinator.app.world.vms["vm-1"].status == 3  # running again after the RESUME
    for h in hosts:
        await h.stop()
