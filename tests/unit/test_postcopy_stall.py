"""A post-copy whose link stops carrying bytes without breaking (a peer or middlebox that
stopped forwarding) gives QEMU no error on either end: without a watch, the destination's guest
would wait for its missing pages for good. The coordinator pauses each end still
postcopy-active once the policy's progress_timeout_s has passed without progress, and the
post-copy recovery reconnects them (coordinator.core.convergence.postcopy_stall_reason,
lifecycle._pause_wedged_postcopy)."""

from __future__ import annotations

from coordinator.core import Event, Phase
from coordinator.core import inputs as I
from coordinator.core.invariants import InvariantChecker
from coordinator.core.state import CommandState, Kind, MigrationState
from tests.unit.helpers import answer, decisions, fresh
from tools.sim import Driver, Observation, SimHosts, migration
from whimbrel.v1 import common_pb2 as C
from whimbrel.v1 import events_pb2 as E

LIMIT_S = 10


def in_postcopy(limit_s: int = LIMIT_S) -> tuple[Driver, SimHosts, MigrationState]:
    """A post-copy migration past the destination's cont, pages still flowing."""
    driver, hosts = fresh()
    driver.request(I.StartMigration(
        "m-1", "vm-1", "host-b", C.MIGRATION_MODE_POSTCOPY,
        E.MigrationPolicy(progress_timeout_s=limit_s), driver.now_us,
    ))  # fmt: skip
    driver.run("m-1", hosts)
    m = driver.world.migrations["m-1"]
    assert m.cont_issued and m.phase == Phase.FINISHING
    assert (m.src.status, m.dst.status) == ("postcopy-active", "postcopy-active")
    return driver, hosts, m


def sampled(driver: Driver, sent: int, after_s: float) -> list[str]:
    """`after_s` later, the source's periodic sample says `sent` bytes went so far; then what
    the coordinator decides."""
    driver.now_us += int(after_s * 1_000_000)
    driver.observe(Observation("host-a", E.MigrationStatsSampled(
        vm="vm-1", status="postcopy-active", total_bytes=1 << 30, transferred_bytes=sent,
    )))  # fmt: skip
    return decisions(driver.advance("m-1"))


def pauses(events: list[str]) -> list[str]:
    return [d for d in events if d.startswith("pause-migration@")]


def test_a_wedged_post_copy_is_paused_on_both_ends_then_recovered_and_completed() -> None:
    driver, hosts, m = in_postcopy()
    assert pauses(sampled(driver, 700 << 20, 5)) == []  # bytes moved since the switch
    assert pauses(sampled(driver, 700 << 20, 5)) == []  # 5 s without a byte
    decided = sampled(driver, 700 << 20, 6)  # 11 s
    assert pauses(decided) == ["pause-migration@host-a", "pause-migration@host-b"]
    (issued,) = {c.issued.args.reason for c in m.commands.values()
                 if c.kind == Kind.PAUSE_MIGRATION}  # fmt: skip
    assert issued.startswith("post-copy wedged: the source sent nothing for 11 s (limit 10 s")
    # Both ends pause, the recovery reconnects them, and post-copy completes.
    driver.run("m-1", hosts)
    assert m.recovery_attempts == 1 and m.phase == Phase.FINISHING
    assert (m.src.status, m.dst.status) == ("postcopy-active", "postcopy-active")
    driver.observe(migration("host-a", "vm-1", "completed"),
                   migration("host-b", "vm-1", "completed"))  # fmt: skip
    driver.run("m-1", hosts)
    assert m.phase == Phase.COMPLETED
    assert driver.world.vms["vm-1"].running_hosts() == ["host-b"]
    assert InvariantChecker().check_quiescent(driver.log) == []


