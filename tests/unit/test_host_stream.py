"""The host-stream rules on a folded world, without gRPC: late reports after a migration are
still the host's to make, giving up is always allowed, claims about another host's VM are not,
and payloads about what the world does not know are moot."""

from __future__ import annotations

from coordinator.core import inputs as I
from coordinator.core.state import World
from coordinator.host_stream import (
    MAX_CLOCK_LEAD_US,
    MAX_GENERATION_JUMP,
    check_batch,
    check_hello,
    check_stamps,
    moot,
)
from hostd.event_budget import DROPPED_EVENT
from tools.sim import Driver, Observation, SimHosts, migration, running_vm
from whimbrel import protocol
from whimbrel.v1 import common_pb2, events_pb2, host_pb2


def completed_migration() -> World:
    """vm-1 migrated from host-a to host-b, completed; host-c connected and never involved."""
    return completed_migration_driver().world


def completed_migration_driver() -> Driver:
    driver = Driver()
    driver.connect("host-a", "host-b", "host-c")
    running_vm(driver)
    hosts = SimHosts()
    hosts.leases["vm-1"] = ("host-a", 1)
    policy = events_pb2.MigrationPolicy()
    driver.request(I.StartMigration("m-1", "vm-1", "host-b", 2, policy, driver.now_us))
    driver.run("m-1", hosts)
    driver.observe(*[migration(h, "vm-1", "completed") for h in ("host-a", "host-b")])
    driver.run("m-1", hosts)
    assert "m-1" not in driver.world.open_migrations
    return driver


def stop(vm: str = "vm-1") -> events_pb2.QmpEventReceived:
    return events_pb2.QmpEventReceived(vm=vm, event="STOP", data_json="{}")


def test_the_source_of_the_latest_migration_may_still_report_on_the_vm() -> None:
    """After completion the source no longer runs the VM; what its QEMU said on the way out
    still belongs to it."""
    world = completed_migration()
    assert "host-a" not in world.vms["vm-1"].runstates
    assert check_batch(world, "host-a", [stop()]) is None
    assert check_batch(world, "host-b", [stop()]) is None


def test_an_uninvolved_host_may_give_up_but_not_claim() -> None:
    world = completed_migration()
    giving_up = [
        events_pb2.QemuExited(vm="vm-1", reason="exited"),
        events_pb2.NetworkChanged(vm="vm-1", state=events_pb2.NETWORK_STATE_RELEASED),
        events_pb2.LeaseReleased(vm="vm-1", holder="host-c", generation=1),
    ]
    assert check_batch(world, "host-c", giving_up) is None
    refusal = check_batch(world, "host-c", [*giving_up, stop()])
    assert refusal is not None and refusal.payload_type == "QmpEventReceived"
    assert "not run by host-c" in refusal.reason
    releasing_for_another = events_pb2.LeaseReleased(vm="vm-1", holder="host-b", generation=2)
    assert check_batch(world, "host-c", [releasing_for_another]) is not None


def test_payloads_about_what_the_world_does_not_know_are_moot() -> None:
    world = completed_migration()
    unknown_vm = stop("vm-never-defined")
    unknown_command = events_pb2.CommandSucceeded(command_id="m-1/1/99-resume-vm", vm="vm-1")
    for payload in (unknown_vm, unknown_command):
        assert moot(world, "host-c", payload)
        assert check_batch(world, "host-c", [payload]) is None
    assert not moot(world, "host-c", stop())


def test_a_record_only_event_from_a_host_no_longer_involved_is_moot() -> None:
    """hostd reports the record-only QMP events it dropped (a guest resetting in a loop) a
    period after the drops, so the report can come after the stop that ended the host's
    involvement with the VM. Refusing it locked the host out for good (hostd re-sends it on
    every reconnect; review of 74d7c2a): it changes nothing, so it is dropped. An event the
    coordinator acts on is still refused from a host that does not run the VM."""
    driver = Driver()
    driver.connect("host-a", "host-c")
    running_vm(driver)
    hosts = SimHosts()
    hosts.leases["vm-1"] = ("host-a", 1)
    (_, issued) = driver.request(I.StopVm("vm-1", False, driver.now_us))
    driver.observe(*hosts.answer(issued.payload))
    world = driver.world
    assert (world.vms["vm-1"].host, world.vms["vm-1"].runstates) == ("", {})
    report = events_pb2.QmpEventReceived(
        vm="vm-1", event=DROPPED_EVENT, data_json='{"dropped": {"RESET": 31}, "period_s": 1.0}'
    )
    reset = events_pb2.QmpEventReceived(vm="vm-1", event="RESET", data_json="{}")
    for payload in (report, reset):
        assert moot(world, "host-a", payload)
        assert check_batch(world, "host-a", [payload]) is None
    assert not moot(world, "host-a", stop())
    assert check_batch(world, "host-a", [stop()]) is not None


