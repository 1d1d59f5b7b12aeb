"""Faults found by chaos drills and reviews, each replayed deterministically through the core:
a source whose migration fails on its own, answers lost to a hostd restart, a destination that
dies before it ran, and the ids and names that collided."""

from __future__ import annotations

import pytest

from coordinator.core import IllegalTransition, Phase, recovery
from coordinator.core import inputs as I
from coordinator.core.invariants import InvariantChecker
from coordinator.core.lifecycle import MAX_COMMAND_RETRIES, POSTCOPY_SWITCH_PRECOPY_BANDWIDTH
from coordinator.core.state import Kind, VmStatus
from tests.unit.helpers import answer, decisions, fresh
from tools.sim import TICK_US, Observation, migration, qmp
from whimbrel.v1 import common_pb2 as C
from whimbrel.v1 import events_pb2 as E

PRECOPY, POSTCOPY = C.MIGRATION_MODE_PRECOPY, C.MIGRATION_MODE_POSTCOPY


def start(driver, mode=PRECOPY, migration_id="m-1"):
    return driver.request(
        I.StartMigration(migration_id, "vm-1", "host-b", mode, E.MigrationPolicy(), driver.now_us)
    )


def until_issued(driver, hosts, kind, migration_id="m-1"):
    """Advance and answer every command until one of `kind` is issued; it is returned
    unanswered."""
    for _ in range(20):
        issued = [e for e in driver.advance(migration_id) if e.type == "CommandIssued"]
        if not issued:
            driver.now_us += TICK_US  # the coordinator's tick: a report is overdue
        wanted = [e.payload for e in issued if Kind(e.payload.kind) == kind]
        for e in issued:
            if Kind(e.payload.kind) != kind:
                answer(driver, hosts, [e])
                driver._progress(migration_id, e.payload, hosts)  # QEMU's passes after migrate
        if wanted:
            return wanted[0]
    raise AssertionError(f"{kind.label} was never issued")


def failed(cmd: E.CommandIssued, error: str, *, rejected: bool = False) -> Observation:
    return Observation(
        cmd.host_id,
        E.CommandFailed(
            command_id=cmd.command_id,
            attempt=cmd.attempt,
            kind=cmd.kind,
            vm=cmd.vm,
            error=error,
            rejected=rejected,
        ),
    )


def succeeded(cmd: E.CommandIssued) -> Observation:
    return Observation(
        cmd.host_id,
        E.CommandSucceeded(
            command_id=cmd.command_id, attempt=cmd.attempt, kind=cmd.kind, vm=cmd.vm
        ),
    )


def clean(driver) -> None:
    assert InvariantChecker().check_quiescent(driver.log) == []


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_a_source_migration_that_fails_on_its_own_rolls_back(status):
    """QEMU's own migration failure on the source (a wrong advertised address, a cut link)
    is decided on: the migration rolls back with the failure as its reason, never stalls."""
    driver, hosts = fresh()
    start(driver)
    cmd = until_issued(driver, hosts, Kind.START_MIGRATION)
    answer_events = answer(driver, hosts, [driver.log[-1]])
    assert answer_events and cmd.command_id in driver.answered
    # QEMU resumes a source whose migration failed by itself: it never stopped here.
    driver.observe(migration("host-a", "vm-1", status))
    events = driver.run("m-1", hosts)
    d = decisions(events)
    assert d[0] == "RollbackDecided"
    rollback = next(e.payload for e in events if e.type == "RollbackDecided")
    assert f"source migration {status}" in rollback.reason
    assert "cancel-migration@host-a" not in d  # nothing left to cancel
    m = driver.world.migrations["m-1"]
    assert m.phase == Phase.ROLLED_BACK
    vm = driver.world.vms["vm-1"]
    assert (vm.host, vm.status, vm.lease_holder) == ("host-a", VmStatus.RUNNING, "host-a")
    clean(driver)


def test_a_rollback_sends_an_interrupted_cancel_again():
    """Shell simulation seed 7191: the link broke while the source sat in pre-switchover; the
    rollback's cancel was interrupted by a hostd restart and never ran. A source still in
    pre-switchover refuses cont ("Migration is not finalized yet"), so the rollback ended
    with the VM paused for good. The cancel is sent again while QEMU still migrates."""
    driver, hosts = fresh()
    start(driver)
    until_issued(driver, hosts, Kind.START_MIGRATION)
    answer(driver, hosts, [_issued(driver, Kind.START_MIGRATION)])
    driver.observe(
        qmp("host-a", "vm-1", "STOP"),
        migration("host-a", "vm-1", "pre-switchover"),
        migration("host-b", "vm-1", "failed"),
    )
    cancel = until_issued(driver, hosts, Kind.CANCEL_MIGRATION)
    driver.answered.add(cancel.command_id)
    driver.observe(failed(cancel, "interrupted by a hostd restart; not executed again"))
    again = [e.payload for e in driver.advance("m-1") if e.type == "CommandIssued"]
    assert [Kind(c.kind) for c in again] == [Kind.CANCEL_MIGRATION]
    driver.run("m-1", hosts)
    m = driver.world.migrations["m-1"]
    vm = driver.world.vms["vm-1"]
    assert m.phase == Phase.ROLLED_BACK, m.reason
    assert (vm.host, vm.status, vm.lease_holder) == ("host-a", VmStatus.RUNNING, "host-a")
    clean(driver)


def test_qemus_own_words_on_a_failure_reach_the_rollback_reason():
    """hostd sends query-migrate's error-desc before the MIGRATION "failed" it explains (a TLS
    certificate refused, say): the reason says it, as one printable line."""
    driver, hosts = fresh()
    start(driver)
    until_issued(driver, hosts, Kind.START_MIGRATION)
    answer(driver, hosts, [driver.log[-1]])
    said = E.MigrationStatsSampled(
        vm="vm-1", status="failed", error_desc="TLS handshake failed:\x1b[31m bad cert\n"
    )
    driver.observe(Observation("host-a", said), migration("host-a", "vm-1", "failed"))
    events = driver.run("m-1", hosts)
    rollback = next(e.payload for e in events if e.type == "RollbackDecided")
    assert (
        rollback.reason == "source migration failed in QEMU: TLS handshake failed:?[31m bad cert?"
    )
    assert driver.world.migrations["m-1"].progress.total_bytes == 0  # not taken as progress
    clean(driver)


