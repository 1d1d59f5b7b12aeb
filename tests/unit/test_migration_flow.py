"""The migration state machine: whole decision sequences for each path, and each refusal."""

from __future__ import annotations

import pytest

from coordinator.core import IllegalTransition, Phase, decide
from coordinator.core import inputs as I
from coordinator.core.lifecycle import HOSTD_SWITCH_GRACE_US
from coordinator.core.state import Kind, VmStatus
from tests.unit.helpers import answer, decisions, fresh
from tools.sim import Observation, SimHosts, migration, qmp
from whimbrel.v1 import common_pb2 as C
from whimbrel.v1 import events_pb2 as E

PRECOPY, POSTCOPY, AUTO = (
    C.MIGRATION_MODE_PRECOPY,
    C.MIGRATION_MODE_POSTCOPY,
    C.MIGRATION_MODE_AUTO,
)


def start(driver, mode=PRECOPY, policy=None):
    return driver.request(
        I.StartMigration(
            "m-1", "vm-1", "host-b", mode, policy or E.MigrationPolicy(), driver.now_us
        )
    )


@pytest.mark.parametrize("hostd_continues", [True, False])
@pytest.mark.parametrize("hostd_releases", [True, False])
def test_precopy_completes_with_handoff_in_order(hostd_releases, hostd_continues):
    """Pre-copy issues prepare, migrate, switchover, handoff, cont, cleanup. hostd continues
    the source's switchover from pre-switchover and releases its lease at completed, as
    START_MIGRATION asked it to; when it did not (it restarted in between), the coordinator's
    commands do, once hostd had a grace period to report its own (so a command never crowds
    the pause)."""
    driver, hosts = fresh()
    hosts.release_at_switchover = hostd_releases
    hosts.continue_at_pre_switchover = hostd_continues
    events = start(driver) + driver.run("m-1", hosts)
    stop = next(e for e in events if e.type == "QmpEventReceived" and '"STOP"' in str(e.payload))
    for e in events:
        if e.type == "CommandIssued" and e.payload.kind in (
            Kind.RELEASE_LEASE,
            Kind.CONTINUE_SWITCHOVER,
        ):
            assert e.time_us - stop.time_us >= HOSTD_SWITCH_GRACE_US
    continued = [] if hostd_continues else ["continue-switchover@host-a"]
    release = [] if hostd_releases else ["release-lease@host-a"]
    assert decisions(events) == [
        "MigrationRequested",
        "MigrationAdmitted",
        "prepare-incoming@host-b",
        "start-migration@host-a",
        "enable-network@host-b",
        *continued,
        *release,
        "acquire-lease@host-b",
        "resume-vm@host-b",
        "announce@host-b",
        "destroy-vm@host-a",
        "MigrationFinished",
    ]
    m = driver.world.migrations["m-1"]
    assert m.phase == Phase.COMPLETED
    vm = driver.world.vms["vm-1"]
    assert (vm.host, vm.status, vm.lease_holder, vm.lease_generation) == (
        "host-b",
        VmStatus.RUNNING,
        "host-b",
        2,
    )
    assert m.pause_us > 0


@pytest.mark.parametrize("hostd_enables", [True, False])
def test_postcopy_mode_switches_after_migrate_and_waits_for_completion(hostd_enables):
    """Mode postcopy requests post-copy, hands off while pages flow, cleans up on completion.
    The destination's hostd enables networking at its own postcopy-active, as PREPARE_INCOMING
    asked it to; when that report is in by the source's stop (as here), no enable command goes
    out; when it is not (here: hostd restarted and forgot), the command does, with the acquire."""
    driver, hosts = fresh()
    hosts.enable_at_postcopy = hostd_enables
    events = start(driver, POSTCOPY) + driver.run("m-1", hosts)
    prepare = next(e.payload for e in events if e.type == "CommandIssued")
    assert prepare.args.enable_network_at_postcopy
    enable = [] if hostd_enables else ["enable-network@host-b"]
    assert decisions(events) == [
        "MigrationRequested",
        "MigrationAdmitted",
        "prepare-incoming@host-b",
        "PostcopyRequested",
        "start-migration@host-a",  # (carrying the switch: migrate-start-postcopy follows migrate)
        # (the source's lease was released by hostd at the STOP)
        *enable,
        "acquire-lease@host-b",
        "resume-vm@host-b",
        "announce@host-b",
    ]
    m = driver.world.migrations["m-1"]
    assert m.phase == Phase.FINISHING and m.point_of_no_return_passed
    # Pages still flow; completion on the source lets the coordinator finish.
    driver.observe(
        migration("host-a", "vm-1", "completed"), migration("host-b", "vm-1", "completed")
    )
    events = driver.run("m-1", hosts)
    assert decisions(events) == ["destroy-vm@host-a", "MigrationFinished"]
    assert m.phase == Phase.COMPLETED


