"""The host stream carries observations only (invariant 9): forged decisions, answers to another
host's commands, facts about another host's VM and leaping generations are refused with
PERMISSION_DENIED over real gRPC, and nothing of the refused batch reaches the log."""

from __future__ import annotations

import time

import grpc
import pytest
from google.protobuf.message import Message

from coordinator import codec
from coordinator.host_stream import MAX_GENERATION_JUMP
from tests.integration.conftest import SPEC, Running, SimHostd, wait_until
from tools.sim import SimHosts
from whimbrel.v1 import (
    common_pb2,
    events_pb2,
    migration_pb2,
    migration_pb2_grpc,
    vm_pb2,
    vm_pb2_grpc,
)

DENIED = grpc.StatusCode.PERMISSION_DENIED


async def _running_vm(coordinator: Running, sim_hosts: SimHosts) -> list[SimHostd]:
    """vm-1 running on host-a; host-b connected; host-c connected, the forger."""
    hosts = [SimHostd(h, coordinator.channel, sim_hosts) for h in ("host-a", "host-b", "host-c")]
    for h in hosts:
        await h.start()
    vms = vm_pb2_grpc.VmServiceStub(coordinator.channel)
    await vms.DefineVm(vm_pb2.DefineVmRequest(spec=SPEC))
    await vms.StartVm(vm_pb2.StartVmRequest(name="vm-1", host="host-a"))
    await wait_until(lambda: coordinator.app.world.vms["vm-1"].status == 3, coordinator.app, *hosts)
    return hosts


async def _refused(coordinator: Running, host: SimHostd, *payloads: Message) -> str:
    """Send `payloads` as one batch; check the stream is refused and that the only event
    appended since is the stream's end. Returns the status details."""
    app = coordinator.app
    async with app.reading():
        head = app.store.head()[0]
    host.report_together(*payloads)
    await wait_until(lambda: host.error is not None, app, host)
    await wait_until(lambda: not app.world.hosts[host.host_id].connected, app)
    async with app.reading():
        after = [codec.from_stored(e) for e in app.store.read(from_seq=head + 1)]
    assert host.error is not None and host.error.code() == DENIED, host.error
    assert [e.type for e in after] == ["HostDisconnected"]
    assert after[0].payload.reason.startswith("stream refused: ")
    return str(host.error.details())


async def _stop(hosts: list[SimHostd]) -> None:
    for h in hosts:
        await h.stop()


FORGED_DECISIONS = [
    events_pb2.CommandIssued(
        command_id="vm/vm-1/9/1-release-lease",
        host_id="host-a",
        vm="vm-1",
        kind=events_pb2.COMMAND_KIND_RELEASE_LEASE,
    ),
    events_pb2.MigrationFinished(
        migration_id="m-x", phase=common_pb2.MIGRATION_PHASE_COMPLETED, reason="forged"
    ),
    events_pb2.VmLost(vm="vm-1", reason="forged"),
    events_pb2.VmDefined(spec=common_pb2.VmSpec(name="vm-2", memory_mib=64, vcpus=1)),
    events_pb2.CoordinatorStarted(epoch=2**63 - 1),
    events_pb2.HostDisconnected(host_id="host-a", generation=1, reason="forged"),
]


@pytest.mark.parametrize("forged", FORGED_DECISIONS, ids=lambda p: p.DESCRIPTOR.name)
async def test_a_forged_decision_is_refused_and_nothing_is_logged(
    coordinator: Running, sim_hosts: SimHosts, forged: Message
) -> None:
    """A host that sends a coordinator's event (a command, a migration's end, a loss, a
    definition, an epoch, another host's disconnect) has its stream refused."""
    hosts = await _running_vm(coordinator, sim_hosts)
    epoch = coordinator.app.world.epoch
    details = await _refused(coordinator, hosts[2], forged)
    assert forged.DESCRIPTOR.name in details and "not an observation" in details
    world = coordinator.app.world
    assert world.epoch == epoch and "vm-2" not in world.vms
    assert world.vms["vm-1"].status == 3 and world.hosts["host-a"].connected
    await _stop(hosts)


async def test_a_whole_batch_is_refused_for_one_forged_payload(
    coordinator: Running, sim_hosts: SimHosts
) -> None:
    """An allowed observation sent together with a forged one is not logged either."""
    hosts = await _running_vm(coordinator, sim_hosts)
    exited = events_pb2.QemuExited(vm="vm-1", reason="allowed on its own")
    await _refused(coordinator, hosts[2], exited, events_pb2.VmLost(vm="vm-1", reason="forged"))
    await _stop(hosts)


