"""A migration's whole life, top to bottom: the operator's requests, then each step as it
advances (the forward path, one stage per phase), the changes of course forced by what the hosts
report, and the detours (rolling back, post-copy recovery, fencing).

Operator requests are validated and either raise a `CoreError` (and decide nothing) or return the
events that record the decision. `advance` looks at one open migration and returns its next step:
commands to issue (as `CommandIssued` intents, sent only once durable), or a change of course,
or its end. The shell appends what is returned, folds it, and asks again until nothing more is
decided.

The safety rules live here and nowhere else:
- the destination's `cont` is issued only after the source stopped, the source lease was released,
  the destination lease was acquired with a higher generation and destination networking is on;
- once that `cont` is issued (the point of no return) the source is never resumed and
  `migrate_cancel` is never sent: failures after it drive forward or fence;
- before it, every failure falls back to the source.
"""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf.message import Message

from coordinator.core import convergence, policies, recovery, scheduling
from coordinator.core import inputs as I
from coordinator.core.errors import AlreadyExists, IllegalTransition, InvalidRequest, NotFound
from coordinator.core.events import NewEvent
from coordinator.core.evolve import PRECOPY_SWITCH_STATUSES
from coordinator.core.lookup import (
    find_migration,
    find_vm,
    is_connected,
    refuse_cordoned,
    require_connected,
)
from coordinator.core.migration_commands import (
    Issuer,
    continues_at_pre_switchover,
    releases_at_switchover,
    retries,
    to_issue,
)
from coordinator.core.state import (
    Command,
    CommandState,
    Kind,
    MigrationState,
    Phase,
    VmStatus,
    World,
)
from coordinator.core.validate import check_migration_id, check_name, check_reason
from whimbrel.protocol import migration_stream
from whimbrel.v1 import common_pb2, events_pb2

ISSUED, SUCCEEDED, FAILED = CommandState.ISSUED, CommandState.SUCCEEDED, CommandState.FAILED

# Source statuses in which migrate_cancel is meaningful (and safe, before the point of no return).
CANCELLABLE_STATUSES = frozenset({"setup", "active", "pre-switchover", "device", "postcopy-active"})
# How often a command that must eventually succeed is retried before giving up on it.
MAX_COMMAND_RETRIES = 3
# hostd releases a source's lease at its switchover stop by itself (START_MIGRATION asked it
# to) and reports it within milliseconds. The coordinator's own release command follows only
# when no report came this long after the source's STOP (by QEMU's clock): a hostd that
# restarted, or failed to. Sent at once, it only crowded the guest's pause.
HOSTD_SWITCH_GRACE_US = 1_000_000
# Mode postcopy's pre-copy phase may end only by the switch to post-copy: a guest that
# converges meanwhile would otherwise finish as a stop-and-copy, its pause bounded only by the
# downtime limit (QEMU completes once what remains fits it, before a requested switch).
POSTCOPY_MODE_DOWNTIME_LIMIT_MS = 1
# A start that carries the switch to post-copy throttles pre-copy to this many bytes/s. QEMU 7.2
# measures no bandwidth in a migration's first 100 ms and meanwhile completes as soon as
# nothing is pending, so unthrottled a mostly-zero guest, its first pass done in milliseconds,
# completed as pre-copy whenever migrate-start-postcopy reached QEMU after the migration
# thread's first look. Throttled, the first pass sends a tenth of this per 100 ms window (a
# few MiB of zero pages), and the switch comes by the next window at the latest; post-copy
# itself runs at max-postcopy-bandwidth.
POSTCOPY_SWITCH_PRECOPY_BANDWIDTH = 100_000


# --- the operator's requests ------------------------------------------------------------------


def start_migration(world: World, req: I.StartMigration) -> list[NewEvent]:
    check_migration_id(req.migration_id)
    check_name("host", req.destination)
    vm = find_vm(world, req.vm)
    if req.migration_id in world.migrations:
        raise AlreadyExists("migration", req.migration_id)
    if req.mode not in common_pb2.MigrationMode.values():
        raise InvalidRequest(f"unknown migration mode {req.mode}")
    mode = req.mode or common_pb2.MIGRATION_MODE_PRECOPY
    policy = policies.resolve(world, req.policy_name, req.policy)
    if req.destination not in world.hosts:
        raise NotFound("host", req.destination)
    if vm.migration_id:
        raise IllegalTransition(
            f"VM {vm.name}", "migrate", f"migrating ({vm.migration_id})", ["running", "paused"]
        )
    if vm.status not in (VmStatus.RUNNING, VmStatus.PAUSED):
        raise IllegalTransition(
            f"VM {vm.name}", "migrate", vm.status.name.lower(), ["running", "paused"]
        )
    pending = sorted(
        f"{c.kind_name} on {c.host}"
        for c in vm.commands.values()
        if c.host in (vm.host, req.destination)
    )
    if pending:
        # Their answers change what the migration starts from (a resume in flight makes a
        # "paused" source one that runs, so a rollback would leave it paused for good) or
        # where it goes. A stray's destroy on a third host changes neither.
        raise IllegalTransition(
            f"VM {vm.name}", "migrate", f"{', '.join(pending)} in flight",
            [f"no VM command in flight on {vm.host} or {req.destination}"],
        )  # fmt: skip
    if req.destination == vm.host:
        raise InvalidRequest(
            f"VM {vm.name} already runs on {vm.host}: source and destination are the same"
        )
    if vm.lease_holder != vm.host:
        # The migration hands over the lease its source holds (invariant 4): a VM paused at
        # home without it (a rollback that could not take it back) moves once it is back.
        held = f"held by {vm.lease_holder}" if vm.lease_holder else "held by no host"
        raise IllegalTransition(
            f"VM {vm.name}", "migrate", f"its lease {held}", [f"its lease held by {vm.host}"]
        )
    require_connected(world, vm.host)
    require_connected(world, req.destination)
    refuse_cordoned(world, req.destination, f"migrate VM {vm.name} to")
    requested = events_pb2.MigrationRequested(
        migration_id=req.migration_id,
        vm=vm.name,
        source=vm.host,
        destination=req.destination,
        mode=common_pb2.MigrationMode.ValueType(mode),
        policy=policy,
        # A VM a rollback left paused only for want of its lease is owed a run (vm_decisions).
        source_was_running=vm.status == VmStatus.RUNNING or vm.resume_owed,
        source_lease_generation=vm.lease_generation,
        requested_by=req.principal,
    )
    return [NewEvent(migration_stream(req.migration_id), requested, req.now_us)]