def test_auto_mode_switches_to_postcopy_when_precopy_does_not_converge():
    """Mode auto asks for post-copy once remaining bytes stop shrinking, judged per pass."""
    driver, hosts = fresh()
    hosts.converge_after_passes = 0
    events = start(driver, AUTO) + driver.run("m-1", hosts)
    requested = [e.payload for e in events if e.type == "PostcopyRequested"]
    assert len(requested) == 1 and requested[0].by == "policy"
    assert "remain" in requested[0].reason
    assert "start-postcopy@host-a" in decisions(events)
    assert driver.world.migrations["m-1"].phase == Phase.FINISHING


def test_auto_mode_stays_precopy_when_it_converges():
    """Mode auto never asks for post-copy while each pass shrinks what remains."""
    driver, hosts = fresh()
    events = start(driver, AUTO) + driver.run("m-1", hosts)
    assert "PostcopyRequested" not in decisions(events)
    assert driver.world.migrations["m-1"].phase == Phase.COMPLETED


def test_cont_waits_for_every_handoff_fact():
    """The destination's cont is decided only after lease and network both moved."""
    driver, hosts = fresh()
    hosts.converge_after_passes = 0
    hosts.enable_at_postcopy = False  # (so that the enable waits for its command's answer)
    start(driver, POSTCOPY)
    # Run until the handoff commands are issued, withholding their answers.
    pending = []
    for _ in range(20):
        step = driver.advance("m-1")
        issued = [e for e in step if e.type == "CommandIssued"]
        handoff = [
            e for e in issued if Kind(e.payload.kind) in (Kind.ACQUIRE_LEASE, Kind.ENABLE_NETWORK)
        ]
        answer(driver, hosts, [e for e in issued if e not in handoff])
        pending += handoff
        if len(pending) == 2:
            break
    pending.sort(key=lambda e: e.payload.kind)
    assert decisions(pending) == ["acquire-lease@host-b", "enable-network@host-b"]
    answer(driver, hosts, pending[:1])  # lease acquired, network not yet
    assert decisions(driver.advance("m-1")) == []
    answer(driver, hosts, pending[1:])
    assert decisions(driver.advance("m-1")) == ["resume-vm@host-b"]


def test_abort_during_precopy_rolls_back_and_source_keeps_running():
    """Abort while transferring cancels, kills the destination and finishes rolled back."""
    driver, hosts = fresh()
    hosts.converge_after_passes = 0
    start(driver)
    events = driver.advance("m-1")
    events += answer(driver, hosts, events)  # prepare
    events += driver.advance("m-1")
    events += answer(driver, hosts, events[-1:])  # migrate
    aborted = driver.request(I.AbortMigration("m-1", "operator test", driver.now_us))
    events = aborted + driver.run("m-1", hosts)
    # The source takes its lease back first: hostd may have released it at a switchover stop
    # whose report is not in yet, and QEMU resumes a cancelled source by itself.
    assert decisions(events) == [
        "RollbackDecided",
        "acquire-lease@host-a",
        "cancel-migration@host-a",
        "destroy-vm@host-b",
        "MigrationFinished",
    ]
    m = driver.world.migrations["m-1"]
    assert m.phase == Phase.ROLLED_BACK and "operator test" in m.reason
    vm = driver.world.vms["vm-1"]
    assert (vm.host, vm.status, vm.lease_holder) == ("host-a", VmStatus.RUNNING, "host-a")


