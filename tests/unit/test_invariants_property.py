"""Property: whatever hosts do (fail, reorder, drop, repeat, die, pause), the decisions keep
invariants 1-4 of DESIGN.md, as judged by the independent InvariantChecker."""

from __future__ import annotations

import contextlib

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from coordinator.core import CoreError
from coordinator.core import inputs as I
from coordinator.core.invariants import InvariantChecker
from coordinator.core.state import Kind
from tests.unit.helpers import fresh
from tools.sim import TICK_US, Observation, migration, qmp
from whimbrel.v1 import common_pb2 as C
from whimbrel.v1 import events_pb2 as E

PROGRESS = ["answer"] * 8 + ["answer_any", "converge", "converge", "complete", "complete", "tick"]
FAULTS = [
    "fail",
    "drop",
    "duplicate",
    "kill_source",
    "kill_destination",
    "pause",
    "abort",
    "postcopy",
    "disconnect",
    "reconnect",
]
MODES = [C.MIGRATION_MODE_PRECOPY, C.MIGRATION_MODE_POSTCOPY, C.MIGRATION_MODE_AUTO]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_host_behaviour_never_breaks_invariants_1_to_4(data: st.DataObject) -> None:
    """Random host answers and faults never lead the core to an unsafe decision."""
    driver, hosts = fresh()
    mode = data.draw(st.sampled_from(MODES))
    # Per example, how often faults happen: never, now and then, or often.
    actions = PROGRESS + FAULTS * data.draw(st.sampled_from([0, 1, 4]))
    driver.request(
        I.StartMigration("m-1", "vm-1", "host-b", mode, E.MigrationPolicy(), driver.now_us)
    )
    m = driver.world.migrations["m-1"]
    pending: list[E.CommandIssued] = []
    answered: list[E.CommandIssued] = []
    for _ in range(data.draw(st.integers(5, 80))):
        pending += [
            e.payload for e in driver.advance("m-1") if isinstance(e.payload, E.CommandIssued)
        ]
        action = data.draw(st.sampled_from(actions))
        if action in ("answer", "answer_any", "fail", "drop") and pending:
            index = data.draw(st.integers(0, len(pending) - 1)) if action == "answer_any" else 0
            cmd = pending.pop(index)
            if action == "fail":
                driver.observe(
                    Observation(
                        cmd.host_id,
                        E.CommandFailed(
                            command_id=cmd.command_id,
                            attempt=cmd.attempt,
                            kind=cmd.kind,
                            vm=cmd.vm,
                            error="injected",
                        ),
                    )
                )
            elif action != "drop":
                driver.observe(*hosts.answer(cmd))
                answered.append(cmd)
                if Kind(cmd.kind) == Kind.START_MIGRATION:
                    driver.observe(migration("host-b", "vm-1", "active"))
        elif action == "duplicate" and answered:
            # hostd answers a repeated command id with the stored result, never re-executing it.
            driver.observe(hosts.answer(answered[-1])[-1])
        elif action == "kill_source":
            driver.observe(hosts.kill("vm-1", "host-a"))
        elif action == "kill_destination" and m.incoming_uri:
            driver.observe(hosts.kill("vm-1", "host-b"))
        elif action == "converge" and m.src.status == "active" and not m.postcopy_started:
            driver.observe(
                qmp("host-a", "vm-1", "STOP"),
                migration("host-a", "vm-1", "pre-switchover"),
                # what hostd does by itself there (continue; release once completed)
                *hosts.switchover("host-a", "vm-1", "pre-switchover"),
            )
        elif action == "tick":
            driver.now_us += TICK_US  # the coordinator's clock: reports overdue are covered
        elif action == "pause" and m.postcopy_started and m.src.alive and m.dst.alive:
            driver.observe(
                migration("host-a", "vm-1", "postcopy-paused"),
                migration("host-b", "vm-1", "postcopy-paused"),
            )
        elif action == "complete" and m.postcopy_started and m.src.status == "postcopy-active":
            driver.observe(
                migration("host-a", "vm-1", "completed"), migration("host-b", "vm-1", "completed")
            )
        elif action in ("abort", "postcopy"):
            request = (
                I.AbortMigration("m-1", "test", driver.now_us)
                if action == "abort"
                else I.SwitchToPostcopy("m-1", driver.now_us)
            )
            with contextlib.suppress(CoreError):
                driver.request(request)
        elif action == "disconnect":
            host = data.draw(st.sampled_from(["host-a", "host-b"]))
            driver.observe(Observation(host, E.HostDisconnected(host_id=host, generation=1)))
        elif action == "reconnect":
            driver.connect(data.draw(st.sampled_from(["host-a", "host-b"])))
    event(f"ended {m.phase.label}{', past the point of no return' if m.cont_issued else ''}")
    checker = InvariantChecker()
    violations = checker.check(driver.log) + checker.unsettled_acquires()
    assert violations == [], "\n".join(
        f"{e.seq} {e.origin_host} {e.type} {e.payload}".replace("\n", " ") for e in driver.log
    )