def test_slow_post_copy_progress_and_silence_are_not_a_stall() -> None:
    """Bytes that keep coming, however few, are progress; no sample at all (a hostd that
    restarted) is no evidence; and the stretch is counted from the switch, not from the last
    pre-copy sample."""
    driver, _, m = in_postcopy()
    for i in range(1, 40):
        assert pauses(sampled(driver, (700 << 20) + i * 4096, 5)) == []
    driver.now_us += 3600 * 1_000_000
    assert driver.advance("m-1") == [] and m.phase == Phase.FINISHING


def test_one_end_paused_while_the_other_still_waits_has_the_other_paused() -> None:
    """The destination saw the link break; the source, on a link that carries nothing, never
    does (and sends no byte either way). The limit after the destination's pause, the source is
    paused too, and the recovery follows."""
    for paused, waiting in (("host-b", "host-a"), ("host-a", "host-b")):
        driver, hosts, m = in_postcopy()
        driver.observe(migration(paused, "vm-1", "postcopy-paused"))
        driver.now_us += LIMIT_S * 1_000_000 // 2
        assert pauses(decisions(driver.advance("m-1"))) == []
        driver.now_us += LIMIT_S * 1_000_000 // 2 + 1
        decided = decisions(driver.advance("m-1"))
        assert pauses(decided) == [f"pause-migration@{waiting}"]
        driver.run("m-1", hosts)
        assert m.recovery_attempts == 1 and m.phase == Phase.FINISHING, m.reason


def test_a_failed_pause_is_sent_again_after_the_limit_and_never_rolls_back() -> None:
    """A pause QEMU refused (it had just completed, or paused by itself) is no reason to go
    back; while the stall lasts it is sent again a limit later."""
    driver, hosts, m = in_postcopy()
    hosts.fail_kinds.add(Kind.PAUSE_MIGRATION)
    sampled(driver, 1 << 20, 5)
    assert len(pauses(sampled(driver, 1 << 20, LIMIT_S + 1))) == 2
    answer(driver, hosts, driver.log)  # both refused
    assert pauses(sampled(driver, 1 << 20, 5)) == []  # within the limit of the last pauses
    assert m.phase == Phase.FINISHING and "CommandFailed" in {e.type for e in driver.log}
    assert pauses(sampled(driver, 1 << 20, LIMIT_S)) == [
        "pause-migration@host-a", "pause-migration@host-b",
    ]  # fmt: skip


def test_an_end_that_never_pauses_is_fenced_with_the_other_after_the_bound() -> None:
    """migrate-pause answered, yet the ends stay postcopy-active, limit after limit: after
    three pauses of each in the attempt, both are fenced (the guest's memory is split between
    them), never left waiting."""
    driver, _, m = in_postcopy()
    sampled(driver, 1 << 20, 5)
    sent = 0
    for _ in range(10):
        if m.phase != Phase.FINISHING:
            break
        sampled(driver, 1 << 20, LIMIT_S + 1)
        for e in list(driver.log):
            p = e.payload
            if not isinstance(p, E.CommandIssued) or p.kind != Kind.PAUSE_MIGRATION:
                continue
            if p.command_id in driver.answered:
                continue
            driver.answered.add(p.command_id)
            sent += 1
            driver.observe(Observation(p.host_id, E.CommandSucceeded(
                command_id=p.command_id, attempt=p.attempt, kind=p.kind, vm="vm-1",
            )))  # fmt: skip
    assert sent == 6  # three to each end
    assert m.phase == Phase.FENCING
    assert "post-copy wedged: the source sent nothing" in m.reason
    assert "was paused 3 times and is still postcopy-active" in m.reason