def test_abort_in_switchover_reacquires_lease_and_resumes_source():
    """Abort after the source stopped for the switchover restores lease and CPUs. The source
    keeps its lease in pre-switchover (QEMU would resume it by itself on a failure)."""
    driver, hosts = fresh()
    hosts.continue_at_pre_switchover = False  # its hostd restarted: the coordinator continues
    start(driver)
    events = []
    for _ in range(30):
        step = driver.advance("m-1")
        if any(
            e.type == "CommandIssued" and Kind(e.payload.kind) == Kind.CONTINUE_SWITCHOVER
            for e in step
        ):
            break
        events += step
        events += answer(driver, hosts, step)
        if not step and driver.world.migrations["m-1"].phase == Phase.SWITCHOVER:
            driver.now_us += HOSTD_SWITCH_GRACE_US  # hostd's own continue is overdue
        elif not step:
            driver._progress(
                "m-1",
                next(
                    e.payload
                    for e in events
                    if e.type == "CommandIssued" and Kind(e.payload.kind) == Kind.START_MIGRATION
                ),
                hosts,
            )
    m = driver.world.migrations["m-1"]
    assert m.phase == Phase.SWITCHOVER and not m.src_lease_released
    assert driver.world.vms["vm-1"].lease_holder == "host-a"
    aborted = driver.request(I.AbortMigration("m-1", "", driver.now_us))
    events = aborted + driver.run("m-1", hosts)
    assert decisions(events) == [
        "RollbackDecided",
        # The lease first: QEMU resumes a source by itself once its migration stops. (The
        # continue-switchover sent before the abort completes the transfer meanwhile, so
        # there is nothing to cancel; the destination never ran and is destroyed.)
        "acquire-lease@host-a",
        "destroy-vm@host-b",
        "resume-vm@host-a",
        "MigrationFinished",
    ]
    acquire = next(
        e.payload
        for e in events
        if e.type == "CommandIssued" and Kind(e.payload.kind) == Kind.ACQUIRE_LEASE
    )
    assert acquire.args.lease_generation == 2  # generations only grow
    assert driver.world.vms["vm-1"].status == VmStatus.RUNNING


def test_abort_after_point_of_no_return_is_refused_and_decides_nothing():
    """Once the destination's cont is issued, abort raises and appends nothing."""
    driver, hosts = fresh()
    start(driver, POSTCOPY)
    driver.run("m-1", hosts)
    before = len(driver.log)
    with pytest.raises(IllegalTransition) as err:
        decide(driver.world, I.AbortMigration("m-1", "", driver.now_us))
    assert "point of no return" in str(err.value)
    assert err.value.found.startswith("finishing") and err.value.allowed
    assert len(driver.log) == before


def test_switch_to_postcopy_refusals():
    """Switching is refused in mode precopy and when already requested."""
    driver, _hosts = fresh()
    start(driver, PRECOPY)
    with pytest.raises(IllegalTransition, match="mode precopy"):
        decide(driver.world, I.SwitchToPostcopy("m-1", driver.now_us))
    driver2, _ = fresh()
    start(driver2, AUTO)
    (ev,) = driver2.request(I.SwitchToPostcopy("m-1", driver2.now_us))
    assert ev.payload.by == "operator"
    with pytest.raises(IllegalTransition, match="already"):
        decide(driver2.world, I.SwitchToPostcopy("m-1", driver2.now_us))


def test_failed_handoff_command_before_cont_rolls_back():
    """A destination that cannot enable networking makes the migration fall back."""
    driver, hosts = fresh()
    hosts.fail_kinds = {Kind.ENABLE_NETWORK}
    events = start(driver) + driver.run("m-1", hosts)
    d = decisions(events)
    assert "resume-vm@host-b" not in d
    # Here the switch completed (hostd continued it) before networking was asked for, so the
    # enable went out with the destination's acquire: the rollback gives the destination's
    # lease back and the source takes it, the destination is destroyed, and the source gets
    # its CPUs back (QEMU resumes a source whose migration completed).
    assert d[d.index("RollbackDecided") :] == [
        "RollbackDecided",
        "release-lease@host-b",
        "acquire-lease@host-a",
        "destroy-vm@host-b",
        "resume-vm@host-a",
        "MigrationFinished",
    ]
    assert driver.world.migrations["m-1"].phase == Phase.ROLLED_BACK