def test_checker_flags_an_early_cont() -> None:
    """The checker is a real witness: an early cont is reported as invariants 1, 2 and 4 (sent
    to a host without the lease)."""
    driver, _hosts = fresh()
    driver.request(I.StartMigration("m-1", "vm-1", "host-b", 1, E.MigrationPolicy(), driver.now_us))
    early = E.CommandIssued(
        command_id="x",
        migration_id="m-1",
        attempt=1,
        host_id="host-b",
        vm="vm-1",
        kind=Kind.RESUME_VM,
    )
    from coordinator.core import NewEvent

    driver.append([NewEvent("migration/m-1", early, driver.now_us)])
    violations = InvariantChecker().check(driver.log)
    by_invariant = {v.invariant: v.message for v in violations}
    assert set(by_invariant) == {1, 2, 4}
    assert "source stopped" in by_invariant[2] and "runs on host-a" in by_invariant[1]
    assert "lease is held by host-a" in by_invariant[4]


def test_checker_flags_a_fence_of_a_healthy_destination() -> None:
    """Invariant 10: a fence naming a destination that completed loading and runs kills a
    healthy VM; the same fence before the destination completed is no violation."""
    from coordinator.core import NewEvent

    driver, hosts = fresh()
    driver.request(I.StartMigration("m-1", "vm-1", "host-b", 1, E.MigrationPolicy(), driver.now_us))
    driver.run("m-1", hosts)
    assert InvariantChecker().check(driver.log) == []
    # Forged after the fact: the destination completed and runs, yet it is fenced.
    fence = E.FencingDecided(migration_id="m-1", vm="vm-1", hosts=["host-b"], reason="forged")
    before = len(driver.log)
    driver.append([NewEvent("migration/m-1", fence, driver.now_us)])
    violations = InvariantChecker().check(driver.log)
    assert [(v.seq, v.invariant) for v in violations] == [(driver.log[before].seq, 10)]
    assert "host-b" in violations[0].message and "healthy VM killed" in violations[0].message


def test_checker_names_both_ends_of_a_source_running_without_its_lease() -> None:
    """Invariant 4 names the RESUME (the violation's seq) and the release it followed."""
    driver, _hosts = fresh()
    released = E.LeaseReleased(vm="vm-1", holder="host-a", generation=1)
    driver.observe(Observation("host-a", released))
    release_seq = driver.log[-1].seq
    driver.observe(qmp("host-a", "vm-1", "RESUME"))
    violations = [v for v in InvariantChecker().check(driver.log) if v.invariant == 4]
    assert [v.seq for v in violations] == [driver.log[-1].seq]
    assert f"released (since seq {release_seq})" in violations[0].message


def test_checker_flags_a_source_seen_running_after_the_cont_intent() -> None:
    """Invariant 3 from observation, not only from commands: the source's QMP RESUME after
    the destination's cont intent is flagged, even though no command resumed it."""
    driver, hosts = fresh()
    driver.request(I.StartMigration("m-1", "vm-1", "host-b", 1, E.MigrationPolicy(), driver.now_us))
    for _ in range(30):
        issued = [e for e in driver.advance("m-1") if e.type == "CommandIssued"]
        if any(Kind(e.payload.kind) == Kind.RESUME_VM for e in issued):
            break
        for e in issued:
            driver.answered.add(e.payload.command_id)
            driver.observe(*hosts.answer(e.payload))
            driver._progress("m-1", e.payload, hosts)
    else:
        raise AssertionError("cont was never issued")
    assert InvariantChecker().check(driver.log) == []
    driver.observe(qmp("host-a", "vm-1", "RESUME"))
    resumed_at = driver.log[-1].seq
    flagged = [(v.seq, v.invariant) for v in InvariantChecker().check(driver.log)]
    assert (resumed_at, 3) in flagged


def test_an_acquire_logged_before_the_holders_release_is_settled_by_it() -> None:
    """Shell simulation seed 5390: the lockspace refuses a held lease, so host-a's acquire
    came after host-c's release; host-c's stream delivered that release later than host-a's
    stream delivered the acquire. The release settles it; without one it is a violation."""
    driver, _hosts = fresh()
    held = E.LeaseReleased(vm="vm-1", holder="host-a", generation=1)
    c_acquired = E.LeaseAcquired(vm="vm-1", holder="host-c", generation=4)
    a_acquired = E.LeaseAcquired(vm="vm-1", holder="host-a", generation=5)
    from coordinator.core import NewEvent

    # Both acquires handed out once host-a let go (what the race needs: two issued generations).
    driver.observe(Observation("host-a", held))
    for host, generation in (("host-c", 4), ("host-a", 5)):
        acquire = E.CommandIssued(
            command_id=f"vm/vm-1/acquire-{host}", host_id=host, vm="vm-1",
            kind=Kind.ACQUIRE_LEASE, args=E.CommandArgs(lease_generation=generation),
        )  # fmt: skip
        driver.append([NewEvent("vm/vm-1", acquire, driver.now_us)])
    driver.observe(Observation("host-c", c_acquired))
    driver.observe(Observation("host-a", a_acquired))
    acquire_seq = driver.log[-1].seq
    unsettled = InvariantChecker()
    assert unsettled.check(driver.log) == []
    assert [(v.seq, v.invariant) for v in unsettled.finish(quiescent=True) if v.invariant == 4] == [
        (acquire_seq, 4)
    ]
    (lease,) = [v for v in unsettled.violations if v.invariant == 4]
    assert "host-a acquired the lease of vm-1 held by host-c" in lease.message
    c_released = E.LeaseReleased(vm="vm-1", holder="host-c", generation=4)
    driver.observe(Observation("host-c", c_released))
    settled = InvariantChecker()
    settled.check(driver.log)
    assert [v for v in settled.finish(quiescent=True) if v.invariant == 4] == []
