"""Convergence policies (coordinator.core.policies, coordinator.core.convergence): stored and
resolved policies, downtime steps per pass, stalls judged on remaining bytes, the completion
timeout, and an operator's bandwidth change and force-complete."""

from __future__ import annotations

import pytest

from coordinator.core import IllegalTransition, InvalidRequest, NotFound, Phase
from coordinator.core import inputs as I
from coordinator.core.invariants import InvariantChecker
from coordinator.core.state import Kind
from tests.unit.helpers import fresh
from tools.sim import Observation, migration, qmp
from whimbrel.v1 import common_pb2 as C
from whimbrel.v1 import events_pb2 as E

PRECOPY, AUTO = C.MIGRATION_MODE_PRECOPY, C.MIGRATION_MODE_AUTO


def start(driver, mode=PRECOPY, policy_name="", policy=None):  # type: ignore[no-untyped-def]
    request = I.StartMigration(
        "m-1", "vm-1", "host-b", mode, policy or E.MigrationPolicy(), driver.now_us,
        policy_name=policy_name,
    )  # fmt: skip
    driver.request(request)
    return driver.world.migrations["m-1"]


def transferring(driver, hosts, mode=PRECOPY, **kwargs):  # type: ignore[no-untyped-def]
    """The migration sending memory (START_MIGRATION answered), no pass reported yet."""
    hosts.converge_after_passes = 0
    m = start(driver, mode, **kwargs)
    for _ in range(2):  # prepare, then start
        for e in driver.advance("m-1"):
            if e.type == "CommandIssued":
                driver.observe(*hosts.answer(e.payload))
    driver.observe(Observation("host-a", E.QmpEventReceived(
        vm="vm-1", event="MIGRATION", data_json='{"status": "active"}')))  # fmt: skip
    assert m.phase == Phase.TRANSFERRING
    return m


def pass_(driver, n: int, remaining: int) -> list:  # type: ignore[type-arg]
    """QEMU's pass `n` with `remaining` bytes left, then what the coordinator decides."""
    driver.observe(
        qmp("host-a", "vm-1", "MIGRATION_PASS", **{"pass": n}),
        Observation("host-a", E.MigrationStatsSampled(
            vm="vm-1", status="active", total_bytes=1 << 30, remaining_bytes=remaining,
            **{"pass": n},
        )),
    )  # fmt: skip
    return driver.advance("m-1")


def define(driver, name: str, **fields) -> None:  # type: ignore[no-untyped-def]
    driver.request(I.DefinePolicy(name, E.MigrationPolicy(**fields), "", driver.now_us))


def test_a_named_policy_is_resolved_once_and_request_fields_override_it():
    driver, _ = fresh()
    parameters = E.MigrationParameters(max_bandwidth=10 << 20, downtime_limit_ms=100)
    define(driver, "slow-link", stall_passes=4, parameters=parameters)
    driver.request(I.SetDefaultPolicy("slow-link", "", driver.now_us))
    override = E.MigrationPolicy(parameters=E.MigrationParameters(downtime_limit_ms=50))
    m = start(driver, policy=override)
    assert m.policy.name == "slow-link" and m.policy.stall_passes == 4
    assert (m.policy.parameters.max_bandwidth, m.policy.parameters.downtime_limit_ms) == (
        10 << 20,
        50,
    )
    assert m.policy.max_recovery_attempts == 3  # the built-in default fills what is unset
    # A new version of the stored policy leaves the running migration's alone.
    define(driver, "slow-link", stall_passes=9)
    assert driver.world.migrations["m-1"].policy.stall_passes == 4