def abort(world: World, req: I.AbortMigration) -> list[NewEvent]:
    check_reason(req.reason)
    m = find_migration(world, req.migration_id)
    subject = f"migration {m.migration_id}"
    if m.phase.terminal or m.phase in (Phase.ROLLING_BACK, Phase.FENCING):
        raise IllegalTransition(subject, "abort", m.phase.label, _ABORTABLE)
    if m.point_of_no_return_passed:
        raise IllegalTransition(
            subject, "abort", f"{m.phase.label}, past the point of no return", _ABORTABLE
        )
    if m.phase == Phase.POSTCOPY_PAUSED or "postcopy-paused" in (m.src.status, m.dst.status):
        # QEMU 7.2: migrate_cancel on a paused post-copy source leaves it stuck in "cancelling".
        raise IllegalTransition(subject, "abort", "post-copy paused (recovering)", _ABORTABLE)
    if m.postcopy_started:
        # As libvirt refuses it: the only way back is migrate_cancel, and a link that breaks
        # as it is sent pauses the post-copy first; QEMU (7.2) then leaves the source
        # `cancelling` for good, a healthy VM lost. Forward, a broken link is recovered.
        # A switch sent but not (yet) taken may still be aborted: a start still unanswered
        # is waited for by the rollback, and a switch that never comes (a wedged stream)
        # would otherwise hold the migration for good.
        raise IllegalTransition(subject, "abort", "in post-copy", _ABORTABLE)
    reason = f"aborted by operator: {req.reason}" if req.reason else "aborted by operator"
    decided = events_pb2.RollbackDecided(
        migration_id=m.migration_id, reason=reason, requested_by=req.principal
    )
    return _emit(m, req.now_us, decided)


_ABORTABLE = (
    "queued",
    "preparing",
    "transferring (until post-copy begins)",
    "pre-copy switchover",
    "pre-copy handoff (before the destination runs)",
)


def switch_to_postcopy(world: World, req: I.SwitchToPostcopy) -> list[NewEvent]:
    m = find_migration(world, req.migration_id)
    subject = f"migration {m.migration_id}"
    allowed = ("queued", "preparing", "transferring")
    if not m.postcopy_allowed:
        raise IllegalTransition(
            subject, "switch to post-copy", "in mode precopy", ["mode auto", "mode postcopy"]
        )
    if m.postcopy_requested:
        raise IllegalTransition(
            subject, "switch to post-copy", "already switching to post-copy", allowed
        )
    if (
        m.phase not in (Phase.QUEUED, Phase.PREPARING, Phase.TRANSFERRING)
        or m.src.status in PRECOPY_SWITCH_STATUSES
    ):
        raise IllegalTransition(subject, "switch to post-copy", m.phase.label, allowed)
    requested = events_pb2.PostcopyRequested(
        migration_id=m.migration_id, by="operator", reason="requested by operator",
        requested_by=req.principal,
    )  # fmt: skip
    return _emit(m, req.now_us, requested)


# --- advancing -------------------------------------------------------------------------------


def advance(world: World, req: I.Advance) -> list[NewEvent]:
    """The next step of one open migration: the forward path, or the detour its phase is on."""
    m = world.migrations.get(req.migration_id)
    if m is None or m.phase.terminal:
        return []
    if recovery.awaiting_hello(world, m):
        return []  # recovery: a host of this migration has not said hello yet
    step = _DETOURS.get(m.phase, _forward)
    if step is _forward:
        rule = recovery.rule_for(world, m)
        if rule is not None and rule.action == recovery.Action.WAIT:
            return []
        if rule is not None and rule.action == recovery.Action.ROLLBACK:
            reason = f"{recovery.describe_missing(world, m)} after a restart ({rule.why})"
            return _emit(m, req.now_us, *_rollback(m, reason))
    decided = step(world, m, Issuer(m), req.now_us)
    if any(isinstance(d, events_pb2.MigrationFinished) for d in decided) and _owed_answers(
        world, m
    ):
        return []  # invariant 6: finish only once every reachable host has answered
    return _emit(m, req.now_us, *decided)


def _owed_answers(world: World, m: MigrationState) -> bool:
    """Commands of `m` still unanswered by a host whose stream is open. A host that is gone
    cannot answer, and the terminal decision supersedes its commands; a connected one will
    (hostd answers every command id, a repeat with the stored result)."""
    hosts = world.hosts
    return any(
        c.state == ISSUED and c.host in hosts and hosts[c.host].connected
        for c in m.commands.values()
    )


Step = Callable[[World, MigrationState, Issuer], list[Message]]


# --- the forward path, one stage per phase -----------------------------------------------------

# A stage returns what it decides (possibly nothing: it waits), or None when its phase's work is
# done and the next stage may act in the same decision: a batch of host events can carry a
# migration through several phases at once. Stages read the facts, not the recorded phase;
# `evolve` enters each phase from the same facts, so the two agree.
Stage = Callable[[World, MigrationState, Issuer, int], "list[Message] | None"]


def _forward(world: World, m: MigrationState, issue: Issuer, now_us: int) -> list[Message]:
    problem = _problem(world, m, issue, now_us)
    if problem is not None:
        return problem
    stuck = convergence.stuck_reason(world, m, now_us)
    if stuck:
        return _rollback(m, stuck)
    paused = _pause_wedged_postcopy(world, m, issue, now_us)
    if paused is not None:
        return paused
    for stage in (_queued, _preparing, _transferring, _switchover, _handoff):
        decided = stage(world, m, issue, now_us)
        if decided is not None:
            return decided
    return _finishing(world, m, issue)


