"""Who may do what, over real mutual TLS on loopback: host impersonation, roles, clients without
a Whimbrel certificate, the principal recorded for each request, and the hostd's check of the
coordinator's certificate. Every refusal leaves the log untouched."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from coordinator import codec
from coordinator.authz import Role
from coordinator.telemetry import Telemetry
from coordinator.telemetry.metrics import CoordinatorMetrics
from tests.integration.conftest import SPEC, SimHostd, wait_until
from tools.audit import timeline
from whimbrel import pki, tls
from whimbrel.v1 import (
    common_pb2,
    eventlog_pb2,
    eventlog_pb2_grpc,
    events_pb2,
    host_pb2,
    host_pb2_grpc,
    migration_pb2,
    migration_pb2_grpc,
    vm_pb2,
    vm_pb2_grpc,
)

C = grpc.StatusCode


def head(coordinator) -> int:
    return coordinator.app.store.head()[0]


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


def counting_refusals(coordinator) -> InMemoryMetricReader:
    """Give the coordinator real metrics, read in memory."""
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    coordinator.app.telemetry = Telemetry(None, CoordinatorMetrics(meter, lambda: None))
    return reader


def refusals_counted(reader: InMemoryMetricReader) -> dict[tuple[str, str], int]:
    counted: dict[tuple[str, str], int] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name != "whimbrel.rpc.refused":
                    continue
                for point in metric.data.data_points:
                    attrs = point.attributes or {}
                    key = (str(attrs["rpc.method"]), str(attrs["rpc.grpc.status_code"]))
                    counted[key] = int(point.value)
    return counted


async def test_a_host_cannot_connect_as_another_host(coordinator, sim_hosts):
    """host-a's certificate saying Hello as host-b is PERMISSION_DENIED and appends nothing;
    host-b itself then connects normally."""
    before = head(coordinator)
    impostor = SimHostd("host-b", coordinator.channel_as("host", "host-a"), sim_hosts)
    impostor.generation = 2**63 - 1
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await impostor.start()
    assert err.value.code() == C.PERMISSION_DENIED
    assert "spiffe://whimbrel/host/host-a may not connect as host 'host-b'" in err.value.details()
    await impostor.stop()
    assert head(coordinator) == before
    assert "host-b" not in coordinator.app.world.hosts
    real = SimHostd("host-b", coordinator.channel, sim_hosts)
    await real.start()
    assert coordinator.app.world.hosts["host-b"].generation == 1
    await real.stop()


async def test_roles_decide_each_rpc_and_refusals_are_counted(coordinator, sim_hosts):
    """A viewer reads but may not migrate, an operator may not define VMs, a user with no role
    may not read, a user may not open a host stream and a host may not read: each refusal
    names the principal and the missing role, appends nothing, and is counted."""
    reader = counting_refusals(coordinator)
    host_a = SimHostd("host-a", coordinator.channel, sim_hosts)
    await host_a.start()
    before = head(coordinator)

    def vms(user: str) -> vm_pb2_grpc.VmServiceStub:
        return vm_pb2_grpc.VmServiceStub(coordinator.channel_as("user", user))

    assert (await vms("viewer").ListVms(vm_pb2.ListVmsRequest())).vms == []
    migrate = migration_pb2_grpc.MigrationServiceStub(coordinator.channel_as("user", "viewer"))
    err = await refused(
        migrate.StartMigration(migration_pb2.StartMigrationRequest(vm="vm-1", destination="h"))
    )
    assert err.code() == C.PERMISSION_DENIED
    assert err.details() == (
        "spiffe://whimbrel/user/viewer lacks role operator (has viewer) for "
        "/whimbrel.v1.MigrationService/StartMigration"
    )
    err = await refused(vms("operator").DefineVm(vm_pb2.DefineVmRequest(spec=SPEC)))
    assert err.code() == C.PERMISSION_DENIED
    assert "spiffe://whimbrel/user/operator lacks role admin (has operator)" in err.details()
    err = await refused(vms("nobody").ListVms(vm_pb2.ListVmsRequest()))
    assert err.code() == C.PERMISSION_DENIED
    assert "spiffe://whimbrel/user/nobody lacks role viewer for" in err.details()
    host_vms = vm_pb2_grpc.VmServiceStub(coordinator.channel_as("host", "host-a"))
    err = await refused(host_vms.ListVms(vm_pb2.ListVmsRequest()))
    assert err.code() == C.PERMISSION_DENIED
    assert "spiffe://whimbrel/host/host-a lacks role viewer" in err.details()
    as_user = SimHostd("host-b", coordinator.channel_as("user", "admin"), sim_hosts)
    with pytest.raises(grpc.aio.AioRpcError) as stream_err:
        await as_user.start()
    assert stream_err.value.code() == C.PERMISSION_DENIED
    assert "spiffe://whimbrel/user/admin lacks role host" in stream_err.value.details()
    await as_user.stop()
    assert head(coordinator) == before
    assert refusals_counted(reader) == {
        ("/whimbrel.v1.MigrationService/StartMigration", "PERMISSION_DENIED"): 1,
        ("/whimbrel.v1.VmService/DefineVm", "PERMISSION_DENIED"): 1,
        ("/whimbrel.v1.VmService/ListVms", "PERMISSION_DENIED"): 2,
        ("/whimbrel.v1.HostService/Connect", "PERMISSION_DENIED"): 1,
    }
    # Roles changed in place (as a SIGHUP reload does) apply to the next call.
    coordinator.roles.users["nobody"] = Role.VIEWER
    assert (await vms("nobody").ListVms(vm_pb2.ListVmsRequest())).vms == []
    await host_a.stop()


async def test_clients_without_a_whimbrel_certificate_are_refused(coordinator, tmp_path):
    """No client certificate, or plaintext, fails the handshake (the call never starts); a
    certificate of the CA naming no Whimbrel principal is UNAUTHENTICATED. Nothing is
    appended either way."""
    before = head(coordinator)
    ca = coordinator.identity("user", "admin").ca.read_bytes()
    no_cert = grpc.aio.secure_channel(coordinator.address, grpc.ssl_channel_credentials(ca))
    plaintext = grpc.aio.insecure_channel(coordinator.address)
    for channel in (no_cert, plaintext):
        stub = vm_pb2_grpc.VmServiceStub(channel)
        err = await refused(stub.DefineVm(vm_pb2.DefineVmRequest(spec=SPEC), timeout=5))
        assert err.code() == C.UNAVAILABLE
        await channel.close()
    # A certificate the CA signed for something that is not a Whimbrel principal.
    stranger = pki._issue(coordinator.pki, "stranger", "spiffe://elsewhere/user/admin")
    async with tls.aio_channel(coordinator.address, stranger.files) as channel:
        err = await refused(vm_pb2_grpc.VmServiceStub(channel).DefineVm(
            vm_pb2.DefineVmRequest(spec=SPEC)))  # fmt: skip
        assert err.code() == C.UNAUTHENTICATED
        assert "names no Whimbrel principal" in err.details()
    assert head(coordinator) == before


async def test_health_and_reflection_are_open_to_any_authenticated_peer(coordinator):
    """A user without any role and a host may both ask for health and watch it."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for kind, name in (("user", "nobody"), ("host", "host-a")):
        health = health_pb2_grpc.HealthStub(coordinator.channel_as(kind, name))
        reply = await health.Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # Watch answers through the context rather than by yielding: the guard passes it on.
        watch = health.Watch(health_pb2.HealthCheckRequest())
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