def test_destination_death_during_postcopy_before_cont_fences_source():
    """QEMU cannot resume a post-copy source, so a dead destination loses the VM."""
    driver, hosts = fresh()
    start(driver, POSTCOPY)
    # Run until the source lease is being released, then kill the destination.
    for _ in range(10):
        step = driver.advance("m-1")
        if any(
            Kind(e.payload.kind) == Kind.RELEASE_LEASE for e in step if e.type == "CommandIssued"
        ):
            break
        answer(driver, hosts, step)
    driver.observe(Observation("host-b", E.QemuExited(vm="vm-1", pid=1, exit_code=1)))
    events = driver.run("m-1", hosts)
    d = decisions(events)
    assert d[:2] == ["FencingDecided", "destroy-vm@host-a"]
    assert d[-2:] == ["VmLost", "MigrationFinished"]
    assert "resume-vm@host-a" not in d
    assert driver.world.migrations["m-1"].phase == Phase.FENCED
    assert driver.world.vms["vm-1"].status == VmStatus.LOST


def test_source_death_after_cont_in_postcopy_fences_destination():
    """After the point of no return a dead source leaves the destination without pages."""
    driver, hosts = fresh()
    start(driver, POSTCOPY)
    driver.run("m-1", hosts)
    driver.observe(Observation("host-a", E.QemuExited(vm="vm-1", pid=1, exit_code=-1, signal=9)))
    events = driver.run("m-1", hosts)
    assert decisions(events) == [
        "FencingDecided",
        "destroy-vm@host-b",
        "VmLost",
        "MigrationFinished",
    ]
    assert "post-copy" in driver.world.vms["vm-1"].lost_reason


def test_paused_postcopy_recovers_then_completes():
    """postcopy-paused after cont: migrate-recover on the destination, resume on the source."""
    driver, hosts = fresh()
    start(driver, POSTCOPY)
    driver.run("m-1", hosts)
    driver.observe(
        migration("host-a", "vm-1", "postcopy-paused"),
        migration("host-b", "vm-1", "postcopy-paused"),
    )
    events = driver.run("m-1", hosts)
    assert decisions(events) == [
        "PostcopyRecoveryDecided",
        "recover-incoming@host-b",
        "resume-migration@host-a",
    ]
    resume = next(
        e.payload
        for e in events
        if e.type == "CommandIssued" and Kind(e.payload.kind) == Kind.RESUME_MIGRATION
    )
    assert resume.args.uri == "tcp:127.0.0.1:49153"
    m = driver.world.migrations["m-1"]
    assert m.phase == Phase.FINISHING and m.attempt == 2
    driver.observe(migration("host-a", "vm-1", "completed"))
    assert decisions(driver.run("m-1", hosts)) == ["destroy-vm@host-a", "MigrationFinished"]


def test_recovery_that_keeps_failing_is_fenced():
    """Bounded recovery: after max attempts both sides are killed and the VM recorded lost."""
    driver, hosts = fresh()
    start(driver, POSTCOPY, E.MigrationPolicy(max_recovery_attempts=2))
    driver.run("m-1", hosts)
    driver.observe(
        migration("host-a", "vm-1", "postcopy-paused"),
        migration("host-b", "vm-1", "postcopy-paused"),
    )
    hosts.fail_kinds = {Kind.RECOVER_INCOMING}
    d = decisions(driver.run("m-1", hosts))
    assert d == [
        "PostcopyRecoveryDecided",
        "recover-incoming@host-b",
        "PostcopyRecoveryDecided",
        "recover-incoming@host-b",
        "FencingDecided",
        "destroy-vm@host-a",
        "destroy-vm@host-b",
        "VmLost",
        "MigrationFinished",
    ]


def test_late_result_of_superseded_attempt_is_ignored():
    """A result from before a rollback does not move the migration forward again."""
    driver, hosts = fresh()
    start(driver)
    _admitted, prepare = driver.advance("m-1")
    driver.request(I.AbortMigration("m-1", "", driver.now_us))
    driver.observe(*hosts.answer(prepare.payload))
    m = driver.world.migrations["m-1"]
    assert m.incoming_uri == "" and m.phase == Phase.ROLLING_BACK