def _pause_wedged_postcopy(
    world: World, m: MigrationState, issue: Issuer, now_us: int
) -> list[Message] | None:
    """A post-copy that moves nothing (`convergence.postcopy_stall_reason`): each end still
    postcopy-active on a connected host is paused (migrate-pause), so that both report
    postcopy-paused and the post-copy recovery reconnects them (`_problem`). A pause is sent
    again once the limit has passed once more, at most MAX_COMMAND_RETRIES times per attempt
    (each recovery is a new one); an end that still has not paused then is fenced with the
    other, as an exhausted recovery is: the guest's memory is split between them."""
    why = convergence.postcopy_stall_reason(world, m, now_us)
    if not why:
        return None
    limit_us = m.policy.progress_timeout_s * 1_000_000
    out: list[Message] = []
    for end in (m.src, m.dst):
        if end.status != "postcopy-active" or not is_connected(world, end.host):
            continue
        last = m.cmd(Kind.PAUSE_MIGRATION, end.host)
        if last is not None and last.attempt == m.attempt:
            if last.state == ISSUED or now_us - last.issued_at_us <= limit_us:
                continue
            sent = sum(
                1
                for c in m.commands.values()
                if c.kind == Kind.PAUSE_MIGRATION and c.host == end.host and c.attempt == m.attempt
            )
            if sent >= MAX_COMMAND_RETRIES:
                return _fence(
                    m,
                    [m.source, m.destination],
                    f"{why}; {end.host} was paused {sent} times and is still postcopy-active",
                )
        out.append(issue(Kind.PAUSE_MIGRATION, end.host, reason=why))
    return out or None


def _queued(world: World, m: MigrationState, issue: Issuer, now_us: int) -> list[Message] | None:
    """QUEUED: waits for room under the migration limits, in a fair queue (`scheduling`)."""
    if m.phase != Phase.QUEUED:
        return None
    admitted = scheduling.admission(world, m)
    return [admitted] if admitted is not None else []


def _preparing(world: World, m: MigrationState, issue: Issuer, now_us: int) -> list[Message] | None:
    """PREPARING: the destination QEMU listens, paused (-S); then the source starts sending."""
    src, dst = m.src, m.dst
    prepare = m.cmd(Kind.PREPARE_INCOMING, dst.host)
    if prepare is None:
        return [
            issue(
                Kind.PREPARE_INCOMING,
                dst.host,
                spec=world.vms[m.vm].spec,
                postcopy=m.postcopy_allowed,
                # The hook then runs while the lease moves, not after it, in the guest's pause.
                enable_network_at_postcopy=m.postcopy_allowed,
                peer_host=src.host,  # the only host whose migration stream it may accept
            )
        ]
    if prepare.state != SUCCEEDED:
        return []
    if m.cmd(Kind.START_MIGRATION, src.host) is None:
        if m.mode == common_pb2.MIGRATION_MODE_POSTCOPY and not m.postcopy_requested:
            why = "mode postcopy"
            return [
                events_pb2.PostcopyRequested(migration_id=m.migration_id, by="policy", reason=why)
            ]
        return [
            issue(
                Kind.START_MIGRATION,
                src.host,
                uri=m.incoming_uri,
                postcopy=m.postcopy_allowed,
                parameters=_transfer_parameters(m),
                # Mode postcopy always switches while the destination is paused (-S), so the
                # source lease can move at postcopy-active; the pre-switchover stop would only
                # add a round trip to the guest's pause.
                pause_before_switchover=m.mode != common_pb2.MIGRATION_MODE_POSTCOPY,
                # ...and its hostd continues it at once: the stop in pre-switchover only tells a
                # switchover's STOP from any other, for the destination's networking.
                continue_at_pre_switchover=m.mode != common_pb2.MIGRATION_MODE_POSTCOPY,
                # Post-copy asked for before the start switches with it: hostd writes
                # migrate-start-postcopy together with migrate, before any pass can converge.
                start_postcopy=m.postcopy_requested,
                release_lease_at_switchover=True,
                peer_host=dst.host,  # the only host it may send the guest to
            )
        ]
    return None


def _transferring(
    world: World, m: MigrationState, issue: Issuer, now_us: int
) -> list[Message] | None:
    """TRANSFERRING: memory passes while the source runs; the policy may ask for post-copy.
    Over once the source has stopped to switch over."""
    src = m.src
    switching = m.postcopy_started or src.status in PRECOPY_SWITCH_STATUSES
    if not switching and not m.postcopy_requested:
        why = ""
        if m.mode == common_pb2.MIGRATION_MODE_POSTCOPY:
            why = "mode postcopy"
        elif m.mode == common_pb2.MIGRATION_MODE_AUTO and src.status == "active":
            why = convergence.auto_postcopy_reason(m)
        if why:
            return [
                events_pb2.PostcopyRequested(migration_id=m.migration_id, by="policy", reason=why)
            ]
        decided = convergence.policy_step(world, m, issue, now_us)
        if decided:
            return decided
    if not switching:
        start = m.cmd(Kind.START_MIGRATION, src.host)
        if (
            m.postcopy_requested
            and start is not None
            and start.state == SUCCEEDED
            # QEMU accepts migrate-start-postcopy once migrate returned; waiting for the
            # "active" event would let a small guest finish pre-copy first.
            and src.status in ("", "setup", "active")
            and not m.postcopy_switch_sent
        ):
            return [issue(Kind.START_POSTCOPY, src.host)]
        return []
    if src.runstate == "running":
        # Post-copy: QEMU reports postcopy-active just before its STOP. Nothing moves before
        # the stop is in the log (hostd releases the lease at the STOP by itself anyway).
        return []
    return None