def test_a_precopy_source_keeps_its_lease_until_qemu_can_no_longer_resume_it():
    """QEMU 7.2 resumes a pre-copy source by itself when its migration fails, even from
    pre-switchover: hostd releases the source's lease only at completed (postmigrate), so a
    destination dying in the switchover leaves a source that runs with its lease."""
    driver, hosts = fresh()
    hosts.continue_at_pre_switchover = False  # the coordinator's continue
    start(driver)
    until_issued(driver, hosts, Kind.START_MIGRATION)
    answer(driver, hosts, [driver.log[-1]])
    driver.observe(
        qmp("host-a", "vm-1", "STOP"),
        migration("host-a", "vm-1", "pre-switchover"),
        *hosts.switchover("host-a", "vm-1", "pre-switchover"),
    )
    assert driver.world.vms["vm-1"].lease_holder == "host-a"  # still the source's
    # The destination dies before the switchover completes; QEMU resumes the source at once.
    driver.observe(
        hosts.kill("vm-1", "host-b"),
        migration("host-a", "vm-1", "failed"),
        qmp("host-a", "vm-1", "RESUME"),
    )
    events = driver.run("m-1", hosts)
    assert "RollbackDecided" in decisions(events)
    assert driver.world.migrations["m-1"].phase == Phase.ROLLED_BACK
    clean(driver)


def test_continue_switchover_interrupted_by_a_restart_after_it_took_effect_completes():
    """A source hostd killed right after sending migrate-continue reports the command
    "interrupted by a hostd restart" on its return; both QEMUs report completed. The hosts'
    own reports decide: the migration completes, the destination is not fenced."""
    driver, hosts = fresh()
    hosts.continue_at_pre_switchover = False  # the coordinator's continue
    start(driver)
    cmd = until_issued(driver, hosts, Kind.CONTINUE_SWITCHOVER)
    effects = [o for o in hosts.answer(cmd) if not isinstance(o.payload, E.CommandSucceeded)]
    driver.answered.add(cmd.command_id)
    driver.observe(*effects)
    # The migration goes on while the source's hostd is away: handoff and cont.
    until_issued(driver, hosts, Kind.RESUME_VM)
    driver.observe(
        failed(cmd, "interrupted by a hostd restart; not executed again"),
    )
    events = driver.run("m-1", hosts)
    d = decisions(events)
    assert "FencingDecided" not in d and "VmLost" not in d
    assert driver.world.migrations["m-1"].phase == Phase.COMPLETED
    vm = driver.world.vms["vm-1"]
    assert (vm.host, vm.status) == ("host-b", VmStatus.RUNNING)
    clean(driver)


def test_a_source_that_dies_after_the_destination_loaded_everything_completes():
    """The source QEMU is killed after migrate-continue, once the destination reported
    completed but before the source did: its hostd never sees completed, so nothing released
    the lease. A dead source cannot resume, and the destination holds the whole VM: the
    coordinator releases the dead source's lease itself and the handoff goes on."""
    driver, hosts = fresh()
    hosts.continue_at_pre_switchover = False  # the coordinator's continue
    start(driver)
    cmd = until_issued(driver, hosts, Kind.CONTINUE_SWITCHOVER)
    driver.answered.add(cmd.command_id)
    driver.observe(
        migration("host-a", "vm-1", "device"),
        migration("host-b", "vm-1", "completed"),
        hosts.kill("vm-1", "host-a"),
        succeeded(cmd),
    )
    events = driver.run("m-1", hosts)
    d = decisions(events)
    assert d[:3] == ["release-lease@host-a", "acquire-lease@host-b", "resume-vm@host-b"]
    assert "FencingDecided" not in d and "VmLost" not in d
    assert driver.world.migrations["m-1"].phase == Phase.COMPLETED
    vm = driver.world.vms["vm-1"]
    assert (vm.host, vm.status, vm.lease_holder) == ("host-b", VmStatus.RUNNING, "host-b")
    clean(driver)


def test_precopy_cont_waits_for_the_destinations_own_completed():
    """The point of no return needs the destination's word that it loaded everything: a
    source that reports completed (its lease released) while the destination has not does
    not get the destination resumed; the destination's completed then does."""
    driver, hosts = fresh()
    hosts.continue_at_pre_switchover = False  # the coordinator's continue
    start(driver)
    cmd = until_issued(driver, hosts, Kind.CONTINUE_SWITCHOVER)
    driver.answered.add(cmd.command_id)
    driver.observe(
        migration("host-a", "vm-1", "device"),
        migration("host-a", "vm-1", "completed"),
        *hosts.switchover("host-a", "vm-1", "completed"),
        succeeded(cmd),
    )
    for _ in range(5):
        issued = [e for e in driver.advance("m-1") if e.type == "CommandIssued"]
        assert Kind.RESUME_VM not in [Kind(e.payload.kind) for e in issued]
        answer(driver, hosts, issued)
    assert driver.world.vms["vm-1"].lease_holder == "host-b"  # the handoff itself went on
    driver.observe(migration("host-b", "vm-1", "completed"))
    assert "resume-vm@host-b" in decisions(driver.advance("m-1"))


def test_a_destination_that_died_before_its_cont_ran_falls_back_to_the_complete_source():
    """The destination's QEMU dies between the cont intent and hostd's cont: hostd refuses
    the command unexecuted. The destination never ran, so the complete, paused source is the
    VM: the migration rolls back, the VM is not lost."""
    driver, hosts = fresh()
    start(driver)
    cont = until_issued(driver, hosts, Kind.RESUME_VM)
    driver.observe(hosts.kill("vm-1", "host-b"))
    driver.answered.add(cont.command_id)
    driver.observe(failed(cont, "QEMU is not running", rejected=True))
    events = driver.run("m-1", hosts)
    d = decisions(events)
    assert "VmLost" not in d and "FencingDecided" not in d
    assert d[0] == "RollbackDecided"
    m = driver.world.migrations["m-1"]
    assert m.phase == Phase.ROLLED_BACK
    vm = driver.world.vms["vm-1"]
    assert (vm.host, vm.status, vm.lease_holder) == ("host-a", VmStatus.RUNNING, "host-a")
    clean(driver)


def test_a_cont_that_may_have_run_still_fences():
    """A cont whose outcome is unknown (the QEMU died while the command was in QEMU's hands)
    may have run the guest: the source is never resumed then."""
    driver, hosts = fresh()
    start(driver)
    cont = until_issued(driver, hosts, Kind.RESUME_VM)
    driver.observe(hosts.kill("vm-1", "host-b"))
    driver.answered.add(cont.command_id)
    driver.observe(failed(cont, "QMP connection lost"))
    events = driver.run("m-1", hosts)
    d = decisions(events)
    assert "resume-vm@host-a" not in d
    assert driver.world.migrations["m-1"].phase == Phase.FENCED
    # The reason says what is known: the cont was sent, no RESUME was seen.
    fence = next(e.payload for e in events if e.type == "FencingDecided")
    assert "after its cont was sent (whether it ran is unknown)" in fence.reason