def test_recovery_waits_for_both_hosts():
    """A paused post-copy is recovered only once both ends report the pause and both hosts
    answer (QEMU refuses migrate-recover on a destination still postcopy-active)."""
    driver, hosts = fresh()
    start(driver, POSTCOPY)
    driver.run("m-1", hosts)
    driver.observe(
        Observation("host-a", E.HostDisconnected(host_id="host-a", generation=1)),
        migration("host-b", "vm-1", "postcopy-paused"),
    )
    assert decisions(driver.advance("m-1")) == []  # the source's side is not known yet
    driver.connect("host-a")
    driver.observe(migration("host-a", "vm-1", "postcopy-paused"))
    assert decisions(driver.advance("m-1")) == [
        "PostcopyRecoveryDecided",
        "recover-incoming@host-b",
    ]


def test_destination_stop_event_before_completion_does_not_count_as_resume():
    """Only the destination's RESUME (or cont result) marks it resumed."""
    driver, _hosts = fresh()
    start(driver)
    driver.observe(qmp("host-b", "vm-1", "STOP"))
    assert not driver.world.migrations["m-1"].dst_resumed


def test_rollback_after_destination_took_lease_releases_it_before_source_retakes_it():
    """Destination dies holding the lease: rollback releases it there before the source retakes."""
    driver, hosts = fresh()
    start(driver)
    for _ in range(30):
        step = driver.advance("m-1")
        answer(
            driver,
            hosts,
            [e for e in step if Kind(e.payload.kind) != Kind.ENABLE_NETWORK]
            if step and step[0].type == "CommandIssued"
            else step,
        )
        if driver.world.vms["vm-1"].lease_holder == "host-b":
            break
        if not step:
            start_cmd = next(
                e.payload
                for e in driver.log
                if e.type == "CommandIssued" and Kind(e.payload.kind) == Kind.START_MIGRATION
            )
            driver._progress("m-1", start_cmd, hosts)
    assert driver.world.vms["vm-1"].lease_holder == "host-b"
    driver.observe(hosts.kill("vm-1", "host-b"))
    d = decisions(driver.run("m-1", hosts))
    assert d == [
        "RollbackDecided",
        "release-lease@host-b",
        "acquire-lease@host-a",
        "resume-vm@host-a",
        "MigrationFinished",
    ]
    vm = driver.world.vms["vm-1"]
    assert (vm.lease_holder, vm.lease_generation, vm.host) == ("host-a", 3, "host-a")


def test_cont_waits_for_the_destinations_own_network_enable():
    """Networking that the destination's hostd enables by itself at postcopy-active counts
    for the handoff once reported, from the destination only; until then cont waits."""
    driver, hosts = fresh()
    hosts.enable_at_postcopy = False
    start(driver, POSTCOPY)
    for _ in range(20):
        issued = [e for e in driver.advance("m-1") if e.type == "CommandIssued"]
        # The fallback enable command is never answered: hostd's own report must do.
        answer(driver, hosts, [e for e in issued if Kind(e.payload.kind) != Kind.ENABLE_NETWORK])
        if driver.world.migrations["m-1"].dst_lease_generation:
            break
    enabled = E.NetworkChanged(vm="vm-1", state=E.NETWORK_STATE_ENABLED)
    driver.observe(Observation("host-a", enabled))  # the source's networking: not the fact
    assert decisions(driver.advance("m-1")) == []
    driver.observe(Observation("host-b", enabled))
    assert decisions(driver.advance("m-1")) == ["resume-vm@host-b"]


def until_start_postcopy(driver, hosts):
    """Start a post-copy migration and answer every command up to START_MIGRATION, which
    carries the switch to post-copy and is returned unanswered."""
    start(driver, POSTCOPY)
    for _ in range(10):
        issued = [e for e in driver.advance("m-1") if e.type == "CommandIssued"]
        postcopy = [e for e in issued if e.payload.args.start_postcopy]
        answer(driver, hosts, [e for e in issued if e not in postcopy])
        if postcopy:
            assert [Kind(e.payload.kind) for e in postcopy] == [Kind.START_MIGRATION]
            return postcopy
    raise AssertionError("the switch to post-copy was never sent")