def _switchover(
    world: World, m: MigrationState, issue: Issuer, now_us: int
) -> list[Message] | None:
    """SWITCHOVER: the source has stopped. Its lease goes once QEMU can no longer resume it by
    itself: at postcopy-active, or (pre-copy) at completed; QEMU 7.2 resumes a pre-copy source
    whose migration fails even from pre-switchover. hostd releases it then by itself
    (START_MIGRATION asked it to); the command covers a hostd that restarted meanwhile or could
    not. Destination networking is enabled from the stop on: no traffic can reach two copies,
    and the destination stays paused until cont. A post-copy destination's hostd also begins by
    itself at its own postcopy-active (PREPARE_INCOMING asked it to): the hook starts at
    whichever comes first, this command or that status. A pre-copy source's hostd continues
    from pre-switchover by itself too; CONTINUE_SWITCHOVER covers it as RELEASE_LEASE does.
    Over once the destination was asked to take the lease."""
    src, dst = m.src, m.dst
    out: list[Message] = []
    # A source QEMU that died after the destination loaded everything cannot resume either;
    # its hostd never sees completed, so nothing releases the lease but this command.
    died_after_transfer = not src.alive and dst.status == "completed"
    source_let_go = m.postcopy_started or src.status == "completed" or died_after_transfer
    hostd_may_still_report = (
        0 < now_us - src.stopped_at_us < HOSTD_SWITCH_GRACE_US and not died_after_transfer
    )
    # A rollback that took the lease back, then learnt post-copy had begun and recovered it
    # (a paused post-copy source can never run), leaves the source holding a newer one.
    vm = world.vms[m.vm]
    taken_back = m.src_lease_reacquired and vm.lease_holder == src.host
    release = m.cmd(Kind.RELEASE_LEASE, src.host)
    releasing = (
        source_let_go
        and (
            (_send(m, Kind.RELEASE_LEASE, src.host) and not m.src_lease_released)
            or (taken_back and (release is None or release.attempt != m.attempt))
        )
        and not (hostd_may_still_report and releases_at_switchover(m))
    )
    if releasing:
        generation = vm.lease_holder_generation if taken_back else m.source_lease_generation
        out.append(issue(Kind.RELEASE_LEASE, src.host, lease_generation=generation))
    if _send(m, Kind.ENABLE_NETWORK, dst.host) and not m.dst_network_enabled:
        out.append(issue(Kind.ENABLE_NETWORK, dst.host))
    if (
        not m.postcopy_started
        and src.status == "pre-switchover"
        and to_issue(m, Kind.CONTINUE_SWITCHOVER, src.host)
        and not (hostd_may_still_report and continues_at_pre_switchover(m))
    ):
        out.append(issue(Kind.CONTINUE_SWITCHOVER, src.host))
    if not m.src_lease_released or m.src_lease_reacquired:
        return out
    # The destination takes the lease (networking is under way since the stop), again if a
    # rollback took back what it took in an earlier attempt (the post-copy was then recovered).
    acquired = m.cmd(Kind.ACQUIRE_LEASE, dst.host)
    given_back = (
        acquired is not None and acquired.state == SUCCEEDED and acquired.attempt != m.attempt
    )
    if (_send(m, Kind.ACQUIRE_LEASE, dst.host) or given_back) and not m.dst_lease_generation:
        lease_generation = world.vms[m.vm].lease_generation + 1
        out.append(issue(Kind.ACQUIRE_LEASE, dst.host, lease_generation=lease_generation))
    return out or None


def _send(m: MigrationState, kind: int, host: str) -> bool:
    """Whether a handoff command (the source's release, the destination's enable or acquire)
    is to be sent: never sent, or failed and to be tried again (`_handoff_retry_left`)."""
    if to_issue(m, kind, host):
        return True
    command = m.cmd(kind, host)
    return command is not None and command.state == FAILED and _handoff_retry_left(m, command)


def _handoff_retry_left(m: MigrationState, command: Command) -> bool:
    """A handoff command of this attempt that failed after post-copy began, before the
    destination's cont, with retries left. The way out would be a rollback, which must cancel
    a post-copy source, and a source whose link breaks before that cancel stays `cancelling`
    for good (QEMU 7.2): the VM lost. So the command is tried again first."""
    kind, host = command.kind, command.host
    handoff = (kind == Kind.RELEASE_LEASE and host == m.source) or (
        kind in (Kind.ENABLE_NETWORK, Kind.ACQUIRE_LEASE) and host == m.destination
    )
    return (
        handoff
        and command.attempt == m.attempt
        and m.postcopy_started
        and not m.point_of_no_return_passed
        and retries(m, kind, host, this_attempt=True) < MAX_COMMAND_RETRIES
    )


def _handoff(world: World, m: MigrationState, issue: Issuer, now_us: int) -> list[Message] | None:
    """HANDOFF: once the source is stopped without its lease and the destination holds a newer
    one with its networking on, the destination's cont: the point of no return. From the moment
    that intent is durable the source never runs again."""
    src, dst = m.src, m.dst
    ready = (
        m.src_lease_released
        and not m.src_lease_reacquired
        and m.dst_lease_generation > m.source_lease_generation
        and m.dst_network_enabled
        and src.runstate != "running"
        # Pre-copy: the destination's own word that it loaded everything, not the source's
        # that it sent it (return-path makes the source's completed wait for that too).
        and (m.postcopy_started or dst.status == "completed")
    )
    if not ready:
        return []
    cont = m.cmd(Kind.RESUME_VM, dst.host)
    if cont is None or (cont.state == FAILED and not m.dst_resumed):
        if cont is not None and retries(m, Kind.RESUME_VM, dst.host) >= MAX_COMMAND_RETRIES:
            return _fence(
                m,
                [m.source, m.destination],
                f"cont on the destination failed {MAX_COMMAND_RETRIES} times: {cont.error}",
            )
        return [issue(Kind.RESUME_VM, dst.host, reason="handoff complete")]
    if not m.dst_resumed:
        return []
    return None


