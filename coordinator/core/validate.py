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
    if len(reason) > MAX_REASON:
        raise InvalidRequest(f"reason is {len(reason)} characters long; at most {MAX_REASON}")


def check_spec(spec: common_pb2.VmSpec) -> None:
    try:
        shared.check_spec(spec)
    except shared.Invalid as err:
        raise InvalidRequest(str(err)) from err


def effective_policy(requested: events_pb2.MigrationPolicy) -> events_pb2.MigrationPolicy:
    """The requested policy with every unset field taken from the defaults."""
    policy = events_pb2.MigrationPolicy()
    policy.CopyFrom(DEFAULT_POLICY)
    params = requested.parameters
    for name in ("max_bandwidth", "downtime_limit_ms", "max_postcopy_bandwidth"):
        if getattr(params, name):
            setattr(policy.parameters, name, getattr(params, name))
    for name in (
        "auto_postcopy_min_passes",
        "min_shrink_percent",
        "auto_postcopy_max_passes",
        "max_recovery_attempts",
        "recovery_attempt_timeout_ms",
    ):
        if getattr(requested, name):
            setattr(policy, name, getattr(requested, name))
    if policy.min_shrink_percent > 100:
        raise InvalidRequest("min_shrink_percent must be at most 100")
    if policy.parameters.downtime_limit_ms > 2000:
        raise InvalidRequest("downtime_limit_ms must be at most 2000")
    return policy