async def _migration_waiting_for_host_b(
    coordinator: Running, sim_hosts: SimHosts
) -> tuple[list[SimHostd], events_pb2.CommandSucceeded]:
    """A migration of vm-1 to host-b whose PREPARE_INCOMING host-b holds unanswered; returns
    the answer host-b would give."""
    hosts = await _running_vm(coordinator, sim_hosts)
    host_b = hosts[1]
    host_b.answer = False
    migrations = migration_pb2_grpc.MigrationServiceStub(coordinator.channel)
    await migrations.StartMigration(
        migration_pb2.StartMigrationRequest(vm="vm-1", destination="host-b", migration_id="m-1")
    )
    await wait_until(lambda: len(host_b.commands) == 1, coordinator.app, host_b)
    command = host_b.commands[0]
    answer = events_pb2.CommandSucceeded(
        command_id=command.command_id,
        attempt=command.attempt,
        kind=command.kind,
        vm=command.vm,
        result=events_pb2.CommandResult(uri="tcp:127.0.0.1:1"),
    )
    return hosts, answer


@pytest.mark.parametrize("answerer", ["host-a", "host-c"])
async def test_an_answer_to_another_hosts_command_is_refused(
    coordinator: Running, sim_hosts: SimHosts, answerer: str
) -> None:
    """Only the host a command was issued to may answer it, even the migration's other side."""
    hosts, answer = await _migration_waiting_for_host_b(coordinator, sim_hosts)
    forger = next(h for h in hosts if h.host_id == answerer)
    details = await _refused(coordinator, forger, answer)
    assert "CommandSucceeded" in details and "was issued to host-b" in details
    command = coordinator.app.world.migrations["m-1"].commands[answer.command_id]
    assert command.state.value == "issued" and coordinator.app.world.migrations["m-1"].attempt == 1
    await _stop(hosts)


async def test_an_answer_under_another_attempt_is_refused(
    coordinator: Running, sim_hosts: SimHosts
) -> None:
    """The host a command was issued to may not answer it under another attempt."""
    hosts, answer = await _migration_waiting_for_host_b(coordinator, sim_hosts)
    answer.attempt += 1
    details = await _refused(coordinator, hosts[1], answer)
    assert "attempt 1, not 2" in details
    await _stop(hosts)


async def test_an_answer_the_world_no_longer_tracks_is_dropped_not_refused(
    coordinator: Running, sim_hosts: SimHosts
) -> None:
    """hostd answers a repeated command id with its stored result: a second answer to a VM
    command already answered changes nothing, is acknowledged and not logged, and the stream
    stays open (refusing it would lock the host out: hostd re-sends until acknowledged)."""
    hosts = await _running_vm(coordinator, sim_hosts)
    host_a, app = hosts[0], coordinator.app
    start = host_a.commands[0]
    await wait_until(lambda: host_a.acked == host_a.seq, app, host_a)
    async with app.reading():
        head = app.store.head()[0]
    host_a.report(
        events_pb2.CommandSucceeded(
            command_id=start.command_id, attempt=start.attempt, kind=start.kind, vm=start.vm
        )
    )
    await wait_until(lambda: host_a.acked == host_a.seq, app, host_a)
    async with app.reading():
        assert app.store.head()[0] == head
    assert host_a.error is None and app.world.hosts["host-a"].connected
    await _stop(hosts)


LEASE_FACTS = [
    events_pb2.LeaseAcquired(vm="vm-1", holder="host-c", generation=2),
    events_pb2.LeaseAcquired(vm="vm-1", holder="host-a", generation=2),
    events_pb2.LeaseReleased(vm="vm-1", holder="host-a", generation=1),
    events_pb2.QmpEventReceived(vm="vm-1", event="RESUME", data_json="{}"),
    events_pb2.VmObserved(
        observation=common_pb2.VmObservation(vm="vm-1", process_alive=True, runstate="running")
    ),
    events_pb2.NetworkChanged(vm="vm-1", state=events_pb2.NETWORK_STATE_ENABLED),
]


@pytest.mark.parametrize("fact", LEASE_FACTS, ids=lambda p: p.DESCRIPTOR.name)
async def test_a_fact_about_another_hosts_vm_is_refused(
    coordinator: Running, sim_hosts: SimHosts, fact: Message
) -> None:
    """A host may not take, release or claim a VM that runs on another host."""
    hosts = await _running_vm(coordinator, sim_hosts)
    vm = coordinator.app.world.vms["vm-1"]
    before = (vm.lease_holder, vm.lease_generation, dict(vm.runstates))
    details = await _refused(coordinator, hosts[2], fact)
    assert fact.DESCRIPTOR.name in details
    assert (vm.lease_holder, vm.lease_generation, dict(vm.runstates)) == before
    await _stop(hosts)