def test_bad_policies_are_refused_and_record_nothing():
    driver, _ = fresh()
    head = len(driver.log)
    for fields, match in (
        ({"downtime_steps_ms": [100, 5000]}, "at most 2000 ms"),
        ({"downtime_steps_ms": [0]}, "each above 0 ms"),
        ({"parameters": E.MigrationParameters(cpu_throttle_initial=100)}, "at most 99"),
        ({"on_stall": 7}, "unknown on_stall"),
        ({"progress_timeout_s": 86_401}, "progress_timeout_s 86400"),
    ):
        with pytest.raises(InvalidRequest, match=match):
            define(driver, "bad", **fields)
    with pytest.raises(InvalidRequest, match="policy name"):
        define(driver, "Bad Name")
    with pytest.raises(NotFound):
        driver.request(I.SetDefaultPolicy("nope", "", driver.now_us))
    with pytest.raises(NotFound):
        start(driver, policy_name="nope")
    assert len(driver.log) == head


def test_the_downtime_limit_steps_up_per_pass_and_each_change_is_recorded():
    """Steps only raise the limit (a force-complete is never undone): pass 2's 200 ms is
    below the policy's 300 ms and changes nothing; pass 3's 500 ms does."""
    driver, hosts = fresh()
    m = transferring(driver, hosts, policy=E.MigrationPolicy(downtime_steps_ms=[200, 500]))
    assert pass_(driver, 1, 900 << 20) == []
    assert pass_(driver, 2, 800 << 20) == []
    tuned, command = pass_(driver, 3, 700 << 20)
    assert (tuned.payload.by, tuned.payload.reason) == (
        "policy",
        "pass 3: downtime limit 300 -> 500 ms",
    )
    assert command.payload.kind == Kind.SET_MIGRATION_PARAMETERS
    assert command.payload.args.parameters.downtime_limit_ms == 500
    assert m.parameters.downtime_limit_ms == 500


def test_downtime_steps_only_raise_the_limit():
    driver, hosts = fresh()
    m = transferring(driver, hosts, policy=E.MigrationPolicy(downtime_steps_ms=[400, 600]))
    (tuned, command) = pass_(driver, 2, 800 << 20)
    assert tuned.payload.reason == "pass 2: downtime limit 300 -> 400 ms"
    driver.observe(*hosts.answer(command.payload))
    (tuned, _) = pass_(driver, 3, 700 << 20)
    assert m.parameters.downtime_limit_ms == 600
    assert pass_(driver, 4, 600 << 20) == []  # the last step holds


def test_a_stall_rolls_back_a_precopy_with_the_numbers():
    driver, hosts = fresh()
    transferring(driver, hosts, policy=E.MigrationPolicy(stall_passes=3))
    pass_(driver, 1, 500 << 20)
    pass_(driver, 2, 400 << 20)  # the minimum
    assert pass_(driver, 3, 450 << 20) == [] and pass_(driver, 4, 420 << 20) == []
    decided = pass_(driver, 5, 410 << 20)
    assert decided[0].type == "RollbackDecided"
    assert decided[0].payload.reason == (
        "policy: stalled: no new minimum of remaining bytes for 3 passes "
        f"(fewest {400 << 20} at pass 2; limit 3)"
    )


def test_a_stall_switches_to_postcopy_where_the_mode_allows_unless_told_to_abort():
    driver, hosts = fresh()
    m = transferring(driver, hosts, AUTO, policy=E.MigrationPolicy(
        stall_passes=1, auto_postcopy_min_passes=100, auto_postcopy_max_passes=100))  # fmt: skip
    pass_(driver, 1, 500 << 20)
    decided = pass_(driver, 2, 600 << 20)
    assert decided[0].type == "PostcopyRequested" and "stalled" in decided[0].payload.reason
    assert m.postcopy_requested
    driver, hosts = fresh()
    transferring(driver, hosts, AUTO, policy=E.MigrationPolicy(
        stall_passes=1, on_stall=E.STALL_ACTION_ABORT, auto_postcopy_min_passes=100,
        auto_postcopy_max_passes=100))  # fmt: skip
    pass_(driver, 1, 500 << 20)
    assert pass_(driver, 2, 600 << 20)[0].type == "RollbackDecided"


