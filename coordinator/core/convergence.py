"""A pre-copy's convergence, by its policy and by its operator.

While the source sends memory with the guest running, each decision may, by the policy:
- raise the downtime limit to the step of the current pass (downtime_steps_ms; only upwards,
  so a force-complete is never undone);
- find the migration stalled (no new minimum of the remaining bytes for stall_passes passes)
  or over its completion timeout (seconds per GiB of guest RAM). Either switches to post-copy
  where the mode allows it and on_stall does not say abort, else rolls back; the reason says
  which rule, with its numbers. Progress is judged on remaining bytes, never on wall-clock
  progress alone (Nova and oVirt dropped their progress timeouts after false failures).

An operator may change a migration's bandwidth until it switches over, or force it to
complete: post-copy where allowed, else the policy's largest downtime limit.

A stream that moves nothing gives QEMU no error: before post-copy the migration rolls back
(`stuck_reason`), during it both ends are paused for the post-copy recovery
(`postcopy_stall_reason`).

Every change of QEMU's parameters is a MigrationTuned event (who, why, the new parameters),
followed by the SET_MIGRATION_PARAMETERS command that applies it to the source.
"""

from __future__ import annotations

from google.protobuf.message import Message

from coordinator.core import inputs as I
from coordinator.core.errors import IllegalTransition, InvalidRequest
from coordinator.core.events import NewEvent
from coordinator.core.evolve import PRECOPY_SWITCH_STATUSES
from coordinator.core.lookup import find_migration, is_connected
from coordinator.core.migration_commands import Issuer
from coordinator.core.state import CommandState, Kind, MigrationState, Phase, World
from coordinator.core.validate import check_reason, largest_downtime_ms
from whimbrel.protocol import migration_stream
from whimbrel.v1 import common_pb2, events_pb2

GIB = 1 << 30


def policy_step(world: World, m: MigrationState, issue: Issuer, now_us: int) -> list[Message]:
    """What the policy decides now for a migration in pre-copy (empty: nothing)."""
    start = m.cmd(Kind.START_MIGRATION, m.source)
    if start is None or start.state != CommandState.SUCCEEDED or m.src.status != "active":
        return []
    given_up = given_up_reason(m, world.vms[m.vm].spec.memory_mib, start.issued_at_us, now_us)
    if given_up:
        if m.postcopy_allowed and m.policy.on_stall != events_pb2.STALL_ACTION_ABORT:
            return [
                events_pb2.PostcopyRequested(
                    migration_id=m.migration_id, by="policy", reason=given_up
                )
            ]
        return [
            events_pb2.RollbackDecided(migration_id=m.migration_id, reason=f"policy: {given_up}")
        ]
    step = downtime_step(m)
    if step and m.mode != common_pb2.MIGRATION_MODE_POSTCOPY and not _tuning_in_flight(m):
        parameters = events_pb2.MigrationParameters()
        parameters.CopyFrom(m.parameters)
        was = parameters.downtime_limit_ms
        parameters.downtime_limit_ms = step
        why = f"pass {m.progress.pass_}: downtime limit {was} -> {step} ms"
        return _tuned(m, issue, parameters, "policy", why)
    return []


# The judgements below read only the migration's policy, progress and parameters (and the
# guest's size and the clock), so `whimbrel-audit whatif` replays recorded passes through them.


def auto_postcopy_reason(m: MigrationState) -> str:
    """Why mode AUTO should switch to post-copy now, or "" (judged on passes and bytes)."""
    p, progress = m.policy, m.progress
    if p.auto_postcopy_max_passes and progress.pass_ >= p.auto_postcopy_max_passes:
        return f"pass {progress.pass_} reached the limit of {p.auto_postcopy_max_passes}"
    if progress.sampled_pass < max(p.auto_postcopy_min_passes, 2):
        return ""
    before, now = progress.previous_remaining_bytes, progress.remaining_bytes
    if before and now * 100 > before * (100 - p.min_shrink_percent):
        return (
            f"pass {progress.sampled_pass}: {now} bytes remain against {before} a pass "
            f"before (shrunk by less than {p.min_shrink_percent}%)"
        )
    return ""


def given_up_reason(m: MigrationState, memory_mib: int, started_us: int, now_us: int) -> str:
    """Why the policy gives up on pre-copy now (a stall, the completion timeout), or ""."""
    return _stalled(m) or _timed_out(m, memory_mib, started_us, now_us)


def _stalled(m: MigrationState) -> str:
    passes, progress = m.policy.stall_passes, m.progress
    if not passes or not progress.min_at_pass:
        return ""
    since = progress.sampled_pass - progress.min_at_pass
    if since < passes:
        return ""
    return (
        f"stalled: no new minimum of remaining bytes for {since} passes (fewest "
        f"{progress.min_remaining_bytes} at pass {progress.min_at_pass}; limit {passes})"
    )