def _finishing(world: World, m: MigrationState, issue: Issuer) -> list[Message]:
    """FINISHING: the guest runs on the destination. Announce it on the network, destroy the
    source once the transfer completed, and finish."""
    src, dst = m.src, m.dst
    out: list[Message] = []
    if m.cmd(Kind.ANNOUNCE, dst.host) is None:
        out.append(issue(Kind.ANNOUNCE, dst.host))
    completed = "completed" in (src.status, dst.status)
    destroy = m.cmd(Kind.DESTROY_VM, src.host)
    # A source host that missed the recovery bound cannot destroy its QEMU now; it is destroyed
    # as a stray copy when the host returns (recovery table: "complete").
    source_there = src.alive and src.host not in world.missing_hosts
    if completed and source_there and (destroy is None or destroy.state == FAILED):
        if destroy is not None and retries(m, Kind.DESTROY_VM, src.host) >= MAX_COMMAND_RETRIES:
            return _finished(
                m,
                Phase.COMPLETED,
                f"completed, but the source QEMU could not be destroyed: {destroy.error}",
            )
        out.append(issue(Kind.DESTROY_VM, src.host, force=True, reason="migration completed"))
    if out:
        return out
    announce = m.cmd(Kind.ANNOUNCE, dst.host)
    if completed and not source_there and announce is not None and announce.state != ISSUED:
        if src.alive:
            why = "completed; the source host is missing, its QEMU is destroyed when it returns"
            return _finished(m, Phase.COMPLETED, why)
        return _finished(m, Phase.COMPLETED, "completed")
    return []


def _transfer_parameters(m: MigrationState) -> events_pb2.MigrationParameters:
    parameters = events_pb2.MigrationParameters()
    parameters.CopyFrom(m.parameters)  # the policy's, or as tuned before the start
    if m.mode == common_pb2.MIGRATION_MODE_POSTCOPY:
        parameters.downtime_limit_ms = POSTCOPY_MODE_DOWNTIME_LIMIT_MS
    if m.postcopy_requested:
        asked = parameters.max_bandwidth or POSTCOPY_SWITCH_PRECOPY_BANDWIDTH
        parameters.max_bandwidth = min(asked, POSTCOPY_SWITCH_PRECOPY_BANDWIDTH)
    return parameters


# --- changes of course -----------------------------------------------------------------------


def _problem(world: World, m: MigrationState, issue: Issuer, now_us: int) -> list[Message] | None:
    """A change of course forced by what was observed; [] to hold the forward path until more
    is known; None when nothing is wrong."""
    src, dst = m.src, m.dst
    if not src.alive and "completed" not in (src.status, dst.status):
        if m.postcopy_started or m.point_of_no_return_passed:
            return _fence(
                m,
                [m.destination],
                "source QEMU exited during post-copy: "
                "the destination lacks pages only the source had",
            )
        return _fence(m, [m.destination], "source QEMU exited before the migration completed")
    # The destination exists from the moment it answered the prepare command.
    if m.incoming_uri and not dst.alive:
        if m.point_of_no_return_passed and _cont_outcome_pending(world, m):
            return []  # (and nothing moves forward meanwhile: see _forward)
        if m.point_of_no_return_passed:
            how = (
                "after it was resumed"
                if m.dst_resumed
                else "after its cont was sent (whether it ran is unknown)"
            )
            return _fence(
                m, [m.source], f"destination QEMU exited {how}: the source must never run again"
            )
        if m.postcopy_started:
            return _fence(
                m,
                [m.source],
                "destination QEMU exited during post-copy: QEMU cannot resume a source once "
                "post-copy started",
            )
        return _rollback(m, "destination QEMU exited")
    if not m.postcopy_started and not m.point_of_no_return_passed:
        # QEMU ended the source's migration by itself (a destination it cannot reach, a failed
        # load reported on the return path): it resumes the source if it was running.
        for side, end in (("source", src), ("destination", dst)):
            if end.status in ("failed", "cancelled") and (side == "destination" or src.alive):
                said = f": {end.error}" if end.error else ""
                return _rollback(m, f"{side} migration {end.status} in QEMU{said}")
    if m.postcopy_started and src.status == dst.status == "postcopy-paused":
        # Both ends must have noticed the break: migrate-recover is refused by a destination
        # that is still postcopy-active (QEMU 7.2), and each refusal would use up an attempt.
        return _recover_or_fence(m)
    failed = _failed_forward_command(m)
    if failed is None:
        return None
    if m.point_of_no_return_passed:
        return _fence(
            m,
            [m.source, m.destination],
            f"{failed.kind_name} failed after the point of no return: {failed.error}",
        )
    if m.postcopy_started and _the_other_end_may_pause_too(world, m):
        # One end saw the link break, and the other, still in post-copy on a connected host,
        # will notice too: the recovery then decided on both paused issues again what this
        # failure left undone. A paused source can be neither resumed nor cancelled (a cancel
        # leaves it in `cancelling` for good), so neither a fence nor a rollback racing the
        # pause is the answer; nothing moves meanwhile. An end that never notices (a link that
        # carries nothing) is paused by the stall watch once the policy's limit has passed.
        return _pause_wedged_postcopy(world, m, issue, now_us) or []
    if m.postcopy_started and src.status == "postcopy-paused":
        return _fence(
            m,
            [m.source, m.destination],
            f"{failed.kind_name} failed while post-copy was paused: {failed.error}",
        )
    return _rollback(m, f"{failed.kind_name} on {failed.host} failed: {failed.error}")


def _the_other_end_may_pause_too(world: World, m: MigrationState) -> bool:
    """One end reports postcopy-paused, and the other is in post-copy still, on a connected
    host, so it can be expected to report the break as well."""
    for paused, other in ((m.src, m.dst), (m.dst, m.src)):
        if paused.status == "postcopy-paused":
            host = world.hosts.get(other.host)
            following = other.status in ("postcopy-active", "postcopy-recover")
            return following and host is not None and host.connected
    return False