def test_the_completion_timeout_scales_with_guest_memory():
    driver, hosts = fresh()  # a 128 MiB guest: counted as one GiB, the least
    transferring(driver, hosts, policy=E.MigrationPolicy(completion_timeout_s_per_gib=30))
    assert pass_(driver, 1, 500 << 20) == []
    driver.now_us += 31_000_000
    decided = pass_(driver, 2, 400 << 20)
    assert decided[0].type == "RollbackDecided"
    assert "completion timeout: pre-copy ran 31 s, over 30 s (30 s per GiB of 128 MiB)" in (
        decided[0].payload.reason
    )


def test_an_operator_changes_the_bandwidth_until_the_switch():
    driver, hosts = fresh()
    m = transferring(driver, hosts)
    decided = driver.request(I.TuneMigration("m-1", 50 << 20, 0, "", driver.now_us, "alice"))
    tuned, command = decided
    assert tuned.payload.by == "operator" and tuned.payload.requested_by == "alice"
    assert command.payload.args.parameters.max_bandwidth == 50 << 20
    assert command.payload.args.parameters.downtime_limit_ms == 300  # the rest stays
    assert driver.request(I.TuneMigration("m-1", 50 << 20, 0, "", driver.now_us)) == []
    with pytest.raises(InvalidRequest, match="nothing to change"):
        driver.request(I.TuneMigration("m-1", 0, 0, "", driver.now_us))
    driver.observe(qmp("host-a", "vm-1", "STOP"), Observation("host-a", E.QmpEventReceived(
        vm="vm-1", event="MIGRATION", data_json='{"status": "pre-switchover"}')))  # fmt: skip
    with pytest.raises(IllegalTransition, match="it is switching over"):
        driver.request(I.TuneMigration("m-1", 1 << 30, 0, "", driver.now_us))
    assert m.parameters.max_bandwidth == 50 << 20


def test_force_complete_raises_the_downtime_in_precopy_and_switches_where_allowed():
    driver, hosts = fresh()
    m = transferring(driver, hosts, policy=E.MigrationPolicy(max_downtime_ms=1500))
    tuned, command = driver.request(I.CompleteMigration("m-1", "window closes", driver.now_us))
    assert tuned.payload.reason == "force-complete: window closes: downtime limit 300 -> 1500 ms"
    assert command.payload.args.parameters.downtime_limit_ms == 1500
    with pytest.raises(IllegalTransition, match="already at its largest downtime limit"):
        driver.request(I.CompleteMigration("m-1", "", driver.now_us))
    driver, hosts = fresh()
    m = transferring(driver, hosts, AUTO)
    (requested,) = driver.request(I.CompleteMigration("m-1", "", driver.now_us))
    assert requested.type == "PostcopyRequested" and requested.payload.by == "operator"
    assert m.postcopy_requested
    assert InvariantChecker().check(driver.log) == []


# --- a stuck stream (progress_timeout_s) ---


def sampled(driver, sent: int, after_s: float) -> list:  # type: ignore[type-arg]
    """`after_s` later, hostd's periodic sample says `sent` bytes went so far; then what the
    coordinator decides."""
    driver.now_us += int(after_s * 1_000_000)
    driver.observe(Observation("host-a", E.MigrationStatsSampled(
        vm="vm-1", status="active", total_bytes=1 << 30, transferred_bytes=sent,
        remaining_bytes=100 << 20,  # (mid-pass: no yardstick of convergence)
    )))  # fmt: skip
    return [e.type for e in driver.advance("m-1")]


def test_a_source_that_sends_nothing_for_the_progress_timeout_rolls_back():
    """A stuck stream (the peer stopped reading) gives QEMU neither progress nor an error:
    the source's own samples, showing no byte sent for the policy's progress timeout, roll
    the migration back; the VM runs on host-a."""
    driver, hosts = fresh()
    m = transferring(driver, hosts, policy=E.MigrationPolicy(progress_timeout_s=10))
    assert "RollbackDecided" not in sampled(driver, 5 << 20, 1)
    assert "RollbackDecided" not in sampled(driver, 5 << 20, 5)
    assert "RollbackDecided" in sampled(driver, 5 << 20, 6)  # 11 s without a byte
    assert "no progress: the source sent nothing for 11 s (limit 10 s" in m.reason
    driver.run("m-1", hosts)
    assert m.phase == Phase.ROLLED_BACK
    assert driver.world.vms["vm-1"].running_hosts() == ["host-a"]
    assert InvariantChecker().check_quiescent(driver.log) == []