def second_migration_open() -> World:
    """After completed_migration: vm-1 on host-b, migrating on to host-c (open)."""
    driver = completed_migration_driver()
    driver.connect("host-d")
    policy = events_pb2.MigrationPolicy()
    driver.request(I.StartMigration("m-2", "vm-1", "host-c", 2, policy, driver.now_us))
    assert driver.world.vms["vm-1"].migration_id == "m-2"
    return driver.world


def test_a_former_sides_late_reports_are_moot_not_refused() -> None:
    """host-a was m-1's source; its hostd re-sends what it recorded then (its outbox after a
    reconnect) while m-2 runs between other hosts. Refusing would lock host-a out for good, as
    it re-sends them on every reconnect: they are dropped. A snapshot of a live QEMU is logged;
    a host never involved is still refused, and a lease taken is never dropped unseen."""
    world = second_migration_open()
    stale = [
        stop(),
        events_pb2.MigrationStatsSampled(vm="vm-1", status="completed"),
        events_pb2.NetworkChanged(vm="vm-1", state=events_pb2.NETWORK_STATE_ENABLED),
    ]
    for payload in stale:
        assert moot(world, "host-a", payload), payload
        assert check_batch(world, "host-a", [payload]) is None
    # A live QEMU there is logged: a stray the coordinator destroys, not one it never hears of.
    alive = events_pb2.VmObserved(
        observation=common_pb2.VmObservation(vm="vm-1", process_alive=True, runstate="inmigrate")
    )
    assert not moot(world, "host-a", alive)
    assert check_batch(world, "host-a", [alive]) is None
    assert check_batch(world, "host-d", [alive]) is not None
    exited = events_pb2.VmObserved(observation=common_pb2.VmObservation(vm="vm-1"))
    assert not moot(world, "host-a", exited)  # giving up is logged, as from anyone
    assert not moot(world, "host-d", stop())
    assert check_batch(world, "host-d", [stop()]) is not None
    grab = events_pb2.LeaseAcquired(vm="vm-1", holder="host-a", generation=2)
    assert not moot(world, "host-a", grab)
    assert check_batch(world, "host-a", [grab]) is not None


def test_a_hello_may_raise_the_generation_by_the_bound_and_no_more() -> None:
    world = completed_migration()
    stored = world.hosts["host-a"].generation
    near = host_pb2.Hello(host_id="host-a", generation=stored + MAX_GENERATION_JUMP)
    assert check_hello(world, near, NOW_US) is None
    far = host_pb2.Hello(host_id="host-a", generation=stored + MAX_GENERATION_JUMP + 1)
    refusal = check_hello(world, far, NOW_US)
    assert refusal is not None and "leaps beyond" in str(refusal)


NOW_US = 1_800_000_000_000_000


def observed(queried_at_us: int) -> events_pb2.VmObserved:
    observation = common_pb2.VmObservation(
        vm="vm-1", process_alive=True, qmp_reachable=True, queried_at_us=queried_at_us
    )
    return events_pb2.VmObserved(observation=observation)


def stamped(seq: int, time_us: int, payload: events_pb2.VmObserved) -> host_pb2.HostEvent:
    return host_pb2.HostEvent(
        seq=seq, time_us=time_us, payload=events_pb2.EventPayload(vm_observed=payload)
    )