def test_a_recovered_source_reported_before_the_destination_is_not_paused_again() -> None:
    """Both ends paused and the recovery took longer than the limit (a host was waited for).
    The source's postcopy-active is folded before the destination's own reports (their streams
    are apart): the destination's pause from before the recovery must not make the fresh link
    look wedged."""
    driver, hosts, m = in_postcopy()
    driver.observe(migration("host-b", "vm-1", "postcopy-paused"),
                   migration("host-a", "vm-1", "postcopy-paused"))  # fmt: skip
    (recover,) = commands(driver.advance("m-1"), Kind.RECOVER_INCOMING)
    driver.answered.add(recover.command_id)
    driver.observe(*hosts.answer(recover))
    (resume,) = commands(driver.advance("m-1"), Kind.RESUME_MIGRATION)
    driver.answered.add(resume.command_id)
    driver.now_us += (LIMIT_S + 5) * 1_000_000
    driver.observe(migration("host-a", "vm-1", "postcopy-recover"),
                   migration("host-a", "vm-1", "postcopy-active"), succeeded(resume))  # fmt: skip
    assert m.phase == Phase.FINISHING and m.dst.status == "postcopy-paused"
    assert pauses(decisions(driver.advance("m-1"))) == []
    driver.observe(migration("host-b", "vm-1", "postcopy-recover"),
                   migration("host-b", "vm-1", "postcopy-active"))  # fmt: skip
    assert pauses(decisions(driver.advance("m-1"))) == [] and m.recovery_attempts == 1


def test_a_failure_held_for_the_other_ends_pause_is_held_no_longer_than_the_limit() -> None:
    """Before the destination's cont, its network enable fails for good just as it saw the
    link break. The failure is held while the source can be expected to report the pause too;
    on a link that carries nothing it never does. Once the limit has passed, the source is
    paused, the recovery follows, and the enable is sent again under the new attempt."""
    driver, hosts = fresh()
    hosts.enable_at_postcopy = False
    driver.request(I.StartMigration(
        "m-1", "vm-1", "host-b", C.MIGRATION_MODE_POSTCOPY,
        E.MigrationPolicy(progress_timeout_s=LIMIT_S), driver.now_us,
    ))  # fmt: skip
    m = driver.world.migrations["m-1"]
    enable = None
    for _ in range(20):  # every command answered but the destination's network enable
        for command in commands(driver.advance("m-1")):
            if command.kind == Kind.ENABLE_NETWORK:
                enable = command
            elif command.command_id not in driver.answered:
                driver.answered.add(command.command_id)
                driver.observe(*hosts.answer(command))
        if enable is not None and m.postcopy_started:
            break
    assert enable is not None and m.postcopy_started and not m.cont_issued
    driver.observe(migration("host-b", "vm-1", "postcopy-paused"))
    hosts.fail_kinds.add(Kind.ENABLE_NETWORK)
    for _ in range(3):  # the first failures are retried, the third is held
        assert enable is not None
        driver.answered.add(enable.command_id)
        driver.observe(*hosts.answer(enable))
        enable = next(iter(commands(driver.advance("m-1"), Kind.ENABLE_NETWORK)), None)
    assert enable is None and m.phase not in (Phase.ROLLING_BACK, Phase.FENCING)
    assert pauses(sampled(driver, 5 << 20, LIMIT_S / 2)) == []  # held
    hosts.fail_kinds.clear()
    assert pauses(sampled(driver, 5 << 20, LIMIT_S / 2 + 1)) == ["pause-migration@host-a"]
    driver.run("m-1", hosts)
    assert m.recovery_attempts == 1 and m.cont_issued and m.phase == Phase.FINISHING, m.reason
    enables = [c for c in m.commands.values() if c.kind == Kind.ENABLE_NETWORK]
    assert enables[-1].attempt == m.attempt and enables[-1].state == CommandState.SUCCEEDED


def commands(events: list[Event], kind: Kind | None = None) -> list[E.CommandIssued]:
    return [e.payload for e in events if isinstance(e.payload, E.CommandIssued)
            and (kind is None or e.payload.kind == kind)]  # fmt: skip


def succeeded(command: E.CommandIssued) -> Observation:
    return Observation(command.host_id, E.CommandSucceeded(
        command_id=command.command_id, attempt=command.attempt, kind=command.kind, vm="vm-1",
    ))  # fmt: skip