def _failed_forward_command(m: MigrationState) -> Command | None:
    """A failure of the current attempt that still matters: one whose effect the hosts have
    not reported anyway, and that the migration cannot do without. A command reported failed
    because its hostd restarted may have acted before it died; the QEMUs' own reports say
    whether it did. Every failure is looked at: one that does not matter must not hide one
    that does."""
    for command in m.commands.values():
        if (
            command.attempt == m.attempt
            and command.state == FAILED
            and not _took_effect(m, command)
            and not _harmless_failure(m, command)
        ):
            return command
    return None


def _harmless_failure(m: MigrationState, command: Command) -> bool:
    if command.kind in (Kind.ANNOUNCE, Kind.SET_MIGRATION_PARAMETERS):
        return True  # advisory: the migration goes on without them
    if command.kind == Kind.PAUSE_MIGRATION:
        return True  # the stall is judged again, and the pause sent again (bounded)
    if command.kind == Kind.START_POSTCOPY and m.src.status in PRECOPY_SWITCH_STATUSES:
        return True  # pre-copy reached its switchover first; it simply finishes as pre-copy
    if _handoff_retry_left(m, command):
        return True  # sent again by the forward step
    # A cont or destroy after the point of no return is retried by the forward step, never a
    # reason to go back.
    return command.kind in (Kind.RESUME_VM, Kind.DESTROY_VM) and m.point_of_no_return_passed


def _took_effect(m: MigrationState, command: Command) -> bool:
    src, dst = m.src, m.dst
    kind, host = command.kind, command.host
    if kind == Kind.CONTINUE_SWITCHOVER:
        # Past pre-switchover: to "device" in pre-copy, or post-copy begun (mode auto's switch
        # also stops in pre-switchover first).
        return (
            src.status in ("device", "completed") or dst.status == "completed" or m.postcopy_started
        )
    if kind == Kind.START_POSTCOPY:
        return m.postcopy_started
    if kind == Kind.START_MIGRATION:
        # Past the point of no return the destination runs on the state this migrate sent,
        # whatever its answer said. Before it, a start that carried the switch took effect
        # once post-copy began; a plain one is undone by the rollback, which is safe.
        carried_switch = command.issued.args.start_postcopy
        return m.point_of_no_return_passed or (carried_switch and m.postcopy_started)
    if kind == Kind.RELEASE_LEASE and host == src.host:
        return m.src_lease_released
    if kind == Kind.ACQUIRE_LEASE and host == dst.host:
        return m.dst_lease_generation > m.source_lease_generation
    if kind == Kind.ENABLE_NETWORK and host == dst.host:
        return m.dst_network_enabled
    if kind == Kind.RESUME_VM and host == dst.host:
        return m.dst_resumed
    if kind in (Kind.RECOVER_INCOMING, Kind.RESUME_MIGRATION):
        # Issued only while post-copy was paused (or stuck recovering), and judged here
        # only once the forward path took over again: an end running post-copy again, or
        # done, shows the recovery went through.
        return not {src.status, dst.status}.isdisjoint(("postcopy-active", "completed"))
    return False


def _cont_outcome_pending(world: World, m: MigrationState) -> bool:
    """The destination's cont is issued, its answer not in, and the guest not seen running:
    whether the destination ran (and so whether the source may still be the VM) is unknown
    until its connected host answers (hostd answers every command, a refusal marked)."""
    cont = m.cmd(Kind.RESUME_VM, m.dst.host)
    return (
        cont is not None
        and cont.state == ISSUED
        and not m.dst_resumed
        and is_connected(world, m.dst.host)
    )


# --- detours ---------------------------------------------------------------------------------