def test_a_migrated_vm_whose_qemu_dies_is_lost_with_a_reason():
    """After a completed migration the destination's QEMU is killed: the VM is lost (so its
    on_lost policy applies), with the exit named, not quietly "stopped"."""
    driver, hosts = fresh()
    start(driver)
    driver.run("m-1", hosts)
    assert driver.world.migrations["m-1"].phase == Phase.COMPLETED
    driver.observe(hosts.kill("vm-1", "host-b"))
    vm = driver.world.vms["vm-1"]
    assert vm.status == VmStatus.LOST
    assert "host-b" in vm.lost_reason and "signal 9" in vm.lost_reason


def test_a_guest_shutdown_stops_the_vm():
    """A QEMU that exits after the guest shut down is stopped, not lost."""
    driver, _ = fresh()
    driver.observe(
        qmp("host-a", "vm-1", "SHUTDOWN", guest=True),
        Observation("host-a", E.QemuExited(vm="vm-1", pid=1, exit_code=0)),
    )
    assert driver.world.vms["vm-1"].status == VmStatus.STOPPED


def test_vm_command_ids_are_unique_forever():
    """Two stray copies destroyed in one decision, and a stop retried after a failure, each
    get an id of their own (a repeated id returns hostd's stored result without running)."""
    driver, _ = fresh()
    for host in ("host-b", "host-c"):
        driver.connect(host)
        driver.observe(
            Observation(
                host,
                E.VmObserved(
                    observation=C.VmObservation(
                        vm="vm-1", process_alive=True, qmp_reachable=True, runstate="paused"
                    )
                ),
            )
        )
    strays = driver.request(I.ReconcileVm("vm-1", driver.now_us))
    ids = [e.payload.command_id for e in strays]
    assert len(ids) == 2 and len(set(ids)) == 2
    (stop,) = [e for e in driver.request(I.StopVm("vm-1", False, driver.now_us))
               if e.type == "CommandIssued"]  # fmt: skip
    driver.observe(failed(stop.payload, "simulated failure"))
    (again,) = [e for e in driver.request(I.StopVm("vm-1", False, driver.now_us))
                if e.type == "CommandIssued"]  # fmt: skip
    assert again.payload.command_id not in {stop.payload.command_id, *ids}


def test_a_migration_named_vm_completes():
    """A migration id that reads like the VM commands' prefix is an ordinary id."""
    driver, hosts = fresh()
    start(driver, migration_id="vm")
    driver.run("vm", hosts)
    assert driver.world.migrations["vm"].phase == Phase.COMPLETED
    clean(driver)


def test_starting_a_lost_vm_where_its_lease_is_not_is_refused_up_front():
    """A lost VM whose lease another host still holds is refused with the holder named, and
    nothing is appended; where the lease is, it starts."""
    driver, _ = fresh()
    driver.connect("host-b")
    driver.observe(Observation("host-a", E.QemuExited(vm="vm-1", pid=1, exit_code=-1, signal=9)))
    assert driver.world.vms["vm-1"].status == VmStatus.LOST
    assert driver.world.vms["vm-1"].lease_holder == "host-a"
    head = len(driver.log)
    with pytest.raises(IllegalTransition, match="lease held by host-a"):
        driver.request(I.StartVm("vm-1", "host-b", driver.now_us))
    assert len(driver.log) == head
    assert decisions(driver.request(I.StartVm("vm-1", "host-a", driver.now_us))) == [
        "start-vm@host-a"
    ]


def test_destroys_that_keep_failing_are_bounded_in_a_rollback():
    """A destination that cannot be destroyed is tried a bounded number of times; the source
    then runs again (the paused destination never ran and has no lease)."""
    driver, hosts = fresh()
    start(driver)
    until_issued(driver, hosts, Kind.START_MIGRATION)
    hosts.fail_kinds = {Kind.DESTROY_VM}
    driver.request(I.AbortMigration("m-1", "", driver.now_us))
    events = driver.run("m-1", hosts)
    assert decisions(events).count("destroy-vm@host-b") == 3
    assert driver.world.migrations["m-1"].phase == Phase.ROLLED_BACK
    assert driver.world.vms["vm-1"].status == VmStatus.RUNNING


def test_destroys_that_keep_failing_are_bounded_in_a_fence():
    """Fencing tries each destroy a bounded number of times, then records the VM lost with the
    QEMU it could not destroy named (that copy blocks any cold start while it exists)."""
    driver, hosts = fresh()
    start(driver, POSTCOPY)
    driver.run("m-1", hosts)
    hosts.fail_kinds = {Kind.DESTROY_VM}
    driver.observe(Observation("host-a", E.QemuExited(vm="vm-1", pid=1, exit_code=-1, signal=9)))
    events = driver.run("m-1", hosts)
    assert decisions(events).count("destroy-vm@host-b") == 3
    m = driver.world.migrations["m-1"]
    assert m.phase == Phase.FENCED and "QEMU not destroyed on host-b" in m.reason


def test_mode_postcopy_never_becomes_a_long_stop_and_copy():
    """Issue 12 (9): with QEMU's default downtime limit a converging guest finished mode
    postcopy as a pre-copy with a long pause. The source is told a 1 ms downtime limit
    (whatever the policy says), and the switch goes with the start itself: hostd sends
    migrate-start-postcopy right after migrate, before QEMU's first pass could converge. A
    separate START_POSTCOPY, a round trip later, lost that race to a small guest's first pass
    (a TLS post-copy test finished as pre-copy)."""
    driver, hosts = fresh()
    policy = E.MigrationPolicy(parameters=E.MigrationParameters(downtime_limit_ms=300))
    driver.request(I.StartMigration("m-1", "vm-1", "host-b", POSTCOPY, policy, driver.now_us))
    start_cmd = until_issued(driver, hosts, Kind.START_MIGRATION)
    assert start_cmd.args.parameters.downtime_limit_ms == 1
    assert start_cmd.args.postcopy and start_cmd.args.start_postcopy
    # Pre-copy throttled, so its first pass cannot end before the switch reaches QEMU.
    assert start_cmd.args.parameters.max_bandwidth == POSTCOPY_SWITCH_PRECOPY_BANDWIDTH
    m = driver.world.migrations["m-1"]
    assert m.postcopy_switch_sent and recovery.stage(m) == recovery.Stage.POSTCOPY
    driver.answered.add(start_cmd.command_id)
    driver.observe(*hosts.answer(start_cmd))
    events = driver.run("m-1", hosts)
    driver.observe(*(migration(h, "vm-1", "completed") for h in ("host-a", "host-b")))
    events += driver.run("m-1", hosts)
    assert "start-postcopy@host-a" not in decisions(events)
    assert m.phase == Phase.COMPLETED and m.postcopy_started, m.reason


