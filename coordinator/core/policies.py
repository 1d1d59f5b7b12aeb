"""Stored convergence policies: named, versioned by the log, one of them the cluster default.

A migration resolves its policy once, when requested: the named policy (or the cluster
default), then the fields its request sets, then the built-in defaults for whatever is still
unset. The resolved policy is recorded in its MigrationRequested, so a later change of the
stored policy never changes a migration already under way.
"""

from __future__ import annotations

from coordinator.core import inputs as I
from coordinator.core.errors import InvalidRequest, NotFound
from coordinator.core.events import NewEvent
from coordinator.core.state import World
from coordinator.core.validate import check_name, check_reason, effective_policy, overlay
from whimbrel.protocol import COORDINATOR_STREAM, NO_POLICY
from whimbrel.v1 import events_pb2
from whimbrel.validate import shown


def resolve(
    world: World, name: str, requested: events_pb2.MigrationPolicy
) -> events_pb2.MigrationPolicy:
    """The policy a migration gets (raises InvalidRequest, NotFound)."""
    if requested.name:
        # The resolved policy's name says which stored policy it came from: the coordinator's.
        raise InvalidRequest(
            f"policy.name {shown(requested.name)} is not for requests: name a stored policy "
            "with policy_name"
        )
    name = name or world.default_policy
    base = events_pb2.MigrationPolicy()
    if name:
        check_name("policy", name)
        if name not in world.policies:
            raise NotFound("policy", name)
        base = overlay(world.policies[name], events_pb2.MigrationPolicy(name=name))
    return effective_policy(overlay(base, requested))


def define(world: World, req: I.DefinePolicy) -> list[NewEvent]:
    check_name("policy", req.name)
    if req.name == NO_POLICY:
        raise InvalidRequest(
            f"policy name {NO_POLICY!r} is reserved: `policy default {NO_POLICY}` clears the "
            "cluster default"
        )
    check_reason(req.reason)
    if req.policy.name and req.policy.name != req.name:
        raise InvalidRequest(
            f"policy.name {shown(req.policy.name)} is not the name defined ({req.name}): "
            "leave it empty"
        )
    stored = events_pb2.MigrationPolicy()
    stored.CopyFrom(req.policy)
    stored.name = ""  # the name is the event's; a migration's resolved policy carries it
    effective_policy(stored)  # refuse now what every migration using it would be refused
    defined = events_pb2.PolicyDefined(
        name=req.name, policy=stored, requested_by=req.principal, reason=req.reason
    )
    return [NewEvent(COORDINATOR_STREAM, defined, req.now_us)]


def set_default(world: World, req: I.SetDefaultPolicy) -> list[NewEvent]:
    check_reason(req.reason)
    if req.name:
        check_name("policy", req.name)
        if req.name not in world.policies:
            raise NotFound("policy", req.name)
    if req.name == world.default_policy:
        return []
    chosen = events_pb2.DefaultPolicySet(
        name=req.name, requested_by=req.principal, reason=req.reason
    )
    return [NewEvent(COORDINATOR_STREAM, chosen, req.now_us)]
