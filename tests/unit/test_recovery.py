"""Recovery after a coordinator restart: nothing is decided for a migration until its hosts said
hello; a host that misses the bound is treated by the recovery table; stray copies are destroyed
when their host returns; a lost VM follows its policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.core import IllegalTransition, NewEvent, decide, recovery
from coordinator.core import inputs as I
from coordinator.core.invariants import InvariantChecker
from coordinator.core.state import Kind, Phase
from tests.unit.helpers import answer, decisions, fresh
from tools.sim import Driver, Observation, SimHosts, migration, qmp
from whimbrel.v1 import common_pb2
from whimbrel.v1 import events_pb2 as E

ROOT = Path(__file__).resolve().parents[2]


def restart(driver: Driver, *, missing: tuple[str, ...]) -> None:
    """The coordinator restarts: streams gone, recovery awaits both hosts, the present ones say
    hello, the bound expires for the missing ones."""
    for host in ("host-a", "host-b"):
        driver.observe(Observation(host, E.HostDisconnected(host_id=host, generation=1)))
    started = E.RecoveryStarted(open_migrations=["m-1"], awaited_hosts=["host-a", "host-b"])
    driver.append([NewEvent("coordinator", started, driver.now_us)])
    present = [h for h in ("host-a", "host-b") if h not in missing]
    if present:
        driver.connect(*present)
    assert driver.advance("m-1") == [] or not missing  # awaited hosts: nothing decided
    finished = E.RecoveryFinished(migrations_reconciled=1, missing_hosts=list(missing))
    driver.append([NewEvent("coordinator", finished, driver.now_us)])


def reconcile(driver: Driver, vm: str = "vm-1") -> list[str]:
    return decisions(driver.request(I.ReconcileVm(vm, driver.now_us)))


def start(driver: Driver, mode: int = common_pb2.MIGRATION_MODE_PRECOPY) -> None:
    driver.request(I.StartMigration("m-1", "vm-1", "host-b", mode, E.MigrationPolicy(), 1))


def test_docs_show_the_table_in_code() -> None:
    docs = (ROOT / "docs" / "recovery.md").read_text()
    assert recovery.render_table() in docs


def test_nothing_is_decided_while_a_host_is_awaited() -> None:
    driver, hosts = fresh()
    hosts.converge_after_passes = 0
    start(driver)
    driver.run("m-1", hosts)
    for host in ("host-a", "host-b"):
        driver.observe(Observation(host, E.HostDisconnected(host_id=host, generation=1)))
    started = E.RecoveryStarted(open_migrations=["m-1"], awaited_hosts=["host-a", "host-b"])
    driver.append([NewEvent("coordinator", started, driver.now_us)])
    driver.connect("host-a")
    # host-a's snapshot says the destination side is unknown; abort-worthy, but host-b may
    # still report: wait.
    driver.observe(migration("host-a", "vm-1", "active"))
    assert driver.advance("m-1") == []
    driver.connect("host-b")
    assert driver.world.awaited_hosts == set()


def test_destination_missing_before_the_switch_rolls_back_and_its_copy_dies_on_return() -> None:
    driver, hosts = fresh()
    hosts.converge_after_passes = 0  # stays in pre-copy
    start(driver)
    driver.run("m-1", hosts)
    assert driver.world.migrations["m-1"].phase == Phase.TRANSFERRING
    restart(driver, missing=("host-b",))
    rolled = driver.run("m-1", hosts)
    m = driver.world.migrations["m-1"]
    assert m.phase == Phase.ROLLED_BACK and "destination host-b did not return" in m.reason
    assert "RollbackDecided" in decisions(rolled)
    vm = driver.world.vms["vm-1"]
    assert (vm.host, vm.lease_holder) == ("host-a", "host-a")
    # host-b returns with its paused incoming QEMU: a stray copy, destroyed.
    driver.connect("host-b")
    hello = common_pb2.VmObservation(vm="vm-1", process_alive=True, runstate="inmigrate",
                                     qmp_reachable=True, migration_role="destination")  # fmt: skip
    driver.observe(Observation("host-b", E.VmObserved(observation=hello, reason="hello")))
    assert reconcile(driver) == ["destroy-vm@host-b"]
    assert reconcile(driver) == []  # one destroy in flight is enough
    assert InvariantChecker().check(driver.log) == []


def test_source_missing_after_a_completed_precopy_cont_completes_without_it() -> None:
    driver, hosts = fresh()
    start(driver)
    driver.run("m-1", hosts)
    m = driver.world.migrations["m-1"]
    assert m.phase == Phase.COMPLETED
    # Replay the same story, cut just after the destination resumed and both completed.
    driver2, hosts2 = fresh()
    start(driver2)
    for event in driver.log[len(driver2.log) :]:
        driver2.append([NewEvent(event.stream, event.payload, event.time_us, event.origin_host,
                                 event.origin_generation, event.origin_seq)])  # fmt: skip
        m2 = driver2.world.migrations["m-1"]
        if m2.dst_resumed and m2.dst.status == "completed":
            break
    assert driver2.world.migrations["m-1"].phase == Phase.FINISHING
    restart(driver2, missing=("host-a",))
    assert recovery.rule_for(driver2.world, m2).action == recovery.Action.COMPLETE
    driver2.run("m-1", hosts2)
    assert m2.phase == Phase.COMPLETED and "source host is missing" in m2.reason
    driver2.connect("host-a")
    assert reconcile(driver2) == ["destroy-vm@host-a"]


@pytest.mark.parametrize("missing", [("host-a",), ("host-b",), ("host-a", "host-b")])
def test_postcopy_past_the_point_of_no_return_waits_for_a_missing_host(missing) -> None:
    driver, hosts = fresh()
    start(driver, common_pb2.MIGRATION_MODE_POSTCOPY)
    driver.run("m-1", hosts)
    m = driver.world.migrations["m-1"]
    assert m.phase == Phase.FINISHING and m.cont_issued
    restart(driver, missing=missing)
    assert recovery.rule_for(driver.world, m).action == recovery.Action.WAIT
    assert driver.advance("m-1") == []
    # The host returns: the migration goes on to completion.
    driver.connect(*missing)
    driver.observe(
        migration("host-a", "vm-1", "completed"), migration("host-b", "vm-1", "completed")
    )
    driver.run("m-1", hosts)
    assert m.phase == Phase.COMPLETED
    assert InvariantChecker().check_quiescent(driver.log) == []


def test_lost_vm_cold_starts_on_the_lease_holder_when_asked() -> None:
    driver = Driver()
    driver.connect("host-a", "host-b")
    spec = common_pb2.VmSpec(name="vm-1", memory_mib=128, vcpus=1,
                             on_lost=common_pb2.LOST_VM_ACTION_COLD_START)  # fmt: skip
    driver.request(I.DefineVm(spec, driver.now_us))
    (boot,) = driver.request(I.StartVm("vm-1", "host-a", driver.now_us))
    hosts = SimHosts()
    driver.observe(*hosts.answer(boot.payload))
    start(driver, common_pb2.MIGRATION_MODE_POSTCOPY)
    driver.run("m-1", hosts)
    m = driver.world.migrations["m-1"]
    assert m.cont_issued and driver.world.vms["vm-1"].lease_holder == "host-b"
    # The source dies mid post-copy: the destination lacks pages; fenced, VM lost.
    driver.observe(hosts.kill("vm-1", "host-a"))
    driver.run("m-1", hosts)
    assert m.phase == Phase.FENCED
    vm = driver.world.vms["vm-1"]
    assert vm.status.name == "LOST"
    (cold,) = driver.request(I.ReconcileVm("vm-1", driver.now_us))
    assert isinstance(cold.payload, E.CommandIssued)
    assert (Kind(cold.payload.kind), cold.payload.host_id) == (Kind.START_VM, "host-b")
    assert cold.payload.args.lease_generation > m.dst_lease_generation
    driver.observe(*hosts.answer(cold.payload))
    assert (vm.status.name, vm.host) == ("RUNNING", "host-b")
    assert reconcile(driver) == []
    assert InvariantChecker().check(driver.log) == []


def test_lost_vm_stays_stopped_by_default() -> None:
    driver, hosts = fresh()
    start(driver, common_pb2.MIGRATION_MODE_POSTCOPY)
    driver.run("m-1", hosts)
    driver.observe(hosts.kill("vm-1", "host-a"))
    driver.run("m-1", hosts)
    assert driver.world.vms["vm-1"].status.name == "LOST"
    assert reconcile(driver) == []


def test_a_stray_running_copy_is_destroyed_but_never_the_home_one() -> None:
    driver, _ = fresh()
    assert reconcile(driver) == []
    driver.observe(qmp("host-b", "vm-1", "RESUME"))  # a copy that should not exist
    assert reconcile(driver) == ["destroy-vm@host-b"]


def _paused_postcopy() -> tuple[Driver, SimHosts]:
    driver, hosts = fresh()
    start(driver, common_pb2.MIGRATION_MODE_POSTCOPY)
    driver.run("m-1", hosts)
    assert driver.world.migrations["m-1"].cont_issued
    driver.observe(migration("host-a", "vm-1", "postcopy-paused"),
                   migration("host-b", "vm-1", "postcopy-paused"))  # fmt: skip
    return driver, hosts


def test_postcopy_recovery_retries_while_the_link_is_down_then_fences() -> None:
    """A resume that falls back to postcopy-paused is a failed attempt; after
    max_recovery_attempts both ends are fenced."""
    driver, hosts = _paused_postcopy()
    hosts.link_down = True
    events = driver.run("m-1", hosts)
    d = decisions(events)
    assert d.count("PostcopyRecoveryDecided") == 3
    # The destination stays postcopy-paused when no source reaches it: each attempt listens
    # again, and QEMU 7.2 accepts the repeat (the earlier listener given up).
    assert d.count("recover-incoming@host-b") == 3
    assert d.count("resume-migration@host-a") == 3
    m = driver.world.migrations["m-1"]
    assert m.phase == Phase.FENCED and "recovery failed 3 times" in m.reason
    assert InvariantChecker().check_quiescent(driver.log) == []


def test_postcopy_recovery_succeeds_once_the_link_is_back() -> None:
    driver, hosts = _paused_postcopy()
    hosts.link_down = True
    m = driver.world.migrations["m-1"]
    driver.advance("m-1")  # recovery attempt 1 decided: recover-incoming issued
    (recover,) = [c.issued for c in m.commands.values() if c.kind == Kind.RECOVER_INCOMING]
    driver.observe(*hosts.answer(recover))
    (resume,) = [e.payload for e in driver.advance("m-1") if isinstance(e.payload, E.CommandIssued)]
    driver.observe(*hosts.answer(resume))  # falls back to paused: attempt 1 failed
    assert m.recovery_failed
    hosts.link_down = False
    driver.run("m-1", hosts)
    assert m.phase == Phase.FINISHING and m.recovery_attempts == 2
    driver.observe(
        migration("host-a", "vm-1", "completed"), migration("host-b", "vm-1", "completed")
    )
    driver.run("m-1", hosts)
    assert m.phase == Phase.COMPLETED
    assert InvariantChecker().check_quiescent(driver.log) == []


def test_a_recovery_attempt_stuck_in_postcopy_recover_times_out_then_fences() -> None:
    """QEMU 7.2's source can sit in postcopy-recover for good: past the policy's attempt timeout
    (decided on the clock, the shell ticks) the attempt counts as failed; with the source unable
    to resume again, the bound is reached and both ends are fenced."""
    driver, hosts = _paused_postcopy()
    hosts.resume_hangs = True
    driver.run("m-1", hosts)
    m = driver.world.migrations["m-1"]
    assert (m.phase, m.src.status, m.recovery_attempts) == (Phase.POSTCOPY_PAUSED,
                                                            "postcopy-recover", 1)  # fmt: skip
    assert driver.advance("m-1") == []  # within the timeout: wait
    driver.now_us += m.policy.recovery_attempt_timeout_ms * 1000 + 1
    driver.run("m-1", hosts)
    assert m.phase == Phase.FENCED and "recovery failed 3 times" in m.reason
    assert InvariantChecker().check_quiescent(driver.log) == []


def _destination_takes_the_lease_unheard(driver: Driver, hosts: SimHosts) -> list[Observation]:
    """Pre-copy up to the destination's acquire, which takes the lease while its hostd is cut
    off: what it would report is returned, unheard. Its networking is never enabled, so the
    cont (the point of no return) is not issued."""
    hosts.converge_after_passes = 2
    start(driver)
    pending: list[E.CommandIssued] = []
    for _ in range(40):
        pending += [e.payload for e in driver.advance("m-1") if e.type == "CommandIssued"]
        assert pending, "the destination's acquire was never issued"
        cmd = pending.pop(0)
        if Kind(cmd.kind) == Kind.ENABLE_NETWORK:
            continue
        driver.answered.add(cmd.command_id)
        if (Kind(cmd.kind), cmd.host_id) == (Kind.ACQUIRE_LEASE, "host-b"):
            return hosts.answer(cmd)
        driver.observe(*hosts.answer(cmd))
        progress = driver._progress("m-1", cmd, hosts)
        pending += [e.payload for e in progress if e.type == "CommandIssued"]
    raise AssertionError("the destination's acquire was never issued")


def _roll_back_without(driver: Driver, hosts: SimHosts, missing: str) -> None:
    """Decide and answer until the migration ends; `missing` never answers."""
    for _ in range(40):
        decided = driver.advance("m-1")
        if driver.world.migrations["m-1"].phase.terminal:
            return
        answer(driver, hosts, [e for e in decided if getattr(e.payload, "host_id", "") != missing])
        driver.now_us += 10_000_000  # retries wait for time to pass
    raise AssertionError("the rollback never ended")


def test_a_rollback_left_paused_by_the_destinations_lease_runs_once_it_is_free() -> None:
    """The destination took the lease unheard, then missed recovery: the rollback's attempts to
    take the lease back fail against it and the source stays paused. When the destination
    returns, its copy is a stray: destroyed, its lease released; then the source takes the
    lease under a new generation and runs. The VM is not left paused for an operator to find."""
    driver, hosts = fresh()
    unheard = _destination_takes_the_lease_unheard(driver, hosts)
    restart(driver, missing=("host-b",))
    _roll_back_without(driver, hosts, "host-b")
    m, vm = driver.world.migrations["m-1"], driver.world.vms["vm-1"]
    assert m.phase == Phase.ROLLED_BACK and "could not take its lease back" in m.reason
    assert (vm.status.name, vm.host, vm.resume_owed) == ("PAUSED", "host-a", True)
    driver.connect("host-b")
    driver.observe(*unheard)
    assert reconcile(driver) == ["destroy-vm@host-b"]  # not yet the source: host-b holds it
    steps = ["destroy-vm@host-b"]
    answer(driver, hosts, [driver.log[-1]])
    for _ in range(3):
        decided = driver.request(I.ReconcileVm("vm-1", driver.now_us))
        steps += decisions(decided)
        answer(driver, hosts, decided)
    assert steps == ["destroy-vm@host-b", "acquire-lease@host-a", "resume-vm@host-a"]
    assert (vm.status.name, vm.lease_holder, vm.resume_owed) == ("RUNNING", "host-a", False)
    assert InvariantChecker().check(driver.log) == []


def _stray_destroyed_after_a_paused_rollback() -> tuple[Driver, SimHosts]:
    """The rollback left the source paused (its destination held the lease, then missed
    recovery); the destination is back and its stray copy destroyed: the lease is free."""
    driver, hosts = fresh()
    unheard = _destination_takes_the_lease_unheard(driver, hosts)
    restart(driver, missing=("host-b",))
    _roll_back_without(driver, hosts, "host-b")
    driver.connect("host-b")
    driver.observe(*unheard)
    answer(driver, hosts, driver.request(I.ReconcileVm("vm-1", driver.now_us)))  # the stray
    return driver, hosts


def test_a_migration_of_a_vm_owed_a_resume_keeps_it_running() -> None:
    """A VM a rollback left paused only for want of its lease is meant to run: a migration
    asked for while its resume is in flight is refused, naming it (its answer changes what
    the migration starts from; sim seed 14176 took the VM as paused, and the next rollback
    left it paused); one asked for before the resume is issued counts it as running."""
    driver, hosts = _stray_destroyed_after_a_paused_rollback()
    answer(driver, hosts, driver.request(I.ReconcileVm("vm-1", driver.now_us)))  # the lease
    vm = driver.world.vms["vm-1"]
    assert (vm.status.name, vm.lease_holder, vm.resume_owed) == ("PAUSED", "host-a", True)
    owed = driver.world.copy()
    assert reconcile(driver) == ["resume-vm@host-a"]
    before = driver.world.copy()
    second = I.StartMigration("m-2", "vm-1", "host-b", 1, E.MigrationPolicy(), driver.now_us)
    with pytest.raises(IllegalTransition, match="resume-vm on host-a in flight"):
        decide(driver.world, second)
    assert driver.world == before
    (requested,) = decide(owed, second)
    assert requested.payload.source_was_running


def test_a_strays_destroy_on_a_third_host_does_not_hold_a_migration() -> None:
    """A stray copy's destroy in flight to a host that went away changes neither what a
    migration starts from nor where it goes: the migration (and a drain) may go on. One in
    flight to the requested destination is refused (review of 2e12811)."""
    driver, _ = fresh()
    driver.connect("host-c")
    driver.observe(migration("host-c", "vm-1", "setup"))  # a stray QEMU of vm-1 on host-c
    assert reconcile(driver) == ["destroy-vm@host-c"]
    driver.observe(Observation("host-c", E.HostDisconnected(host_id="host-c", generation=1)))
    to_b = I.StartMigration("m-2", "vm-1", "host-b", 1, E.MigrationPolicy(), driver.now_us)
    assert [e.type for e in decide(driver.world.copy(), to_b)] == ["MigrationRequested"]
    driver.connect("host-c")
    to_c = I.StartMigration("m-2", "vm-1", "host-c", 1, E.MigrationPolicy(), driver.now_us)
    with pytest.raises(IllegalTransition, match="destroy-vm on host-c in flight"):
        decide(driver.world, to_c)


def test_an_owed_resume_is_tried_once() -> None:
    """The source's acquire fails even after the lease came free (another fault): the VM stays
    paused with the failure in the log, not retried on every event."""
    driver, hosts = _stray_destroyed_after_a_paused_rollback()
    hosts.fail_kinds.add(Kind.ACQUIRE_LEASE)
    decided = driver.request(I.ReconcileVm("vm-1", driver.now_us))
    assert decisions(decided) == ["acquire-lease@host-a"]
    answer(driver, hosts, decided)
    assert reconcile(driver) == []
    vm = driver.world.vms["vm-1"]
    assert (vm.status.name, vm.resume_owed) == ("PAUSED", False)


def test_post_copy_asked_for_but_unseen_waits_for_missing_hosts() -> None:
    """migrate-start-postcopy was sent (its answer and the statuses lost with the hosts); the
    source may be in post-copy, where it can never be resumed: a rollback would destroy the
    only copy that can go on. The migration waits for its hosts (sim seed 3042)."""
    driver, hosts = fresh()
    start(driver, common_pb2.MIGRATION_MODE_POSTCOPY)
    for _ in range(10):
        issued = [e for e in driver.advance("m-1") if e.type == "CommandIssued"]
        if any(e.payload.args.start_postcopy for e in issued):
            break  # START_MIGRATION carries the switch; hosts and answers are lost now
        answer(driver, hosts, issued)
    m = driver.world.migrations["m-1"]
    assert not m.postcopy_started and recovery.stage(m) == recovery.Stage.POSTCOPY
    restart(driver, missing=("host-a", "host-b"))
    assert driver.advance("m-1") == []
    assert m.phase == Phase.TRANSFERRING


def test_qmp_events_older_than_a_snapshot_do_not_step_back() -> None:
    """A hostd stalled with QMP events unread reports a snapshot at its hello, then reads the
    old events: post-copy paused now, and a postcopy-active from before the break. Read in
    arrival order, that stale status looked like a recovery that worked (sim seed 3042: the
    recovery was decided again and again, and the VM fenced)."""
    driver, _ = _paused_postcopy()
    m = driver.world.migrations["m-1"]
    driver.advance("m-1")
    assert m.phase == Phase.POSTCOPY_PAUSED
    stale_at = driver.now_us + 500  # QEMU's stamp: before hostd's query below
    snapshot = common_pb2.VmObservation(
        vm="vm-1", process_alive=True, runstate="finish-migrate", qmp_reachable=True,
        migration_status="postcopy-paused", migration_role="source", queried_at_us=stale_at + 1,
    )  # fmt: skip
    driver.observe(Observation("host-a", E.VmObserved(observation=snapshot, reason="hello")))
    stale = E.QmpEventReceived(
        vm="vm-1", event="MIGRATION", data_json='{"status": "postcopy-active"}'
    )
    driver.append([NewEvent("host/host-a", stale, stale_at, "host-a", 1, 99)])
    assert (m.phase, m.src.status) == (Phase.POSTCOPY_PAUSED, "postcopy-paused")
    fresh_event = E.QmpEventReceived(vm="vm-1", event="MIGRATION",
                                     data_json='{"status": "postcopy-active"}')  # fmt: skip
    driver.append([NewEvent("host/host-a", fresh_event, stale_at + 2, "host-a", 1, 100)])
    assert (m.phase, m.src.status) == (Phase.FINISHING, "postcopy-active")  # it worked


def test_an_interrupted_migrate_recover_is_sent_again() -> None:
    """migrate-recover ran on the destination (its "setup" event came) but its hostd restarted
    before answering: the attempt is spent, and the next one listens again, which QEMU 7.2
    accepts on a destination still postcopy-paused. The recovery completes."""
    driver, hosts = _paused_postcopy()
    m = driver.world.migrations["m-1"]
    driver.advance("m-1")
    (recover,) = [c.issued for c in m.commands.values() if c.kind == Kind.RECOVER_INCOMING]
    driver.answered.add(recover.command_id)
    interrupted = E.CommandFailed(
        command_id=recover.command_id, attempt=recover.attempt, kind=recover.kind, vm="vm-1",
        error="interrupted by a hostd restart; not executed again",
    )  # fmt: skip
    driver.observe(migration("host-b", "vm-1", "setup"), Observation("host-b", interrupted))
    events = driver.run("m-1", hosts)
    assert decisions(events).count("recover-incoming@host-b") == 1  # the next attempt's
    driver.observe(*(migration(h, "vm-1", "completed") for h in ("host-a", "host-b")))
    driver.run("m-1", hosts)
    assert m.phase == Phase.COMPLETED, m.reason
    assert InvariantChecker().check_quiescent(driver.log) == []