@pytest.mark.parametrize("cont_first", [False, True])
def test_an_interrupted_start_that_switched_to_post_copy_goes_on(cont_first):
    """QEMU took migrate and migrate-start-postcopy, then the source's hostd restarted before
    its answer: the start comes back "interrupted", but the source is in post-copy. That
    failure took effect: the migration goes on. Read as a failure, it was rolled back (a
    post-copy source cancelled), or, once the destination's cont was logged, fenced."""
    driver, hosts = fresh()
    driver.request(I.StartMigration("m-1", "vm-1", "host-b", POSTCOPY, E.MigrationPolicy(),
                                    driver.now_us))  # fmt: skip
    start_cmd = until_issued(driver, hosts, Kind.START_MIGRATION)
    driver.answered.add(start_cmd.command_id)
    switched = [o for o in hosts.answer(start_cmd) if not isinstance(o.payload, E.CommandSucceeded)]
    driver.observe(*switched)
    interrupted = failed(start_cmd, "interrupted by a hostd restart; not executed again")
    _completes_despite(driver, hosts, interrupted, cont_first=cont_first)


def _completes_despite(driver, hosts, failure: Observation, *, cont_first: bool) -> None:
    """Reads `failure` (once the destination's cont is issued, if `cont_first`), lets the
    post-copy transfer end, and checks the migration completed, neither rolled back nor
    fenced, with the invariant checker clean."""
    if cont_first:
        until_issued(driver, hosts, Kind.RESUME_VM)
        assert driver.world.migrations["m-1"].cont_issued
    driver.observe(failure)
    events = driver.run("m-1", hosts)
    driver.observe(*(migration(h, "vm-1", "completed") for h in ("host-a", "host-b")))
    events += driver.run("m-1", hosts)
    m = driver.world.migrations["m-1"]
    assert not {"RollbackDecided", "FencingDecided"} & set(decisions(events)), decisions(events)
    assert m.phase == Phase.COMPLETED, m.reason
    clean(driver)


def test_a_refused_retry_of_the_cont_does_not_undo_one_that_ran():
    """The destination's cont ran, but its hostd restarted before the answer (and the RESUME
    event): its hello says the guest runs. The cont is sent again; the destination QEMU exits
    before it, and hostd refuses the repeat without acting. That refusal proves nothing about
    the first cont: the point of no return stays passed and the source must never run again.
    Read as "the cont never happened", the rollback resumed the source after the destination
    had run (invariant 3)."""
    driver, hosts = fresh()
    start(driver, PRECOPY)
    cont = until_issued(driver, hosts, Kind.RESUME_VM)
    driver.answered.add(cont.command_id)
    hello = E.VmObserved(
        observation=C.VmObservation(vm="vm-1", process_alive=True, qmp_reachable=True,
                                    runstate="running", migration_status="completed",
                                    queried_at_us=driver.now_us),
        reason="hello",
    )  # fmt: skip
    driver.observe(Observation("host-b", hello))
    driver.observe(failed(cont, "interrupted by a hostd restart; not executed again"))
    (again,) = [
        e.payload
        for e in driver.advance("m-1")
        if e.type == "CommandIssued" and Kind(e.payload.kind) == Kind.RESUME_VM
    ]
    driver.answered.add(again.command_id)
    driver.observe(hosts.kill("vm-1", "host-b"))
    driver.observe(failed(again, "QEMU of vm-1 has exited", rejected=True))
    m = driver.world.migrations["m-1"]
    assert m.point_of_no_return_passed
    events = driver.run("m-1", hosts)
    assert "RollbackDecided" not in decisions(events), decisions(events)
    assert "resume-vm@host-a" not in decisions(events), decisions(events)
    assert m.phase == Phase.FENCED, m.reason
    assert InvariantChecker().check(driver.log) == []


@pytest.mark.parametrize("first", ["host-a", "host-b"])
@pytest.mark.parametrize("kind", [Kind.ENABLE_NETWORK, Kind.ACQUIRE_LEASE])
def test_a_failure_read_while_one_end_saw_post_copy_pause_waits(kind, first):
    """Post-copy before the cont: the destination's enable (or acquire) is interrupted without
    acting, the link breaks, and one end reports postcopy-paused before the other. Read with
    the source paused, the failure fenced (VmLost); with the destination paused, it rolled
    back, its cancel racing the source's pause (a cancel leaves a paused source `cancelling`
    for good). Read once both ends report the pause, moments later, the same failure leads to
    a recovery and the migration completes: it waits for that."""
    second = "host-b" if first == "host-a" else "host-a"
    driver, hosts = fresh()
    hosts.enable_at_postcopy = False  # the coordinator's enable command is the one that counts
    start(driver, POSTCOPY)
    cmd = until_issued(driver, hosts, kind)
    if cmd.host_id != "host-b":
        cmd = until_issued(driver, hosts, kind)
    driver.answered.add(cmd.command_id)
    driver.observe(migration(first, "vm-1", "postcopy-paused"))
    driver.observe(failed(cmd, "interrupted by a hostd restart; not executed again"))
    events = driver.advance("m-1")
    assert not {"RollbackDecided", "FencingDecided"} & set(decisions(events)), decisions(events)
    driver.observe(migration(second, "vm-1", "postcopy-paused"))
    events += driver.run("m-1", hosts)
    m = driver.world.migrations["m-1"]
    if not m.phase.terminal and m.dst_resumed:
        driver.observe(*(migration(h, "vm-1", "completed") for h in ("host-a", "host-b")))
        events += driver.run("m-1", hosts)
    assert not {"RollbackDecided", "FencingDecided"} & set(decisions(events)), decisions(events)
    assert m.phase == Phase.COMPLETED, m.reason
    clean(driver)


def test_a_failure_read_while_the_destination_paused_and_the_source_is_gone_rolls_back():
    """As above, the destination paused first, but the source's host is disconnected: nothing
    may report the source's pause, so the migration does not hold for it. Once the command's
    retries are spent, it rolls back (the source is the VM before the cont)."""
    driver, hosts = fresh()
    hosts.enable_at_postcopy = False
    start(driver, POSTCOPY)
    cmd = until_issued(driver, hosts, Kind.ENABLE_NETWORK)
    driver.observe(
        migration("host-b", "vm-1", "postcopy-paused"),
        Observation("host-a", E.HostDisconnected(host_id="host-a", generation=1)),
    )
    for _ in range(MAX_COMMAND_RETRIES):
        driver.answered.add(cmd.command_id)
        driver.observe(failed(cmd, "the network hook failed"))
        decided = [e.payload for e in driver.advance("m-1")]
        if not isinstance(decided[0], E.CommandIssued):
            break
        (cmd,) = decided
        assert Kind(cmd.kind) == Kind.ENABLE_NETWORK
    assert isinstance(decided[0], E.RollbackDecided), decided