def completion_deadline_s(policy: events_pb2.MigrationPolicy, memory_mib: int) -> float:
    """How long pre-copy may run by the policy: seconds per GiB of guest RAM, a GiB at least
    (infinite without a completion timeout)."""
    per_gib = policy.completion_timeout_s_per_gib
    if not per_gib:
        return float("inf")
    return per_gib * max(memory_mib << 20, GIB) / GIB


def _timed_out(m: MigrationState, memory_mib: int, started_us: int, now_us: int) -> str:
    allowed_s = completion_deadline_s(m.policy, memory_mib)
    ran_s = (now_us - started_us) / 1e6
    if ran_s <= allowed_s:
        return ""
    per_gib = m.policy.completion_timeout_s_per_gib
    return (
        f"completion timeout: pre-copy ran {ran_s:.0f} s, over {allowed_s:.0f} s "
        f"({per_gib} s per GiB of {memory_mib} MiB)"
    )


def stuck_reason(world: World, m: MigrationState, now_us: int) -> str:
    """Why the source counts as stuck, before post-copy begins, or "". A stream whose peer
    stopped reading gives QEMU neither progress nor an error, wherever it stops: transferring
    (its own samples show no byte sent for the policy's progress_timeout_s), still setting up
    (a TLS handshake with a frozen peer), or stopped for the switchover and never completing
    (the guest paused all along). Judged only while the source's host is connected: a
    status not heard of is no evidence (the recovery table covers an absent host)."""
    limit_s = m.policy.progress_timeout_s
    start = m.cmd(Kind.START_MIGRATION, m.source)
    host = world.hosts.get(m.source)
    if (
        not limit_s
        or start is None
        or start.state != CommandState.SUCCEEDED
        or m.postcopy_started
        or m.point_of_no_return_passed
        or host is None
        or not host.connected
    ):
        return ""
    src, progress = m.src, m.progress
    if src.status == "active":
        since_us = max(progress.moved_at_us, progress.watched_since_us)
        idle_s = (progress.sampled_at_us - since_us) / 1e6
        what = f"the source sent nothing for {idle_s:.0f} s"
    elif src.status in ("", "setup"):
        idle_s = (now_us - start.issued_at_us) / 1e6
        what = f"the source is still setting up {idle_s:.0f} s after its start"
    elif src.status in ("pre-switchover", "device") and src.stopped_at_us:
        idle_s = (now_us - src.stopped_at_us) / 1e6
        what = f"the source stopped for the switchover {idle_s:.0f} s ago and has not completed"
    else:
        return ""
    if idle_s <= limit_s:
        return ""
    return (
        f"no progress: {what} (limit {limit_s} s, {progress.transferred_bytes} bytes sent): "
        "its migration stream is stuck"
    )


def postcopy_stall_reason(world: World, m: MigrationState, now_us: int) -> str:
    """Why a post-copy counts as wedged, or "". A link that stops carrying bytes without
    breaking (a peer or a middlebox that stopped forwarding) gives QEMU no error on either end,
    and the destination's guest waits for its missing pages for good. Two shapes, each held
    for the policy's progress_timeout_s:
    - the source is postcopy-active and its samples show no byte sent since it entered that
      status or since the last sample that showed bytes move (samples need its host
      connected; none tell nothing);
    - one end reports postcopy-paused (it saw the link break) and the other is still
      postcopy-active: the time since the later of their two reports, by the hosts' clocks
      against the decision's (they agree far closer than the limit's seconds). The later one:
      after a recovery, the source's postcopy-active can be folded before the destination's
      (their streams are apart), and the destination's pause from before the recovery must
      not make a fresh link look wedged."""
    limit_s = m.policy.progress_timeout_s
    if not limit_s or not m.postcopy_started:
        return ""
    src, dst, progress = m.src, m.dst, m.progress
    if src.status == "postcopy-active" and is_connected(world, src.host):
        since_us = max(progress.moved_at_us, src.status_at_us)
        idle_s = (progress.sampled_at_us - since_us) / 1e6
        if idle_s > limit_s:
            return (
                f"post-copy wedged: the source sent nothing for {idle_s:.0f} s "
                f"(limit {limit_s} s, {progress.transferred_bytes} bytes sent)"
            )
    for paused, waiting, name in ((src, dst, "source"), (dst, src, "destination")):
        if paused.status == "postcopy-paused" and waiting.status == "postcopy-active":
            idle_s = (now_us - max(paused.status_at_us, waiting.status_at_us)) / 1e6
            if idle_s > limit_s:
                return (
                    f"post-copy wedged: the {name} paused {idle_s:.0f} s ago and the other "
                    f"end still waits in postcopy-active (limit {limit_s} s)"
                )
    return ""


def downtime_step(m: MigrationState) -> int:
    """The raised downtime limit the current pass calls for, or 0."""
    steps, n = m.policy.downtime_steps_ms, m.progress.pass_
    if not steps or n < 2:
        return 0
    step = steps[min(n - 2, len(steps) - 1)]
    return step if step > m.parameters.downtime_limit_ms else 0