def _rolling_back(world: World, m: MigrationState, issue: Issuer, now_us: int) -> list[Message]:
    """ROLLING_BACK: before the point of no return, the source becomes the VM again."""
    src, dst = m.src, m.dst
    vm = world.vms[m.vm]
    # 1. The lease goes back to the source first: QEMU resumes a source on its own when its
    # migration is cancelled or fails, and a VM must only run where the lease is.
    if vm.lease_holder == dst.host:
        # Invariant 4: the destination took the lease (its QEMU may be gone, the lease file is
        # not); it must give it up before the source may take it back.
        release = m.cmd(Kind.RELEASE_LEASE, dst.host, this_attempt=True)
        if release is None or (
            release.state == FAILED
            and retries(m, Kind.RELEASE_LEASE, dst.host) < MAX_COMMAND_RETRIES
        ):
            return [
                issue(
                    Kind.RELEASE_LEASE,
                    dst.host,
                    # What it holds: the source's re-acquire may already have raised
                    # lease_generation, and hostd releases only the generation named.
                    lease_generation=vm.lease_holder_generation or vm.lease_generation,
                    reason="rollback",
                )
            ]
        return []  # waiting for the release (a host that never answers is handled by recovery)
    # An acquire sent to the destination before the rollback can still take the lease (a host
    # that was away gets its commands when it returns): its answer comes first, or the source's
    # attempts to take the lease back fail against it and run out.
    in_flight = m.cmd(Kind.ACQUIRE_LEASE, dst.host)
    if in_flight is not None and in_flight.state == ISSUED and dst.host not in world.missing_hosts:
        return []
    # (A dead source needs no lease: the VM is lost once the destination is gone, below.)
    # Released, or perhaps: hostd releases at the switchover stop by itself once asked to by
    # START_MIGRATION, and its report may not be in yet. Taking back a lease the source still
    # holds only raises its generation.
    released = src.alive and (
        m.src_lease_released
        or m.cmd(Kind.RELEASE_LEASE, src.host) is not None
        or releases_at_switchover(m)
    )
    # Without its lease back the source must not run: the rollback then ends with it paused.
    lease_lost = (
        released
        and not m.src_lease_reacquired
        and (retries(m, Kind.ACQUIRE_LEASE, src.host, this_attempt=True) >= MAX_COMMAND_RETRIES)
    )
    if released and not m.src_lease_reacquired and not lease_lost:
        acquire = m.cmd(Kind.ACQUIRE_LEASE, src.host, this_attempt=True)
        # Taken again if a late release (sent before the rollback) gave it up after.
        if acquire is None or acquire.state != ISSUED:
            return [
                issue(
                    Kind.ACQUIRE_LEASE,
                    src.host,
                    lease_generation=vm.lease_generation + 1,
                    reason="rollback",
                )
            ]
        return []
    # 2. Stop the transfer (never after the point of no return; rollback is never decided
    # then) and destroy the destination.
    cancel = m.cmd(Kind.CANCEL_MIGRATION, src.host, this_attempt=True)
    if src.status == "postcopy-paused" and dst.alive and not src.cancel_stuck:
        # Post-copy began after all (the rollback was decided not knowing) and then broke: a
        # paused post-copy source can be neither cancelled nor resumed (QEMU 7.2), so the
        # destination is the VM's only way on. Recover it once both ends noticed the break
        # (and a cancel already sent was answered); destroying it would lose the VM.
        if dst.status != "postcopy-paused" or (cancel is not None and cancel.state == ISSUED):
            return []
        return _recover_or_fence(m)
    out: list[Message] = []
    started = m.cmd(Kind.START_MIGRATION, src.host) is not None
    # A cancel that failed (a hostd restart interrupts it) is sent again while QEMU still
    # migrates: a source left in pre-switchover refuses cont, and would stay paused.
    cancel_again = (
        cancel is not None
        and cancel.state == FAILED
        and retries(m, Kind.CANCEL_MIGRATION, src.host, this_attempt=True) < MAX_COMMAND_RETRIES
    )
    if (
        started
        and src.alive
        and src.status in CANCELLABLE_STATUSES
        and not m.point_of_no_return_passed
        and (cancel is None or cancel_again)
    ):
        out.append(issue(Kind.CANCEL_MIGRATION, src.host, reason="rollback"))
    cancelling = bool(out) or (cancel is not None and cancel.state == ISSUED)
    # A start still unanswered may yet run: with the switch it carries, post-copy begins at
    # once, and against a destination destroyed first it pauses for good (as above).
    start = m.cmd(Kind.START_MIGRATION, src.host)
    if start is not None and start.state == ISSUED and src.alive:
        cancelling = cancelling or start.issued.args.start_postcopy
    prepared = m.cmd(Kind.PREPARE_INCOMING, dst.host) is not None
    destroy = m.cmd(Kind.DESTROY_VM, dst.host, this_attempt=True)
    # A destination that never ran and cannot be destroyed stays paused (-S) and without the
    # lease: the source may run; the copy is destroyed later as a stray (ReconcileVm).
    abandoned = retries(m, Kind.DESTROY_VM, dst.host, this_attempt=True) >= MAX_COMMAND_RETRIES
    # Once post-copy may have begun, the destination goes only after the source's cancel is
    # in: a source whose peer vanishes first pauses its post-copy, and QEMU (7.2) leaves a
    # paused post-copy that is then cancelled in `cancelling` for good: a VM lost.
    wait_for_cancel = cancelling and (m.postcopy_requested or m.postcopy_started)
    if (
        prepared
        and dst.alive
        and not abandoned
        and not wait_for_cancel
        and (destroy is None or destroy.state == FAILED)
    ):
        out.append(issue(Kind.DESTROY_VM, dst.host, force=True, reason="rollback"))
    if out or cancelling:
        return out
    if dst.alive and prepared and dst.host not in world.missing_hosts and not abandoned:
        return []  # (a missing destination never ran and never will; destroyed on its return)
    if not src.alive:
        return [
            events_pb2.VmLost(
                vm=m.vm, reason="source QEMU exited during rollback", migration_id=m.migration_id
            ),
            *_finished(m, Phase.FENCED, "source QEMU exited during rollback"),
        ]
    # 3. The source runs again (QEMU may already have resumed it when the migration stopped).
    if src.status == "postcopy-paused" and not (dst.alive and prepared):
        # QEMU 7.2 can neither cancel nor resume a paused post-copy source whose destination
        # is gone: part of the guest's state went with it.
        return _fence(m, [m.source], "post-copy paused and the destination is gone: the "
                                     "source can neither finish nor be resumed")  # fmt: skip
    if src.status == "cancelling" and src.cancel_stuck:
        return _fence(m, [m.source], "the source's post-copy was paused when its cancel came: "
                                     "QEMU 7.2 leaves it cancelling for good")  # fmt: skip
    if src.status == "cancelling":
        return []  # wait for QEMU to settle the cancel before touching the CPUs
    if lease_lost:
        acquire = m.cmd(Kind.ACQUIRE_LEASE, src.host)
        why = acquire.error if acquire is not None else ""
        why = f"{m.reason}; the source could not take its lease back ({why}) and stays paused"
        return _finished(m, Phase.ROLLED_BACK, why)
    if m.source_was_running and src.runstate != "running":
        resume = m.cmd(Kind.RESUME_VM, src.host, this_attempt=True)
        if (
            resume is not None
            and resume.state == FAILED
            and (retries(m, Kind.RESUME_VM, src.host, this_attempt=True) >= MAX_COMMAND_RETRIES)
        ):
            why = f"{m.reason}; the source could not be resumed ({resume.error}), stays paused"
            return _finished(m, Phase.ROLLED_BACK, why)
        if resume is None or resume.state == FAILED:
            return [issue(Kind.RESUME_VM, src.host, reason="rollback")]
        if resume.state == ISSUED:
            return []
    return _finished(m, Phase.ROLLED_BACK, m.reason)