def test_a_stamp_may_lead_the_clock_by_the_bound_and_no_more() -> None:
    """A snapshot stamped far ahead would make the host's later QMP events read as history."""
    limit = NOW_US + MAX_CLOCK_LEAD_US
    assert check_stamps("host-a", [stamped(1, limit, observed(limit))], NOW_US) is None
    # Old stamps are fine: a reconnecting hostd re-sends what it recorded long ago.
    assert check_stamps("host-a", [stamped(1, 1, observed(1))], NOW_US) is None
    ahead_query = check_stamps("host-a", [stamped(7, NOW_US, observed(limit + 1))], NOW_US)
    assert ahead_query is not None and ahead_query.payload_type == "VmObserved"
    assert "seq 7: its time leads the coordinator's clock by 60.0 s" in ahead_query.reason
    ahead_event = check_stamps("host-a", [stamped(3, limit + 1, observed(0))], NOW_US)
    assert ahead_event is not None and "seq 3" in ahead_event.reason
    negative = check_stamps("host-a", [stamped(2, NOW_US, observed(-1))], NOW_US)
    assert negative is not None and "negative" in negative.reason


def test_a_hellos_snapshots_are_held_to_the_same_bound() -> None:
    world = completed_migration()
    generation = world.hosts["host-a"].generation
    ahead = observed(NOW_US + MAX_CLOCK_LEAD_US + 1).observation
    hello = host_pb2.Hello(host_id="host-a", generation=generation, vms=[ahead])
    refusal = check_hello(world, hello, NOW_US)
    assert refusal is not None and "the snapshot of vm-1: its time leads" in refusal.reason
    hello.vms[0].queried_at_us = NOW_US
    assert check_hello(world, hello, NOW_US) is None


def test_a_qmp_event_whose_data_is_not_a_bounded_json_object_is_refused() -> None:
    """The fold reads statuses and pass numbers from a QMP event's data; data hostd never
    sends (not JSON, not an object, beyond the bound) made it raise in the coordinator's fold.
    The stream refuses it, naming it, as it refuses any payload a host may not send."""
    world = completed_migration()
    for data_json in ("not json", "[1, 2]", '"x"', "{" * 5000, '{"d": "' + "x" * 70_000 + '"}'):
        payload = events_pb2.QmpEventReceived(vm="vm-1", event="MIGRATION", data_json=data_json)
        refusal = check_batch(world, "host-b", [payload])
        assert refusal is not None and "not a JSON object" in refusal.reason, data_json[:20]
    assert check_batch(world, "host-b", [stop()]) is None


def test_a_qmp_event_named_as_no_qemu_event_is_refused() -> None:
    """A name of any length went into the log as hostd forwarded it (3 MB in one event)."""
    world = completed_migration()
    for name in ("stop", "RE SET", "A" * 65, ""):
        payload = events_pb2.QmpEventReceived(vm="vm-1", event=name, data_json="{}")
        refusal = check_batch(world, "host-b", [payload])
        assert refusal is not None and "event name is none of QEMU's" in refusal.reason, name
    named = events_pb2.QmpEventReceived(vm="vm-1", event="BLOCK_JOB_ERROR_2", data_json="{}")
    assert check_batch(world, "host-b", [named]) is None


def test_only_short_qmp_data_is_cached() -> None:
    """Every distinct data string was cached, up to 4096 of up to 64 KiB each: a QEMU sending
    large distinct data pinned 700 MB of the coordinator's memory in a review."""
    protocol._short_event_data.cache_clear()
    for n in range(50):
        assert protocol.qmp_event_data('{"d": "' + "x" * 1000 + str(n) + '"}') is not None
    assert protocol._short_event_data.cache_info().currsize == 0
    assert protocol.qmp_event_data('{"status": "active"}') == {"status": "active"}
    assert protocol._short_event_data.cache_info().currsize == 1


def test_the_fold_takes_odd_qmp_data_without_raising() -> None:
    """A log written before the stream refused such data still replays: odd data reads as
    none, an odd pass number as no pass."""
    driver = Driver()
    driver.connect("host-a", "host-b")
    running_vm(driver)
    hosts = SimHosts()
    hosts.leases["vm-1"] = ("host-a", 1)
    driver.request(I.StartMigration("m-1", "vm-1", "host-b", 1, events_pb2.MigrationPolicy(),
                                    driver.now_us))  # fmt: skip
    for data_json in ("not json", "[1]", '{"pass": "x"}', '{"pass": 1e400}', '{"pass": true}'):
        for event in ("MIGRATION", "MIGRATION_PASS"):
            driver.observe(
                Observation(
                    "host-a",
                    events_pb2.QmpEventReceived(vm="vm-1", event=event, data_json=data_json),
                )
            )
    assert driver.world.migrations["m-1"].progress.pass_ == 0