async def test_each_accepted_request_records_its_principal(coordinator, sim_hosts):
    """The admin's VmDefined, the operator's START_VM, StartMigration, post-copy switch and
    abort carry their principals, and the audit timeline says who asked and who aborted."""
    hosts = [SimHostd(h, coordinator.channel, sim_hosts) for h in ("host-a", "host-b")]
    for h in hosts:
        await h.start()
    admin, operator = tls.user_principal("admin"), tls.user_principal("operator")
    vms = vm_pb2_grpc.VmServiceStub(coordinator.channel)
    await vms.DefineVm(vm_pb2.DefineVmRequest(spec=SPEC))
    as_operator = vm_pb2_grpc.VmServiceStub(coordinator.channel_as("user", "operator"))
    await as_operator.StartVm(vm_pb2.StartVmRequest(name="vm-1", host="host-a"))
    await wait_until(lambda: coordinator.app.world.vms["vm-1"].status == 3, coordinator.app, *hosts)
    hosts[1].answer = False  # the destination never prepares: the migration stays abortable
    migrations = migration_pb2_grpc.MigrationServiceStub(coordinator.channel_as("user", "operator"))
    await migrations.StartMigration(
        migration_pb2.StartMigrationRequest(
            vm="vm-1", destination="host-b", migration_id="m-1",
            mode=common_pb2.MIGRATION_MODE_AUTO,
        )
    )  # fmt: skip
    await migrations.SwitchToPostcopy(migration_pb2.SwitchToPostcopyRequest(migration_id="m-1"))
    await migrations.AbortMigration(migration_pb2.AbortMigrationRequest(migration_id="m-1"))
    events = [codec.from_stored(s) for s in coordinator.app.store.read()]

    def by(kind: type) -> list[str]:
        return [e.payload.requested_by for e in events if isinstance(e.payload, kind)]

    assert by(events_pb2.VmDefined) == [admin]
    starts = [e.payload for e in events if isinstance(e.payload, events_pb2.CommandIssued)]
    assert starts[0].kind == events_pb2.COMMAND_KIND_START_VM
    assert starts[0].requested_by == operator
    assert by(events_pb2.MigrationRequested) == [operator]
    assert by(events_pb2.PostcopyRequested) == [operator]
    assert by(events_pb2.RollbackDecided) == [operator]
    story = timeline.build(events, "m-1")
    assert (story.requested_by, story.postcopy_requested_by, story.aborted_by) == (
        operator,
        operator,
        operator,
    )
    rendered = timeline.render(story)
    assert f"requested by {operator}" in rendered and f"aborted by {operator}" in rendered
    for h in hosts:
        await h.stop()