def test_slow_progress_and_silence_are_not_a_stuck_stream():
    """Bytes that keep coming, however few, are progress; and no sample at all (a hostd that
    restarted, a host away) is no evidence: neither rolls back. The built-in policy waits
    120 s."""
    driver, hosts = fresh()
    m = transferring(driver, hosts)
    assert m.policy.progress_timeout_s == 120
    for i in range(1, 60):
        assert "RollbackDecided" not in sampled(driver, i * 4096, 5)
    driver.now_us += 3600 * 1_000_000
    assert driver.advance("m-1") == [] and m.phase == Phase.TRANSFERRING


def test_a_post_copy_switch_that_is_never_taken_rolls_back_on_its_own():
    """The switch was sent (mode postcopy's start carries it) and QEMU never took it: the
    source runs on in pre-copy, stuck. Nothing else ends it (the policy's pre-copy judgements
    stop once post-copy is asked for): the progress timeout rolls it back."""
    driver, hosts = fresh()
    m = start(driver, C.MIGRATION_MODE_POSTCOPY, policy=E.MigrationPolicy(progress_timeout_s=30))
    started = None
    for _ in range(3):
        for e in driver.advance("m-1"):
            if e.type != "CommandIssued":
                continue
            if Kind(e.payload.kind) == Kind.START_MIGRATION:
                started = e.payload  # answered by a QEMU whose stream then goes nowhere
                driver.observe(qmp("host-a", "vm-1", "MIGRATION", status="active"))
                driver.observe(Observation("host-a", E.CommandSucceeded(
                    command_id=started.command_id, attempt=started.attempt,
                    kind=started.kind, vm="vm-1")))  # fmt: skip
            else:
                driver.observe(*hosts.answer(e.payload))
    assert started is not None and started.args.start_postcopy and not m.postcopy_started
    assert "RollbackDecided" not in sampled(driver, 1 << 20, 10)
    assert "RollbackDecided" in sampled(driver, 1 << 20, 31)
    driver.run("m-1", hosts)
    assert m.phase == Phase.ROLLED_BACK, m.reason
    assert driver.world.vms["vm-1"].running_hosts() == ["host-a"]


def test_samples_between_passes_are_no_yardstick_of_convergence():
    """hostd's periodic samples (pass 0) come mid-pass, when QEMU has sent most of that pass:
    taken for where the pass ended, they made a well converging guest (1 GiB, 400 MiB,
    150 MiB left at its pass starts) look stuck at pass 3, and mode auto switched to
    post-copy. They count only as bytes sent."""
    mib = 1 << 20
    driver, hosts = fresh()
    m = transferring(driver, hosts, mode=AUTO)
    decided = pass_(driver, 1, 1024 * mib)
    for n, remaining in ((2, 400 * mib), (3, 150 * mib)):
        decided += sampled(driver, n * 700 * mib, 5)  # mid-pass: 100 MiB left, say
        decided += pass_(driver, n, remaining)
    assert [e.type for e in decided if e.type == "PostcopyRequested"] == []
    assert (m.progress.previous_remaining_bytes, m.progress.remaining_bytes) == (
        400 * mib,
        150 * mib,
    )