def _recovering(world: World, m: MigrationState, issue: Issuer, now_us: int) -> list[Message]:
    """POSTCOPY_PAUSED: the link broke after post-copy started. The destination listens again
    (migrate-recover), the source resumes sending to it; attempts are bounded by the policy."""
    if _recovery_attempt_stuck(m, now_us):
        return _recover_or_fence(m)
    src, dst = m.src, m.dst
    if not (src.alive and dst.alive):
        lost = m.source if not src.alive else m.destination
        survivor = m.destination if not src.alive else m.source
        return _fence(m, [survivor], f"{lost} QEMU exited while post-copy was paused")
    hosts = world.hosts
    if not all(h in hosts and hosts[h].connected for h in (src.host, dst.host)):
        return []  # recovery needs both hosts to answer
    if m.recovery_failed:
        return _recover_or_fence(m)  # the source could not reach the destination again
    recover = m.cmd(Kind.RECOVER_INCOMING, dst.host, this_attempt=True)
    if recover is None:
        listening = m.cmd(Kind.RECOVER_INCOMING, dst.host)
        if (
            dst.status == "postcopy-recover"
            and listening is not None
            and listening.state == SUCCEEDED
            and listening.result is not None
        ):
            # The destination is in postcopy-recover from the previous attempt, where QEMU
            # refuses migrate-recover (it runs only when post-copy is paused): only the source
            # tries again.
            recover = listening
        else:
            return [issue(Kind.RECOVER_INCOMING, dst.host)]
    if recover.state == FAILED:
        return _recover_or_fence(m)
    if recover.state != SUCCEEDED or recover.result is None:
        return []
    resume = m.cmd(Kind.RESUME_MIGRATION, src.host, this_attempt=True)
    if resume is None:
        return [issue(Kind.RESUME_MIGRATION, src.host, uri=recover.result.uri, peer_host=dst.host)]
    if resume.state == FAILED and not _resume_may_be_under_way(m):
        return _recover_or_fence(m)
    return []


def _resume_may_be_under_way(m: MigrationState) -> bool:
    """A resume reported failed (its hostd restarted after sending it) while the source went
    into postcopy-recover in this attempt was taken: it is given the attempt's time, as a
    resume that succeeded is, rather than spending an attempt on a recovery that may be
    working. A source still in postcopy-recover from an earlier attempt refuses a resume."""
    return (
        m.src.status == "postcopy-recover"
        and m.src_recover_attempt == m.attempt
        and m.policy.recovery_attempt_timeout_ms > 0
    )


def _recovery_attempt_stuck(m: MigrationState, now_us: int) -> bool:
    """The source took the resume (or may have) and has sat in postcopy-recover longer than
    the policy allows (QEMU 7.2 never leaves that state while the link is down)."""
    resume = m.cmd(Kind.RESUME_MIGRATION, m.source, this_attempt=True)
    timeout_us = m.policy.recovery_attempt_timeout_ms * 1000
    return (
        resume is not None
        and resume.state != ISSUED
        and m.src.status == "postcopy-recover"
        and timeout_us > 0
        and now_us - resume.issued_at_us > timeout_us
    )


def _recover_or_fence(m: MigrationState) -> list[Message]:
    if m.recovery_attempts >= m.policy.max_recovery_attempts:
        return _fence(
            m, [m.source, m.destination], f"post-copy recovery failed {m.recovery_attempts} times"
        )
    return [
        events_pb2.PostcopyRecoveryDecided(
            migration_id=m.migration_id,
            recovery_attempt=m.recovery_attempts + 1,
            attempt=m.attempt + 1,
        )
    ]


def _fencing(world: World, m: MigrationState, issue: Issuer, now_us: int) -> list[Message]:
    """FENCING: no copy can safely run; destroy the named hosts' QEMUs and record the VM lost."""
    out: list[Message] = []
    waiting = False
    survivors: list[str] = []
    for host in m.fencing_hosts:
        side = m.side(host)
        if side is None or not side.alive:
            continue
        destroy = m.cmd(Kind.DESTROY_VM, host, this_attempt=True)
        if retries(m, Kind.DESTROY_VM, host, this_attempt=True) >= MAX_COMMAND_RETRIES:
            # Bounded: the copy is then a stray of a lost VM, which blocks any cold start
            # while it exists and is destroyed when reconciled.
            survivors.append(f"{host} ({destroy.error if destroy is not None else ''})")
            continue
        if destroy is None or destroy.state == FAILED:
            out.append(issue(Kind.DESTROY_VM, host, force=True, reason=f"fence: {m.reason}"))
        waiting = True
    if out or waiting:
        return out
    reason = m.reason
    if survivors:
        reason += f"; QEMU not destroyed on {', '.join(survivors)}"
    return [
        events_pb2.VmLost(vm=m.vm, reason=reason, migration_id=m.migration_id),
        *_finished(m, Phase.FENCED, reason),
    ]


_DETOURS: dict[Phase, Callable[[World, MigrationState, Issuer, int], list[Message]]] = {
    Phase.ROLLING_BACK: _rolling_back,
    Phase.POSTCOPY_PAUSED: _recovering,
    Phase.FENCING: _fencing,
}


# --- what a decision emits --------------------------------------------------------------------


def _emit(m: MigrationState, now_us: int, *payloads: Message) -> list[NewEvent]:
    stream = migration_stream(m.migration_id)
    return [NewEvent(stream, p, now_us) for p in payloads]


def _finished(m: MigrationState, phase: Phase, reason: str) -> list[Message]:
    return [
        events_pb2.MigrationFinished(
            migration_id=m.migration_id,
            phase=common_pb2.MigrationPhase.ValueType(phase),
            reason=reason,
        )
    ]


def _rollback(m: MigrationState, reason: str) -> list[Message]:
    return [events_pb2.RollbackDecided(migration_id=m.migration_id, reason=reason)]


def _fence(m: MigrationState, hosts: list[str], reason: str) -> list[Message]:
    return [
        events_pb2.FencingDecided(migration_id=m.migration_id, vm=m.vm, hosts=hosts, reason=reason)
    ]