async def test_hostd_refuses_a_server_that_is_not_the_coordinator(tmp_path):
    """A server with a valid certificate of the same CA, for the right address, but naming a
    host instead of the coordinator, is refused by hostd's check; the real one passes."""
    directory = tmp_path / "pki"
    real = pki.ensure(directory, "coordinator")
    fake = pki._issue(directory, "fake", tls.host_principal("evil"), ips=("127.0.0.1",),
                      server=True)  # fmt: skip
    client = pki.ensure(directory, "host", "host-a").files
    for issued, ok in ((fake, False), (real, True)):
        server = grpc.aio.server()
        port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(issued.files))
        await server.start()
        try:
            if ok:
                await tls.check_server_principal(f"127.0.0.1:{port}", client)
            else:
                with pytest.raises(tls.TlsError, match="host/evil, not spiffe://whimbrel/coord"):
                    await tls.check_server_principal(f"127.0.0.1:{port}", client)
        finally:
            await server.stop(None)


async def test_host_stream_and_reads_work_for_their_roles(coordinator, sim_hosts):
    """A viewer lists hosts, an admin verifies the log; a host's stream carries its
    observations."""
    host_a = SimHostd("host-a", coordinator.channel, sim_hosts)
    await host_a.start()
    log = eventlog_pb2_grpc.EventLogServiceStub(coordinator.channel_as("user", "admin"))
    verified = await log.VerifyLog(eventlog_pb2.VerifyLogRequest())
    assert verified.ok and verified.head_seq == head(coordinator)
    hosts = host_pb2_grpc.HostServiceStub(coordinator.channel_as("user", "viewer"))
    listed = await hosts.ListHosts(host_pb2.ListHostsRequest())
    assert [h.host_id for h in listed.hosts] == ["host-a"]
    await host_a.stop()
    await asyncio.sleep(0)