@pytest.mark.parametrize("kind", [Kind.ACQUIRE_LEASE, Kind.ENABLE_NETWORK])
def test_a_post_copy_handoff_command_that_never_ran_is_sent_again(kind):
    """Shell simulation seed 12194: post-copy had begun and the destination's acquire was
    interrupted by a hostd restart before it ran. The rollback that followed had to cancel the
    post-copy source; the link broke as the cancel went out, and a paused post-copy source
    that takes a cancel stays `cancelling` for good: the VM was lost. In post-copy a rollback
    is the risky way out, so the command is sent again (up to MAX_COMMAND_RETRIES)."""
    driver, hosts = fresh()
    hosts.enable_at_postcopy = False  # the coordinator's enable command is the one that counts
    start(driver, POSTCOPY)
    cmd = until_issued(driver, hosts, kind)
    driver.answered.add(cmd.command_id)
    driver.observe(failed(cmd, "interrupted by a hostd restart; not executed again"))
    events = driver.run("m-1", hosts)
    assert "RollbackDecided" not in decisions(events), decisions(events)
    assert decisions(events)[0] == f"{kind.label}@host-b"
    driver.observe(*(migration(h, "vm-1", "completed") for h in ("host-a", "host-b")))
    driver.run("m-1", hosts)
    m = driver.world.migrations["m-1"]
    assert m.phase == Phase.COMPLETED, m.reason
    clean(driver)


def test_a_post_copy_handoff_command_that_keeps_failing_rolls_back():
    """The retries are bounded: a destination whose acquire fails every time is given up on
    after MAX_COMMAND_RETRIES failures, and the migration rolls back as before."""
    driver, hosts = fresh()
    start(driver, POSTCOPY)
    for _ in range(MAX_COMMAND_RETRIES):
        cmd = until_issued(driver, hosts, Kind.ACQUIRE_LEASE)
        assert cmd.host_id == "host-b"
        driver.answered.add(cmd.command_id)
        driver.observe(failed(cmd, "lease store unreachable"))
    assert decisions(driver.advance("m-1"))[:1] == ["RollbackDecided"]


def test_a_start_reported_interrupted_after_the_point_of_no_return_changes_nothing():
    """Shell simulation seed 11681: the source's hostd restarted after it sent migrate; the
    migration went on, the destination's cont was issued, and only then came the start's
    answer, "interrupted by a hostd restart". The destination runs on the state that migrate
    sent: it took effect. Read as a failure after the point of no return, it fenced both
    hosts, and a VM that had moved was lost."""
    driver, hosts = fresh()
    start(driver, PRECOPY)
    start_cmd = until_issued(driver, hosts, Kind.START_MIGRATION)
    driver.answered.add(start_cmd.command_id)
    driver.observe(
        *[o for o in hosts.answer(start_cmd) if not isinstance(o.payload, E.CommandSucceeded)]
    )
    driver._progress("m-1", start_cmd, hosts)
    until_issued(driver, hosts, Kind.RESUME_VM)
    m = driver.world.migrations["m-1"]
    assert m.point_of_no_return_passed
    driver.observe(failed(start_cmd, "interrupted by a hostd restart; not executed again"))
    events = driver.run("m-1", hosts)
    assert not {"RollbackDecided", "FencingDecided"} & set(decisions(events)), decisions(events)
    assert m.phase == Phase.COMPLETED, m.reason
    clean(driver)


@pytest.mark.parametrize("cont_first", [False, True])
def test_an_interrupted_continue_that_let_post_copy_begin_goes_on(cont_first):
    """Mode auto stops a source switching to post-copy in pre-switchover; QEMU took the
    migrate-continue and went postcopy-active, and hostd restarted before its answer. The
    continue took effect: the migration goes on. Read as a failure, it was rolled back, or,
    once the destination's cont was logged, fenced: a healthy migration's VM lost."""
    driver, hosts = fresh()
    hosts.continue_at_pre_switchover = False  # the coordinator's continue
    driver.request(I.StartMigration("m-1", "vm-1", "host-b", C.MIGRATION_MODE_AUTO,
                                    E.MigrationPolicy(), driver.now_us))  # fmt: skip
    start_cmd = until_issued(driver, hosts, Kind.START_MIGRATION)
    answer(driver, hosts, [e for e in driver.log if e.payload is start_cmd])
    driver.observe(migration("host-a", "vm-1", "active"))
    driver.request(I.SwitchToPostcopy("m-1", driver.now_us, "spiffe://t"))
    switch = until_issued(driver, hosts, Kind.START_POSTCOPY)
    driver.answered.add(switch.command_id)
    driver.observe(succeeded(switch), qmp("host-a", "vm-1", "STOP"),
                   migration("host-a", "vm-1", "pre-switchover"),
                   *hosts._release("host-a", "vm-1"))  # fmt: skip
    cont = until_issued(driver, hosts, Kind.CONTINUE_SWITCHOVER)
    driver.answered.add(cont.command_id)
    driver.observe(*(migration(h, "vm-1", "postcopy-active") for h in ("host-a", "host-b")))
    interrupted = failed(cont, "interrupted by a hostd restart; not executed again")
    _completes_despite(driver, hosts, interrupted, cont_first=cont_first)


def test_a_switch_asked_for_before_the_start_goes_with_it():
    """Mode auto, post-copy asked for by an operator before the transfer began: the start
    carries the switch (and the throttle), as mode postcopy's does; no START_POSTCOPY follows.
    A policy's lower bandwidth is kept."""
    driver, hosts = fresh()
    policy = E.MigrationPolicy(parameters=E.MigrationParameters(max_bandwidth=50_000))
    driver.request(I.StartMigration("m-1", "vm-1", "host-b", C.MIGRATION_MODE_AUTO, policy,
                                    driver.now_us))  # fmt: skip
    driver.request(I.SwitchToPostcopy("m-1", driver.now_us, "spiffe://t"))
    start_cmd = until_issued(driver, hosts, Kind.START_MIGRATION)
    assert start_cmd.args.start_postcopy and start_cmd.args.parameters.max_bandwidth == 50_000
    driver.answered.add(start_cmd.command_id)
    driver.observe(*hosts.answer(start_cmd))
    assert "start-postcopy@host-a" not in decisions(driver.run("m-1", hosts))
    assert driver.world.migrations["m-1"].postcopy_started


def _issued(driver, kind):
    (issued,) = [
        e for e in driver.log if e.type == "CommandIssued" and Kind(e.payload.kind) == kind
    ]
    return issued