def test_a_source_stuck_setting_up_or_in_its_switchover_stop_rolls_back():
    """Where no sample comes, the source's status says it: still setting up (a TLS
    handshake with a frozen peer) or stopped for the switchover and never completing (the
    guest paused all along), for the progress timeout by the coordinator's clock. Not while
    its host is away: a status not heard of is no evidence."""
    for status in ("setup", "device"):
        driver, hosts = fresh()
        m = transferring(driver, hosts, policy=E.MigrationPolicy(progress_timeout_s=30))
        if status == "device":
            driver.observe(qmp("host-a", "vm-1", "STOP"))
        driver.observe(qmp("host-a", "vm-1", "MIGRATION", status=status))
        driver.now_us += 20 * 1_000_000
        assert "RollbackDecided" not in [e.type for e in driver.advance("m-1")]
        driver.observe(Observation("host-a", E.HostDisconnected(host_id="host-a", generation=1)))
        driver.now_us += 20 * 1_000_000
        assert "RollbackDecided" not in [e.type for e in driver.advance("m-1")], status
        driver.connect("host-a")
        assert "RollbackDecided" in [e.type for e in driver.advance("m-1")], status
        assert m.reason.startswith("no progress: the source "), m.reason
        driver.run("m-1", hosts)
        assert m.phase == Phase.ROLLED_BACK, (status, m.reason)
        assert driver.world.vms["vm-1"].running_hosts() == ["host-a"]


def test_the_postcopy_bandwidth_can_be_changed_while_post_copy_sends_pages():
    """A post-copy bandwidth set too low leaves the guest crawling on the destination, and a
    post-copy can no longer be aborted: it can be raised while the source still sends (and,
    as any command, is answered before the migration ends)."""
    driver, hosts = fresh()
    policy = E.MigrationPolicy(parameters=E.MigrationParameters(max_postcopy_bandwidth=1000))
    m = start(driver, C.MIGRATION_MODE_POSTCOPY, policy=policy)
    for _ in range(30):
        for e in driver.advance("m-1"):
            if e.type == "CommandIssued":
                driver.observe(*hosts.answer(e.payload))
    assert m.phase == Phase.FINISHING and m.src.status == "postcopy-active"
    with pytest.raises(IllegalTransition, match="in post-copy"):
        driver.request(I.TuneMigration("m-1", 50 << 20, 0, "", driver.now_us))
    _, command = driver.request(I.TuneMigration("m-1", 0, 64 << 20, "typo", driver.now_us))
    assert (
        command.payload.host_id == "host-a"
        and command.payload.kind == Kind.SET_MIGRATION_PARAMETERS
    )
    assert command.payload.args.parameters.max_postcopy_bandwidth == 64 << 20
    driver.observe(
        migration("host-a", "vm-1", "completed"), migration("host-b", "vm-1", "completed")
    )
    for e in driver.advance("m-1"):
        if e.type == "CommandIssued" and e.payload.kind != Kind.SET_MIGRATION_PARAMETERS:
            driver.observe(*hosts.answer(e.payload))
    driver.advance("m-1")
    assert m.phase == Phase.FINISHING  # the change is not answered yet
    driver.observe(*hosts.answer(command.payload))
    driver.advance("m-1")
    assert m.phase == Phase.COMPLETED
    with pytest.raises(IllegalTransition):
        driver.request(I.TuneMigration("m-1", 0, 1 << 30, "", driver.now_us))
    assert InvariantChecker().check_quiescent(driver.log) == []


def test_no_policy_may_be_named_as_whimbrelctl_names_no_default():
    """`policy default none` clears the default, so a policy named "none" could never be made
    the default: the name is refused."""
    driver, _ = fresh()
    with pytest.raises(InvalidRequest, match="'none' is reserved"):
        define(driver, "none", max_downtime_ms=1500)
    assert "none" not in driver.world.policies


def test_a_policy_whose_own_name_field_differs_is_refused():
    """The name is the request's; one in the policy that differs was dropped without a word."""
    driver, _ = fresh()
    with pytest.raises(InvalidRequest, match="is not the name defined"):
        driver.request(I.DefinePolicy("fast", E.MigrationPolicy(name="BAD/.."), "", driver.now_us))
    (defined,) = driver.request(I.DefinePolicy("fast", E.MigrationPolicy(name="fast"), "", 1))
    assert defined.payload.name == "fast"