def _tuning_in_flight(m: MigrationState) -> bool:
    command = m.cmd(Kind.SET_MIGRATION_PARAMETERS, m.source)
    return command is not None and command.state == CommandState.ISSUED


def _tuned(
    m: MigrationState,
    issue: Issuer,
    parameters: events_pb2.MigrationParameters,
    by: str,
    reason: str,
    principal: str = "",
) -> list[Message]:
    """The change recorded, and applied to the source once it is sending (before that,
    START_MIGRATION carries the parameters in force)."""
    tuned = events_pb2.MigrationTuned(
        migration_id=m.migration_id, parameters=parameters, by=by, reason=reason,
        requested_by=principal,
    )  # fmt: skip
    out: list[Message] = [tuned]
    if m.cmd(Kind.START_MIGRATION, m.source) is not None:
        out.append(
            issue(Kind.SET_MIGRATION_PARAMETERS, m.source, parameters=parameters, reason=reason)
        )
    return out


# --- the operator's requests ------------------------------------------------------------------

_TUNABLE = ("queued", "preparing", "transferring (before the switch)")


def _before_the_switch(m: MigrationState, action: str) -> None:
    switching = m.postcopy_started or m.src.status in PRECOPY_SWITCH_STATUSES
    if m.phase not in (Phase.QUEUED, Phase.PREPARING, Phase.TRANSFERRING) or switching:
        found = "switching over" if switching else m.phase.label
        raise IllegalTransition(f"migration {m.migration_id}", action, found, _TUNABLE)


_POSTCOPY_PHASES = (Phase.SWITCHOVER, Phase.HANDOFF, Phase.FINISHING, Phase.POSTCOPY_PAUSED)


def _sending_postcopy(m: MigrationState) -> bool:
    """Post-copy begun and its source still there to send pages: QEMU applies a new post-copy
    bandwidth at once, so a limit set too low is never a guest crawling with no way out."""
    return (
        m.postcopy_started
        and m.phase in _POSTCOPY_PHASES
        and m.src.alive
        and m.src.status != "completed"
    )


def tune(world: World, req: I.TuneMigration) -> list[NewEvent]:
    check_reason(req.reason)
    m = find_migration(world, req.migration_id)
    if not req.max_bandwidth and not req.max_postcopy_bandwidth:
        raise InvalidRequest("nothing to change: give a bandwidth or a post-copy bandwidth")
    if not _sending_postcopy(m):
        _before_the_switch(m, "change the bandwidth of")
    elif req.max_bandwidth:
        raise IllegalTransition(
            f"migration {m.migration_id}", "change the pre-copy bandwidth of", "in post-copy",
            [*_TUNABLE, "in post-copy: its post-copy bandwidth only"],
        )  # fmt: skip
    parameters = events_pb2.MigrationParameters()
    parameters.CopyFrom(m.parameters)
    if req.max_bandwidth:
        parameters.max_bandwidth = req.max_bandwidth
    if req.max_postcopy_bandwidth:
        parameters.max_postcopy_bandwidth = req.max_postcopy_bandwidth
    if parameters == m.parameters:
        return []
    reason = req.reason or "bandwidth changed by operator"
    decided = _tuned(m, Issuer(m), parameters, "operator", reason, req.principal)
    return _emit(m, req.now_us, decided)


def complete(world: World, req: I.CompleteMigration) -> list[NewEvent]:
    check_reason(req.reason)
    m = find_migration(world, req.migration_id)
    action = "force-complete"
    if m.phase == Phase.QUEUED:
        raise IllegalTransition(
            f"migration {m.migration_id}", action, "queued (it has not started)", _TUNABLE[1:]
        )
    _before_the_switch(m, action)
    why = f"force-complete: {req.reason}" if req.reason else "force-complete"
    if m.postcopy_allowed:
        if m.postcopy_requested:
            raise IllegalTransition(
                f"migration {m.migration_id}", action, "already switching to post-copy",
                _TUNABLE[1:],
            )  # fmt: skip
        requested = events_pb2.PostcopyRequested(
            migration_id=m.migration_id, by="operator", reason=why, requested_by=req.principal
        )
        return _emit(m, req.now_us, [requested])
    largest = largest_downtime_ms(m.policy)
    if m.parameters.downtime_limit_ms >= largest:
        raise IllegalTransition(
            f"migration {m.migration_id}", action,
            f"already at its largest downtime limit ({largest} ms)", ["below it"],
        )  # fmt: skip
    parameters = events_pb2.MigrationParameters()
    parameters.CopyFrom(m.parameters)
    parameters.downtime_limit_ms = largest
    reason = f"{why}: downtime limit {m.parameters.downtime_limit_ms} -> {largest} ms"
    decided = _tuned(m, Issuer(m), parameters, "operator", reason, req.principal)
    return _emit(m, req.now_us, decided)


def _emit(m: MigrationState, now_us: int, payloads: list[Message]) -> list[NewEvent]:
    stream = migration_stream(m.migration_id)
    return [NewEvent(stream, p, now_us) for p in payloads]
