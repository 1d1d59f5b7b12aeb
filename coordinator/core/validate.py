"""Validation of names, VM specs and migration policies (raises InvalidRequest).

Names and specs are checked by `whimbrel.validate`, which hostd applies too; this module turns
its refusals into the coordinator's InvalidRequest.
"""

from __future__ import annotations

from coordinator.core.errors import InvalidRequest
from whimbrel import validate as shared
from whimbrel.v1 import common_pb2, events_pb2

DEFAULT_POLICY = events_pb2.MigrationPolicy(
    parameters=events_pb2.MigrationParameters(downtime_limit_ms=300),
    auto_postcopy_min_passes=3,
    min_shrink_percent=10,
    auto_postcopy_max_passes=10,
    max_recovery_attempts=3,
    recovery_attempt_timeout_ms=30_000,
    progress_timeout_s=120,
)


def check_name(kind: str, name: str) -> None:
    try:
        shared.check_name(kind, name)
    except shared.Invalid as err:
        raise InvalidRequest(str(err)) from err


def check_migration_id(migration_id: str) -> None:
    try:
        shared.check_migration_id(migration_id)
    except shared.Invalid as err:
        raise InvalidRequest(str(err)) from err


# An operator's reason is stored in the log and shown in timelines: a sentence, not a file.
MAX_REASON = 512


def check_reason(reason: str) -> None:
    """One line of printable text: a newline or an escape in it would forge lines of the
    timelines and listings that show it."""
    if len(reason) > MAX_REASON:
        raise InvalidRequest(f"reason is {len(reason)} characters long; at most {MAX_REASON}")
    if not reason.isprintable():
        raise InvalidRequest(f"reason {shared.shown(reason)} contains control characters")


def check_spec(spec: common_pb2.VmSpec) -> None:
    try:
        shared.check_spec(spec)
    except shared.Invalid as err:
        raise InvalidRequest(str(err)) from err


# QEMU's own bound on downtime-limit is far above what a live migration may pause a guest for.
MAX_DOWNTIME_MS = 2000
# A post-copy recovery that has not succeeded in this many attempts, or within an hour per
# attempt, will not: the VM is fenced instead of waiting for days.
MAX_RECOVERY_ATTEMPTS = 100
MAX_RECOVERY_ATTEMPT_TIMEOUT_MS = 3_600_000
MAX_PASSES = 1000
_SCALARS = (
    "auto_postcopy_min_passes",
    "min_shrink_percent",
    "auto_postcopy_max_passes",
    "max_recovery_attempts",
    "recovery_attempt_timeout_ms",
    "stall_passes",
    "on_stall",
    "completion_timeout_s_per_gib",
    "max_downtime_ms",
    "name",
    "progress_timeout_s",
)
_PARAMETERS = (
    "max_bandwidth",
    "downtime_limit_ms",
    "max_postcopy_bandwidth",
    "auto_converge",
    "cpu_throttle_initial",
    "cpu_throttle_increment",
)


def overlay(
    base: events_pb2.MigrationPolicy, over: events_pb2.MigrationPolicy
) -> events_pb2.MigrationPolicy:
    """`base` with every field set (non-zero) in `over` taking its place."""
    policy = events_pb2.MigrationPolicy()
    policy.CopyFrom(base)
    for name in _PARAMETERS:
        if getattr(over.parameters, name):
            setattr(policy.parameters, name, getattr(over.parameters, name))
    for name in _SCALARS:
        if getattr(over, name):
            setattr(policy, name, getattr(over, name))
    if over.downtime_steps_ms:
        policy.ClearField("downtime_steps_ms")
        policy.downtime_steps_ms.extend(over.downtime_steps_ms)
    return policy


def effective_policy(requested: events_pb2.MigrationPolicy) -> events_pb2.MigrationPolicy:
    """The requested policy with every unset field taken from the defaults, checked. The
    default downtime limit never exceeds the largest downtime the policy allows."""
    policy = overlay(DEFAULT_POLICY, requested)
    if not requested.parameters.downtime_limit_ms and policy.max_downtime_ms:
        policy.parameters.downtime_limit_ms = min(
            policy.parameters.downtime_limit_ms, policy.max_downtime_ms
        )
    check_policy(policy)
    return policy


def check_policy(policy: events_pb2.MigrationPolicy) -> None:
    if policy.min_shrink_percent > 100:
        raise InvalidRequest("min_shrink_percent must be at most 100")
    downtimes = [policy.parameters.downtime_limit_ms, *policy.downtime_steps_ms]
    if any(d > MAX_DOWNTIME_MS for d in [*downtimes, policy.max_downtime_ms]):
        raise InvalidRequest(f"a downtime limit must be at most {MAX_DOWNTIME_MS} ms")
    if policy.max_downtime_ms and any(d > policy.max_downtime_ms for d in downtimes):
        raise InvalidRequest(
            f"downtime_limit_ms and every downtime step must be at most max_downtime_ms "
            f"({policy.max_downtime_ms} ms)"
        )
    if len(policy.downtime_steps_ms) > 32 or 0 in policy.downtime_steps_ms:
        raise InvalidRequest("downtime_steps_ms: at most 32 steps, each above 0 ms")
    for name in ("cpu_throttle_initial", "cpu_throttle_increment"):
        if getattr(policy.parameters, name) > 99:
            raise InvalidRequest(f"{name} must be at most 99 (percent)")
    if (
        policy.stall_passes > MAX_PASSES
        or policy.completion_timeout_s_per_gib > 86_400
        or policy.progress_timeout_s > 86_400
    ):
        raise InvalidRequest(
            f"stall_passes at most {MAX_PASSES}, completion_timeout_s_per_gib and "
            "progress_timeout_s 86400"
        )
    if max(policy.auto_postcopy_min_passes, policy.auto_postcopy_max_passes) > MAX_PASSES:
        raise InvalidRequest(f"auto_postcopy_min/max_passes: at most {MAX_PASSES}")
    if (
        policy.max_recovery_attempts > MAX_RECOVERY_ATTEMPTS
        or policy.recovery_attempt_timeout_ms > MAX_RECOVERY_ATTEMPT_TIMEOUT_MS
    ):
        raise InvalidRequest(
            f"max_recovery_attempts at most {MAX_RECOVERY_ATTEMPTS}, "
            f"recovery_attempt_timeout_ms at most {MAX_RECOVERY_ATTEMPT_TIMEOUT_MS}"
        )
    if policy.on_stall not in events_pb2.StallAction.values():
        raise InvalidRequest(f"unknown on_stall action {policy.on_stall}")
    if policy.name:
        check_name("policy", policy.name)


def largest_downtime_ms(policy: events_pb2.MigrationPolicy) -> int:
    return policy.max_downtime_ms or MAX_DOWNTIME_MS
