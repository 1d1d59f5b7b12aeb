"""Migration limits and the fair queue, decided from the world alone (coordinator.core.scheduling),
and the audit's invariant 11 that checks them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.core import InvalidRequest, NewEvent, Phase
from coordinator.core import inputs as I
from coordinator.core.invariants import InvariantChecker
from coordinator.core.scheduling import DEFAULT_LIMITS, MAX_LIMIT, waiting
from tools.sim import Driver, Observation, SimHosts, running_vm
from whimbrel.v1 import common_pb2 as C
from whimbrel.v1 import events_pb2 as E

HOSTS = ("host-a", "host-b", "host-c", "host-d", "host-e")


def cluster(limits: C.MigrationLimits | None, vms: dict[str, str]) -> tuple[Driver, SimHosts]:
    """Five connected hosts, each VM of `vms` running on its host, and `limits` set."""
    driver = Driver()
    driver.connect(*HOSTS)
    hosts = SimHosts()
    for name, host in vms.items():
        running_vm(driver, name, host)
        hosts.leases[name] = (host, 1)
    if limits is not None:
        driver.request(I.SetMigrationLimits(limits, "test", driver.now_us))
    return driver, hosts


def migrate(driver: Driver, migration_id: str, vm: str, to: str) -> Phase:
    driver.request(
        I.StartMigration(
            migration_id, vm, to, C.MIGRATION_MODE_PRECOPY, E.MigrationPolicy(), driver.now_us
        )
    )
    driver.advance(migration_id)
    return driver.world.migrations[migration_id].phase


def limits(cluster: int = 0, out: int = 0, into: int = 0) -> C.MigrationLimits:
    return C.MigrationLimits(cluster=cluster, per_host_outbound=out, per_host_inbound=into)


def test_a_migration_beyond_the_outbound_limit_waits_and_starts_when_room_is_made():
    driver, hosts = cluster(limits(out=1), {"vm-1": "host-a", "vm-2": "host-a"})
    assert migrate(driver, "m-1", "vm-1", "host-b") == Phase.PREPARING
    assert migrate(driver, "m-2", "vm-2", "host-c") == Phase.QUEUED
    assert waiting(driver.world) == {"m-2": "host-a: 1 outbound migration running (limit 1)"}
    # Nothing was asked of any host for the queued one.
    assert not driver.world.migrations["m-2"].commands
    driver.run("m-1", hosts)
    assert driver.world.migrations["m-1"].phase == Phase.COMPLETED
    assert waiting(driver.world) == {"m-2": ""}  # room now: the coordinator admits it
    admitted = driver.advance("m-2")
    assert [e.type for e in admitted[:2]] == ["MigrationAdmitted", "CommandIssued"]
    assert admitted[0].payload.running_out_of_source == 1
    driver.run("m-2", hosts)
    assert driver.world.migrations["m-2"].phase == Phase.COMPLETED
    assert InvariantChecker().check_quiescent(driver.log) == []


def test_the_inbound_and_cluster_limits_hold_too():
    vms = {"vm-1": "host-a", "vm-2": "host-b", "vm-3": "host-c"}
    driver, _ = cluster(limits(into=1), vms)
    assert migrate(driver, "m-1", "vm-1", "host-d") == Phase.PREPARING
    assert migrate(driver, "m-2", "vm-2", "host-d") == Phase.QUEUED
    assert waiting(driver.world)["m-2"] == "host-d: 1 inbound migration running (limit 1)"
    driver, _ = cluster(limits(cluster=2), vms)
    assert migrate(driver, "m-1", "vm-1", "host-d") == Phase.PREPARING
    assert migrate(driver, "m-2", "vm-2", "host-e") == Phase.PREPARING
    assert migrate(driver, "m-3", "vm-3", "host-d") == Phase.QUEUED
    assert waiting(driver.world)["m-3"] == "cluster: 2 migrations running (limit 2)"


def test_the_queue_is_fair_without_head_of_line_blocking():
    """A queued migration holds back later ones only on its own hosts: m-2 waits for host-b's
    inbound slot, so m-3 may not take host-a's outbound slot it will need, while m-4, between
    other hosts, starts at once."""
    vms = {"vm-0": "host-c", "vm-1": "host-a", "vm-2": "host-a", "vm-3": "host-d"}
    driver, _ = cluster(limits(out=2, into=1), vms)
    assert migrate(driver, "m-1", "vm-0", "host-b") == Phase.PREPARING  # host-b inbound full
    assert migrate(driver, "m-2", "vm-1", "host-b") == Phase.QUEUED
    assert migrate(driver, "m-3", "vm-2", "host-c") == Phase.QUEUED
    assert migrate(driver, "m-4", "vm-3", "host-e") == Phase.PREPARING
    assert waiting(driver.world) == {
        "m-2": "host-b: 1 inbound migration running (limit 1)",
        "m-3": "host-a: an earlier queued migration waits to send from it",
    }


def test_raising_a_limit_admits_the_queue_in_order():
    driver, _ = cluster(limits(out=1), {"vm-1": "host-a", "vm-2": "host-a", "vm-3": "host-a"})
    migrate(driver, "m-1", "vm-1", "host-b")
    migrate(driver, "m-2", "vm-2", "host-c")
    migrate(driver, "m-3", "vm-3", "host-d")
    driver.request(I.SetMigrationLimits(limits(out=2), "more room", driver.now_us))
    assert waiting(driver.world) == {
        "m-2": "",
        "m-3": "host-a: 2 outbound migrations running (limit 2)",
    }


def test_a_host_that_is_not_connected_keeps_its_migrations_queued():
    driver, _ = cluster(limits(out=1), {"vm-1": "host-a", "vm-2": "host-a"})
    migrate(driver, "m-1", "vm-1", "host-b")
    migrate(driver, "m-2", "vm-2", "host-c")
    driver.observe(Observation("host-c", E.HostDisconnected(host_id="host-c", generation=1)))
    driver.request(I.SetMigrationLimits(limits(out=2), "", driver.now_us))
    assert waiting(driver.world) == {"m-2": "host-c: not connected"}
    assert driver.advance("m-2") == []


def test_an_aborted_queued_migration_ends_without_touching_a_host():
    driver, _ = cluster(limits(out=1), {"vm-1": "host-a", "vm-2": "host-a"})
    migrate(driver, "m-1", "vm-1", "host-b")
    migrate(driver, "m-2", "vm-2", "host-c")
    driver.request(I.AbortMigration("m-2", "changed my mind", driver.now_us))
    decided = driver.advance("m-2")
    assert [e.type for e in decided] == ["MigrationFinished"]
    m = driver.world.migrations["m-2"]
    assert m.phase == Phase.ROLLED_BACK and not m.commands
    assert driver.world.vms["vm-2"].host == "host-a"


def test_limits_above_the_maximum_are_refused_and_nothing_is_recorded():
    driver, _ = cluster(None, {})
    head = len(driver.log)
    with pytest.raises(InvalidRequest, match="per_host_inbound 10001 is above 10000"):
        driver.request(I.SetMigrationLimits(limits(into=MAX_LIMIT + 1), "", driver.now_us))
    assert len(driver.log) == head and driver.world.migration_limits is None
    assert DEFAULT_LIMITS.cluster == 5 and DEFAULT_LIMITS.per_host_outbound == 2


def test_the_checker_reports_a_start_beyond_a_limit():
    """Invariant 11 is a real witness: a log that starts a second migration out of a host whose
    outbound limit is 1 is reported, whether the start is an admission or a bare command."""
    driver, _ = cluster(limits(out=1), {"vm-1": "host-a", "vm-2": "host-a"})
    migrate(driver, "m-1", "vm-1", "host-b")
    migrate(driver, "m-2", "vm-2", "host-c")
    admitted = E.MigrationAdmitted(migration_id="m-2")
    forged = driver.append([NewEvent("migration/m-2", admitted, driver.now_us)])
    (violation,) = InvariantChecker().check(driver.log)
    assert violation.invariant == 11 and violation.seq == forged[0].seq
    assert "started while 1 migration ran out of host-a (limit 1)" in violation.message


@settings(max_examples=60, deadline=None)
@given(
    out=st.integers(0, 3),
    into=st.integers(0, 3),
    total=st.integers(0, 4),
    plan=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=12),
    finish_order=st.randoms(use_true_random=False),
)
def test_limits_are_never_exceeded_whatever_the_order(out, into, total, plan, finish_order):
    """Random migrations between five hosts, finishing in a random order, each queued one
    advanced whenever room is made: the independent checker never sees a limit exceeded, and
    every migration ends."""
    vms = {f"vm-{i}": HOSTS[src] for i, (src, _) in enumerate(plan)}
    driver, hosts = cluster(limits(total, out, into), vms)
    ids = []
    for i, (src, dst) in enumerate(plan):
        if src == dst:
            continue
        ids.append(f"m-{i}")
        migrate(driver, f"m-{i}", f"vm-{i}", HOSTS[dst])
    pending = list(ids)
    while pending:
        started = [mid for mid in pending if driver.world.migrations[mid].phase != Phase.QUEUED]
        assert started or not pending, "a queue with nothing running never moves"
        chosen = finish_order.choice(started)
        driver.run(chosen, hosts)
        pending.remove(chosen)
        for mid in pending:
            driver.advance(mid)
    assert all(driver.world.migrations[mid].phase == Phase.COMPLETED for mid in ids)
    assert InvariantChecker().check_quiescent(driver.log) == []


def test_limits_set_again_unchanged_record_nothing():
    """As a cordon: a request that changes nothing appends nothing (a script re-applying its
    limits every minute filled the log)."""
    driver, _ = cluster(limits(out=2), {})
    assert driver.request(I.SetMigrationLimits(limits(out=2), "again", driver.now_us)) == []
    (changed,) = driver.request(I.SetMigrationLimits(limits(out=3), "", driver.now_us))
    assert changed.payload.limits.per_host_outbound == 3