def _advance_answering(driver, hosts, holding=frozenset()):
    """Advance m-1 and answer what it issues (but commands of a kind in `holding`) until it
    issues nothing more; returns the CommandIssued events."""
    issued = []
    for _ in range(10):
        new = [e for e in driver.advance("m-1") if e.type == "CommandIssued"]
        issued += new
        answer(driver, hosts, [e for e in new if Kind(e.payload.kind) not in holding])
        if not new:
            break
    return issued


def _rollback_as_post_copy_begins(driver, hosts):
    """A post-copy migration rolled back once its source reported post-copy, before the
    destination ran (its lease could not be taken, every retry); returns what the rollback
    issued, every command but the source's cancel answered. (Found by the seeded simulation
    with an operator's abort, seed 2009; an abort is refused there now.)"""
    start(driver, POSTCOPY)
    until_issued(driver, hosts, Kind.START_MIGRATION)
    answer(driver, hosts, [_issued(driver, Kind.START_MIGRATION)])  # it carries the switch
    assert driver.world.migrations["m-1"].src.status == "postcopy-active"
    issued = []
    while driver.world.migrations["m-1"].phase != Phase.ROLLING_BACK:
        acquire = until_issued(driver, hosts, Kind.ACQUIRE_LEASE)
        driver.answered.add(acquire.command_id)
        issued = driver.observe(failed(acquire, "lease held elsewhere"))
    issued += _advance_answering(driver, hosts, holding={Kind.CANCEL_MIGRATION})
    assert driver.world.migrations["m-1"].phase == Phase.ROLLING_BACK
    return decisions(issued)


def test_a_post_copy_rollback_cancels_the_source_before_it_destroys_the_destination():
    """Destroying the destination first would pause the source's post-copy, and QEMU 7.2
    leaves a paused post-copy that is then cancelled in `cancelling` for good: the destination
    goes only once the source's cancel is answered."""
    driver, hosts = fresh()
    issued = _rollback_as_post_copy_begins(driver, hosts)
    assert "cancel-migration@host-a" in issued
    assert "destroy-vm@host-b" not in issued
    answer(driver, hosts, [_issued(driver, Kind.CANCEL_MIGRATION)])
    assert "destroy-vm@host-b" in decisions(driver.advance("m-1"))


def _refused_abort(driver) -> None:
    before = len(driver.log)
    with pytest.raises(IllegalTransition) as err:
        driver.request(I.AbortMigration("m-1", "test", driver.now_us, "spiffe://t"))
    assert "in post-copy" in str(err.value)
    assert len(driver.log) == before


def test_a_rollback_waits_for_a_start_that_may_switch_to_post_copy():
    """Aborted while the source's start (carrying the post-copy switch) was still unanswered
    (sim seed 16228): the rollback destroyed the destination, then the start ran, post-copy
    began and paused against the dead destination, and the cancel left the source
    `cancelling` for good: fenced, a healthy VM lost. The destination now goes only once the
    start is answered, and then after the source's cancel."""
    driver, hosts = fresh()
    start(driver, POSTCOPY)
    start_cmd = until_issued(driver, hosts, Kind.START_MIGRATION)
    assert start_cmd.args.start_postcopy
    issued = driver.request(I.AbortMigration("m-1", "test", driver.now_us, "spiffe://t"))
    issued += _advance_answering(driver, hosts)
    assert "destroy-vm@host-b" not in decisions(issued)
    driver.answered.add(start_cmd.command_id)
    driver.observe(*hosts.answer(start_cmd))  # it ran late: post-copy began
    assert driver.world.migrations["m-1"].src.status == "postcopy-active"
    later = _advance_answering(driver, hosts, holding={Kind.CANCEL_MIGRATION})
    assert "cancel-migration@host-a" in decisions(later)
    assert "destroy-vm@host-b" not in decisions(later)
    answer(driver, hosts, [_issued(driver, Kind.CANCEL_MIGRATION)])
    driver.run("m-1", hosts)
    m = driver.world.migrations["m-1"]
    assert m.phase == Phase.ROLLED_BACK, m.reason
    assert driver.world.vms["vm-1"].running_hosts() == ["host-a"]
    clean(driver)


def test_a_switch_sent_but_never_taken_can_still_be_aborted():
    """The start carried the post-copy switch and was answered, but QEMU never switched (a
    wedged stream: no progress and no error) and the source runs on in pre-copy. Nothing but
    an operator ends such a migration, so the abort that post-copy refuses is accepted here:
    rolled back, the VM running on host-a."""
    driver, hosts = fresh()
    start(driver, POSTCOPY)
    start_cmd = until_issued(driver, hosts, Kind.START_MIGRATION)
    driver.answered.add(start_cmd.command_id)
    driver.observe(migration("host-a", "vm-1", "active"), succeeded(start_cmd))
    for _ in range(3):
        driver.now_us += TICK_US
        assert decisions(driver.advance("m-1")) == []  # nothing moves by itself
    m = driver.world.migrations["m-1"]
    assert (m.postcopy_switch_sent, m.postcopy_started) == (True, False)
    assert "RollbackDecided" in decisions(
        driver.request(I.AbortMigration("m-1", "wedged", driver.now_us, "spiffe://t"))
    )
    driver.run("m-1", hosts)
    assert m.phase == Phase.ROLLED_BACK, m.reason
    assert driver.world.vms["vm-1"].running_hosts() == ["host-a"]
    clean(driver)


def test_an_abort_in_post_copy_is_refused_and_a_broken_link_is_recovered():
    """Sim seed 18120: the operator aborted while the source was postcopy-active, before the
    destination ran, and the migration link broke as the rollback's cancel was sent. The
    source paused its post-copy, then took the cancel and stayed `cancelling` for good:
    fenced, a healthy VM lost. The abort is refused now (as libvirt refuses it); the break is
    met by post-copy recovery, and the VM completes its move."""
    driver, hosts = fresh()
    start(driver, POSTCOPY)
    until_issued(driver, hosts, Kind.START_MIGRATION)
    answer(driver, hosts, [_issued(driver, Kind.START_MIGRATION)])
    m = driver.world.migrations["m-1"]
    assert (m.src.status, m.cont_issued) == ("postcopy-active", False)
    _refused_abort(driver)
    driver.observe(
        migration("host-a", "vm-1", "postcopy-paused"),
        migration("host-b", "vm-1", "postcopy-paused"),
    )
    assert "PostcopyRecoveryDecided" in decisions(driver.advance("m-1"))
    driver.run("m-1", hosts)
    assert (m.phase, m.dst_resumed) == (Phase.FINISHING, True), m.reason
    clean_after_completion(driver, hosts)