async def test_a_lease_generation_above_any_handed_out_is_refused(
    coordinator: Running, sim_hosts: SimHosts
) -> None:
    """Even the VM's own host may not report a lease generation nobody handed out."""
    hosts = await _running_vm(coordinator, sim_hosts)
    forged = events_pb2.LeaseAcquired(vm="vm-1", holder="host-a", generation=2**63 - 1)
    details = await _refused(coordinator, hosts[0], forged)
    assert "above the highest handed out (1)" in details
    assert coordinator.app.world.vms["vm-1"].lease_generation == 1
    await _stop(hosts)


async def test_a_snapshot_stamped_beyond_the_clock_bound_is_refused(
    coordinator: Running, sim_hosts: SimHosts
) -> None:
    """The VM's own host may not stamp a snapshot an hour ahead: its later QMP events would be
    read as older than it and ignored."""
    hosts = await _running_vm(coordinator, sim_hosts)
    ahead_us = time.time_ns() // 1000 + 3600 * 1_000_000
    observation = common_pb2.VmObservation(
        vm="vm-1", process_alive=True, qmp_reachable=True, runstate="running",
        queried_at_us=ahead_us,
    )  # fmt: skip
    details = await _refused(coordinator, hosts[0], events_pb2.VmObserved(observation=observation))
    assert "leads the coordinator's clock by 3600" in details
    await _stop(hosts)


@pytest.mark.parametrize("host_id", ["host-a", "host-new"])
async def test_a_hello_whose_generation_leaps_is_refused(
    coordinator: Running, sim_hosts: SimHosts, host_id: str
) -> None:
    """A Hello may not raise its host's generation by more than the bound: the real hostd,
    with its lower generation, would be locked out for good."""
    hosts = await _running_vm(coordinator, sim_hosts)
    app = coordinator.app
    async with app.reading():
        head = app.store.head()[0]
    known = app.world.hosts.get(host_id)
    stored = known.generation if known is not None else 0
    leap = SimHostd(host_id, coordinator.channel, sim_hosts, generation=2**63 - 1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await leap.start()
    assert err.value.code() == DENIED and "leaps beyond" in str(err.value.details())
    just_too_far = SimHostd(
        host_id, coordinator.channel, sim_hosts, generation=stored + MAX_GENERATION_JUMP + 1
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await just_too_far.start()
    assert err.value.code() == DENIED
    async with app.reading():
        assert app.store.head()[0] == head
    if known is not None:
        assert app.world.hosts[host_id].generation == stored and known.connected
    else:
        assert host_id not in app.world.hosts
    await _stop(hosts)


@pytest.mark.parametrize(
    "uri", ["exec:sh -c 'touch /tmp/pwned'", "unix:/run/x.sock", "tcp:10.0.0.9:4444,ipv6=on"]
)
async def test_a_migration_uri_other_than_tcp_is_refused(
    coordinator: Running, sim_hosts: SimHosts, uri: str
) -> None:
    """The destination's PREPARE_INCOMING answer becomes the source's migrate URI: anything but
    tcp:ADDRESS:PORT (a shell command, a socket, extra options) is refused."""
    hosts, answer = await _migration_waiting_for_host_b(coordinator, sim_hosts)
    answer.result.uri = uri
    details = await _refused(coordinator, hosts[1], answer)
    assert "is not tcp:ADDRESS:PORT" in details
    assert coordinator.app.world.migrations["m-1"].incoming_uri == ""
    await _stop(hosts)


async def test_a_vm_missing_from_a_hello_is_read_as_no_qemu_there(
    coordinator: Running, sim_hosts: SimHosts
) -> None:
    """A restarted host whose hello leaves out a VM the log believes runs there (it lost its
    state, or the QEMU died meanwhile) has no QEMU for it: the coordinator records that as the
    host's observation, and the VM is lost with that reason (so its on_lost policy applies)."""
    hosts = await _running_vm(coordinator, sim_hosts)
    app = coordinator.app
    await hosts[0].stop()
    await wait_until(lambda: not app.world.hosts["host-a"].connected, app)
    assert app.world.vms["vm-1"].runstates == {"host-a": "running"}
    restarted = SimHostd("host-a", coordinator.channel, sim_hosts, generation=2)
    await restarted.start()
    vm = app.world.vms["vm-1"]
    await wait_until(lambda: "host-a" not in vm.runstates, app, restarted)
    async with app.reading():
        observed = [codec.from_stored(e) for e in app.store.read(from_seq=1)]
    gone = [e for e in observed if e.type == "VmObserved" and e.origin_host == "host-a"]
    assert [(e.payload.observation.vm, e.payload.observation.process_alive, e.payload.reason)
            for e in gone] == [("vm-1", False, "hello: not listed")]  # fmt: skip
    assert vm.status == vm_pb2.VM_STATUS_LOST
    assert vm.lost_reason == "QEMU on host-a found gone, unasked (hello: not listed)"
    await _stop([restarted, *hosts[1:]])