def test_postcopy_enters_switchover_at_the_source_stop_without_a_command():
    """The switchover phase starts when the source stops to switch over, a fact: in post-copy
    hostd releases the lease and enables the destination's networking by itself, so no
    command marks it; the handoff's acquire follows at once."""
    driver, hosts = fresh()
    postcopy = until_start_postcopy(driver, hosts)
    m = driver.world.migrations["m-1"]
    assert m.phase == Phase.TRANSFERRING
    answer(driver, hosts, postcopy)  # postcopy-active, STOP, the release, the destination's enable
    assert m.phase == Phase.SWITCHOVER
    assert decisions(driver.advance("m-1")) == ["acquire-lease@host-b"]
    assert m.phase == Phase.HANDOFF


def test_postcopy_mode_that_completes_in_precopy_still_enters_switchover():
    """A small guest can finish in pre-copy before migrate-start-postcopy takes effect: the
    source stops and completes with no postcopy-active. That stop is the switchover too."""
    driver, hosts = fresh()
    until_start_postcopy(driver, hosts)  # (and the start of post-copy never takes effect)
    m = driver.world.migrations["m-1"]
    assert m.phase == Phase.TRANSFERRING
    driver.observe(qmp("host-a", "vm-1", "STOP"), migration("host-a", "vm-1", "completed"))
    assert m.phase == Phase.SWITCHOVER and not m.postcopy_started
    driver.observe(
        migration("host-b", "vm-1", "completed"),
        Observation("host-a", E.LeaseReleased(vm="vm-1", holder="host-a", generation=1)),
    )
    assert decisions(driver.advance("m-1")) == ["enable-network@host-b", "acquire-lease@host-b"]
    assert m.phase == Phase.HANDOFF


class AwayDestination(SimHosts):
    """The destination's enable and acquire of the first attempt get no answer yet (its hostd
    died on the enable); they are kept for the test to answer."""

    def __init__(self) -> None:
        super().__init__()
        self.withheld: list[E.CommandIssued] = []

    def answer(self, cmd: E.CommandIssued) -> list[Observation]:
        if (
            cmd.host_id == "host-b"
            and cmd.attempt == 1
            and cmd.kind
            in (
                Kind.ENABLE_NETWORK,
                Kind.ACQUIRE_LEASE,
            )
        ):
            self.withheld.append(cmd)
            return []
        return super().answer(cmd)


def test_rollback_waits_for_an_acquire_the_destination_may_still_run():
    """The destination's hostd restarts during a pre-copy switchover: its enable is reported
    interrupted (so the migration rolls back) while the acquire sent to it before runs on its
    return and takes the lease. The source takes the lease back only after that acquire was
    answered and the destination gave the lease up, not in a race its retries would lose."""
    driver, _ = fresh()
    hosts = AwayDestination()
    hosts.leases["vm-1"] = ("host-a", 1)
    start(driver)
    driver.run("m-1", hosts)
    enable, acquire = sorted(hosts.withheld, key=lambda c: c.kind == Kind.ACQUIRE_LEASE)
    assert (Kind(enable.kind), Kind(acquire.kind)) == (Kind.ENABLE_NETWORK, Kind.ACQUIRE_LEASE)
    interrupted = E.CommandFailed(command_id=enable.command_id, attempt=1, kind=enable.kind,
                                  vm="vm-1", error="interrupted by a hostd restart")  # fmt: skip
    driver.observe(Observation("host-b", interrupted))
    assert decisions(driver.advance("m-1")) == ["RollbackDecided"]  # and nothing more yet
    driver.observe(*SimHosts.answer(hosts, acquire))  # it took the lease on its return
    assert decisions(driver.advance("m-1"))[:1] == ["release-lease@host-b"]
    events = driver.run("m-1", hosts)
    assert "acquire-lease@host-a" in decisions(events)
    m = driver.world.migrations["m-1"]
    assert m.phase == Phase.ROLLED_BACK
    vm = driver.world.vms["vm-1"]
    assert (vm.host, vm.status, vm.lease_holder) == ("host-a", VmStatus.RUNNING, "host-a")