def clean_after_completion(driver, hosts) -> None:
    driver.observe(
        migration("host-a", "vm-1", "completed"), migration("host-b", "vm-1", "completed")
    )
    driver.run("m-1", hosts)
    m, vm = driver.world.migrations["m-1"], driver.world.vms["vm-1"]
    assert m.phase == Phase.COMPLETED, m.reason
    assert (vm.host, vm.lease_holder, vm.status) == ("host-b", "host-b", VmStatus.RUNNING)
    clean(driver)


def test_a_source_left_cancelling_after_its_post_copy_paused_is_fenced():
    """The destination died anyway (a crash, not the rollback) before the cancel arrived: the
    source paused its post-copy, then took the cancel and stays `cancelling`. It will never run
    again, and the rollback must not wait for it forever: fenced, the VM lost."""
    driver, hosts = fresh()
    _rollback_as_post_copy_begins(driver, hosts)
    cancel = _issued(driver, Kind.CANCEL_MIGRATION).payload
    driver.observe(
        migration("host-a", "vm-1", "postcopy-paused"),
        migration("host-a", "vm-1", "cancelling"),
        succeeded(cancel),
    )
    driver.answered.add(cancel.command_id)
    driver.run("m-1", hosts)
    m = driver.world.migrations["m-1"]
    assert (m.phase, "cancelling for good" in m.reason) == (Phase.FENCED, True), m.reason
    clean(driver)


def test_a_repeated_prepare_answer_does_not_revive_a_destroyed_destination():
    """After a coordinator restart the unanswered PREPARE_INCOMING is sent again and hostd
    repeats its stored answer, after the fence had destroyed that QEMU: the repeat says
    nothing new, and the fence ends (it waited forever for a copy it believed alive)."""
    driver, hosts = fresh()
    start(driver)
    driver.advance("m-1")
    prepare = _issued(driver, Kind.PREPARE_INCOMING).payload
    driver.observe(hosts.kill("vm-1", "host-a"))  # the source dies before the answer
    answer(driver, hosts, [_issued(driver, Kind.PREPARE_INCOMING)])
    destroy = until_issued(driver, hosts, Kind.DESTROY_VM)
    driver.observe(*hosts.answer(destroy))
    driver.observe(*hosts.answer(prepare)[-1:], succeeded(destroy))  # the repeats
    driver.advance("m-1")
    m = driver.world.migrations["m-1"]
    assert (m.phase, m.dst.alive) == (Phase.FENCED, False), m.reason
    clean(driver)


def test_a_rollback_that_finds_post_copy_paused_recovers_it_instead_of_losing_the_vm():
    """The rollback was decided as post-copy began; its cancel never ran (hostd restarted) and
    the link broke: both ends paused. A paused post-copy source can be neither cancelled nor
    resumed, so destroying the destination would lose the VM: the post-copy is recovered and
    completes, the lease the rollback had taken back moving to the destination once more."""
    driver, hosts = fresh()
    _rollback_as_post_copy_begins(driver, hosts)
    assert driver.world.migrations["m-1"].src_lease_reacquired
    taken_back = driver.world.vms["vm-1"].lease_holder_generation
    cancel = _issued(driver, Kind.CANCEL_MIGRATION).payload
    driver.answered.add(cancel.command_id)
    driver.observe(
        migration("host-a", "vm-1", "postcopy-paused"),
        failed(cancel, "interrupted by a hostd restart; not executed again"),
    )
    assert "destroy-vm@host-b" not in decisions(driver.advance("m-1"))  # waits for host-b
    driver.observe(migration("host-b", "vm-1", "postcopy-paused"))
    assert decisions(driver.advance("m-1"))[:2] == [
        "PostcopyRecoveryDecided",
        "recover-incoming@host-b",
    ]
    driver.run("m-1", hosts)
    m = driver.world.migrations["m-1"]
    assert (m.phase, m.dst_resumed) == (Phase.FINISHING, True), m.reason
    driver.observe(
        migration("host-a", "vm-1", "completed"), migration("host-b", "vm-1", "completed")
    )
    driver.run("m-1", hosts)
    vm = driver.world.vms["vm-1"]
    assert m.phase == Phase.COMPLETED, m.reason
    assert (vm.host, vm.lease_holder) == ("host-b", "host-b")
    assert vm.lease_holder_generation > taken_back
    clean(driver)


def test_a_failed_continue_switchover_is_not_hidden_by_a_failed_start_postcopy():
    """Shell simulation seed 4453: auto mode asks for post-copy at the pass limit just as the
    source stops in pre-switchover; its hostd is killed before it sends either command, and
    on its return reports both "interrupted". The post-copy request not taking effect is
    harmless (pre-copy reached its switchover first), but it was the first failure found and
    its verdict, "nothing to do", hid the failed continue: the migration stalled for good."""
    driver, hosts = fresh()
    hosts.continue_at_pre_switchover = False  # the coordinator's continue
    policy = E.MigrationPolicy(auto_postcopy_max_passes=2)
    driver.request(
        I.StartMigration("m-1", "vm-1", "host-b", C.MIGRATION_MODE_AUTO, policy, driver.now_us)
    )
    started = until_issued(driver, hosts, Kind.START_MIGRATION)
    answer(driver, hosts, [e for e in driver.log if e.payload is started])
    driver.observe(
        migration("host-a", "vm-1", "active"),
        qmp("host-a", "vm-1", "MIGRATION_PASS", **{"pass": 2}),
    )
    (postcopy,) = [
        e.payload
        for e in driver.advance("m-1")
        if isinstance(e.payload, E.CommandIssued) and e.payload.kind == Kind.START_POSTCOPY
    ]
    driver.observe(qmp("host-a", "vm-1", "STOP"), migration("host-a", "vm-1", "pre-switchover"))
    cont = until_issued(driver, hosts, Kind.CONTINUE_SWITCHOVER)
    driver.answered |= {postcopy.command_id, cont.command_id}
    interrupted = "interrupted by a hostd restart; not executed again"
    driver.observe(failed(postcopy, interrupted), failed(cont, interrupted))
    events = driver.run("m-1", hosts)
    assert "RollbackDecided" in decisions(events)
    assert driver.world.migrations["m-1"].phase == Phase.ROLLED_BACK
    vm = driver.world.vms["vm-1"]
    assert (vm.host, vm.status) == ("host-a", VmStatus.RUNNING)
    clean(driver)


def _post_copy_paused_until_resume(driver, hosts):
    """Post-copy whose link broke: both ends paused, the recovery's resume issued to the
    source and kept unanswered (returned)."""
    start(driver, POSTCOPY)
    until_issued(driver, hosts, Kind.START_MIGRATION)
    answer(driver, hosts, [_issued(driver, Kind.START_MIGRATION)])
    answer(driver, hosts, [e for e in driver.advance("m-1") if e.type == "CommandIssued"])
    driver.observe(migration("host-a", "vm-1", "postcopy-active"), qmp("host-a", "vm-1", "STOP"))
    driver.observe(
        migration("host-a", "vm-1", "postcopy-paused"),
        migration("host-b", "vm-1", "postcopy-paused"),
    )
    resume = until_issued(driver, hosts, Kind.RESUME_MIGRATION)
    driver.answered.add(resume.command_id)
    return resume


def test_a_post_copy_resume_interrupted_after_it_took_effect_completes():
    """Shell simulation seed 5577: the link broke in post-copy and the recovery's resume ran
    (both ends back in postcopy-active, the destination resumed), then the source's hostd was
    killed before it answered, and on its return it reported the resume "interrupted". QEMU's
    own reports say it took effect; fencing both ends for it lost a healthy VM."""
    driver, hosts = fresh()
    resume = _post_copy_paused_until_resume(driver, hosts)
    driver.observe(
        migration("host-a", "vm-1", "postcopy-active"),
        migration("host-b", "vm-1", "postcopy-active"),
    )
    driver.run("m-1", hosts)
    m = driver.world.migrations["m-1"]
    assert (m.phase, m.dst_resumed) == (Phase.FINISHING, True), m.reason
    driver.observe(failed(resume, "interrupted by a hostd restart; not executed again"))
    assert "FencingDecided" not in decisions(driver.advance("m-1"))
    driver.observe(
        migration("host-a", "vm-1", "completed"), migration("host-b", "vm-1", "completed")
    )
    driver.run("m-1", hosts)
    vm = driver.world.vms["vm-1"]
    assert m.phase == Phase.COMPLETED, m.reason
    assert (vm.host, vm.status) == ("host-b", VmStatus.RUNNING)
    clean(driver)


def test_a_post_copy_resume_interrupted_while_it_recovers_is_given_its_time():
    """The source took the resume (postcopy-recover) and its hostd was killed before it
    answered: the "interrupted" resume is not a failed attempt while the source recovers; a
    new attempt would be refused by a source in postcopy-recover and use up the bound."""
    driver, hosts = fresh()
    resume = _post_copy_paused_until_resume(driver, hosts)
    m = driver.world.migrations["m-1"]
    driver.observe(migration("host-a", "vm-1", "postcopy-recover"))
    driver.observe(failed(resume, "interrupted by a hostd restart; not executed again"))
    assert decisions(driver.advance("m-1")) == []
    assert (m.phase, m.recovery_attempts) == (Phase.POSTCOPY_PAUSED, 1)
    driver.observe(
        migration("host-a", "vm-1", "postcopy-active"),
        migration("host-b", "vm-1", "postcopy-active"),
    )
    driver.run("m-1", hosts)
    driver.observe(
        migration("host-a", "vm-1", "completed"), migration("host-b", "vm-1", "completed")
    )
    driver.run("m-1", hosts)
    assert m.phase == Phase.COMPLETED, m.reason
    clean(driver)


def test_a_stale_snapshot_does_not_undo_a_newer_one():
    """hostd re-sends its unacknowledged events after its hello: a snapshot taken before the
    hello's (QEMU then in postcopy-active) must not step the source back from the paused
    post-copy the hello reported, as if a recovery had worked."""
    driver, hosts = fresh()
    _post_copy_paused_until_resume(driver, hosts)
    m = driver.world.migrations["m-1"]

    def snapshot(status: str, queried_at_us: int) -> Observation:
        return Observation("host-a", E.VmObserved(observation=C.VmObservation(
            vm="vm-1", process_alive=True, qmp_reachable=True, runstate="finish-migrate",
            migration_status=status, queried_at_us=queried_at_us), reason="hello"))  # fmt: skip

    driver.observe(snapshot("postcopy-paused", driver.now_us))
    driver.observe(snapshot("postcopy-active", driver.now_us - 1_000_000))
    assert (m.phase, m.src.status) == (Phase.POSTCOPY_PAUSED, "postcopy-paused")


def test_a_destination_lease_given_back_in_a_rollback_is_acquired_again():
    """Shell simulation seed 10627: in post-copy the destination acquired the lease while its
    enable-network was interrupted by a hostd restart; the rollback that followed took the
    lease back from it, then found post-copy paused and recovered it instead. The destination's
    acquire of the first attempt had succeeded, so none was issued again: the migration
    stalled with nobody holding the lease and the guest paused on both ends. (An interrupted
    enable is now sent again; here every retry is interrupted too, which makes the same
    rollback.)"""
    driver, hosts = fresh()
    hosts.enable_at_postcopy = False  # the destination's hostd restarted and forgot
    start(driver, POSTCOPY)
    until_issued(driver, hosts, Kind.START_MIGRATION)
    answer(driver, hosts, [_issued(driver, Kind.START_MIGRATION)])
    enable = until_issued(driver, hosts, Kind.ENABLE_NETWORK)
    assert _issued(driver, Kind.ACQUIRE_LEASE).payload.host_id == "host-b"
    for _ in range(MAX_COMMAND_RETRIES + 1):  # every retry interrupted too: a rollback
        driver.answered.add(enable.command_id)
        driver.observe(failed(enable, "interrupted by a hostd restart; not executed again"))
        issued = [e for e in driver.advance("m-1") if e.type == "CommandIssued"]
        if driver.world.migrations["m-1"].phase == Phase.ROLLING_BACK:
            answer(driver, hosts, [e for e in issued if e.payload.kind != Kind.CANCEL_MIGRATION])
            break
        (enable,) = [e.payload for e in issued]
    for _ in range(10):
        new = [e for e in driver.advance("m-1") if e.type == "CommandIssued"]
        answer(driver, hosts, [e for e in new if Kind(e.payload.kind) != Kind.CANCEL_MIGRATION])
        if not new:
            break
    m = driver.world.migrations["m-1"]
    assert (m.phase, driver.world.vms["vm-1"].lease_holder) == (Phase.ROLLING_BACK, "host-a")
    cancel = _issued(driver, Kind.CANCEL_MIGRATION).payload
    driver.answered.add(cancel.command_id)
    driver.observe(
        migration("host-a", "vm-1", "postcopy-paused"),
        migration("host-b", "vm-1", "postcopy-paused"),
        failed(cancel, "interrupted by a hostd restart; not executed again"),
    )
    driver.run("m-1", hosts)
    driver.observe(
        migration("host-a", "vm-1", "completed"), migration("host-b", "vm-1", "completed")
    )
    driver.run("m-1", hosts)
    vm = driver.world.vms["vm-1"]
    assert m.phase == Phase.COMPLETED, (m.phase, m.reason)
    assert (vm.host, vm.lease_holder, vm.status) == ("host-b", "host-b", VmStatus.RUNNING)
    clean(driver)
