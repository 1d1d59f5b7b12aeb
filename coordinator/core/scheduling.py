"""Which queued migrations may start: limits on how many run at once, and a fair queue.

A migration is QUEUED from its request until it is admitted (MigrationAdmitted); only admitted,
open migrations count as running. Admission is decided from the world alone, under the
coordinator's single writer, and recorded before any host is asked anything, so the limits hold
across crashes: a replayed log counts the same migrations.

The queue is fair without head-of-line blocking: queued migrations are taken in request order,
and one that must wait holds back later ones only on its own hosts (a later migration may not
take the outbound slot of a source, or the inbound slot of a destination, an earlier one is
waiting for), so a busy host never stalls migrations between other hosts, and a migration is
never overtaken for ever by later ones on its hosts. The cluster limit holds everyone back.
"""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.core import inputs as I
from coordinator.core.errors import InvalidRequest
from coordinator.core.events import NewEvent
from coordinator.core.state import MigrationState, Phase, World
from coordinator.core.validate import check_reason
from whimbrel.protocol import COORDINATOR_STREAM
from whimbrel.v1 import common_pb2, events_pb2

# KubeVirt's defaults (5 per cluster, 2 outbound per node); inbound is capped alike, so a host
# never receives more than it could send.
DEFAULT_LIMITS = common_pb2.MigrationLimits(cluster=5, per_host_outbound=2, per_host_inbound=2)
# What an operator may set: above it a typo rather than a limit.
MAX_LIMIT = 10_000


def limits(world: World) -> common_pb2.MigrationLimits:
    return world.migration_limits if world.migration_limits is not None else DEFAULT_LIMITS


@dataclass(frozen=True)
class Running:
    """Migrations running (admitted and open): in all, out of each host, into each host."""

    total: int
    out_of: dict[str, int]
    into: dict[str, int]


def running(world: World) -> Running:
    out_of: dict[str, int] = {}
    into: dict[str, int] = {}
    total = 0
    for migration_id in world.open_migrations:
        m = world.migrations[migration_id]
        if m.phase == Phase.QUEUED:
            continue
        total += 1
        out_of[m.source] = out_of.get(m.source, 0) + 1
        into[m.destination] = into.get(m.destination, 0) + 1
    return Running(total, out_of, into)


def queue(world: World) -> list[MigrationState]:
    """Queued migrations in request order."""
    queued = [world.migrations[mid] for mid in world.open_migrations]
    return sorted((m for m in queued if m.phase == Phase.QUEUED), key=lambda m: m.requested_seq)


def waiting(world: World) -> dict[str, str]:
    """Every queued migration, in queue order, with what it waits for ("" for one that may
    start now: admitting the ones before it would leave room for it)."""
    limit = limits(world)
    now = running(world)
    total, out_of, into = now.total, dict(now.out_of), dict(now.into)
    held_sources: set[str] = set()
    held_destinations: set[str] = set()
    verdicts: dict[str, str] = {}
    for m in queue(world):
        why = _why_waiting(world, m, limit, total, out_of, into)
        if not why and m.source in held_sources:
            why = f"{m.source}: an earlier queued migration waits to send from it"
        if not why and m.destination in held_destinations:
            why = f"{m.destination}: an earlier queued migration waits to send to it"
        verdicts[m.migration_id] = why
        if why:
            held_sources.add(m.source)
            held_destinations.add(m.destination)
            continue
        total += 1
        out_of[m.source] = out_of.get(m.source, 0) + 1
        into[m.destination] = into.get(m.destination, 0) + 1
    return verdicts


def _why_waiting(
    world: World,
    m: MigrationState,
    limit: common_pb2.MigrationLimits,
    total: int,
    out_of: dict[str, int],
    into: dict[str, int],
) -> str:
    if limit.cluster and total >= limit.cluster:
        return f"cluster: {counted(total, 'migration')} running (limit {limit.cluster})"
    sending = out_of.get(m.source, 0)
    if limit.per_host_outbound and sending >= limit.per_host_outbound:
        return (
            f"{m.source}: {counted(sending, 'outbound migration')} running "
            f"(limit {limit.per_host_outbound})"
        )
    receiving = into.get(m.destination, 0)
    if limit.per_host_inbound and receiving >= limit.per_host_inbound:
        return (
            f"{m.destination}: {counted(receiving, 'inbound migration')} running "
            f"(limit {limit.per_host_inbound})"
        )
    for host in (m.source, m.destination):
        state = world.hosts.get(host)
        if state is None or not state.connected:
            return f"{host}: not connected"
    return ""


def counted(n: int, noun: str) -> str:
    """ "1 migration", "2 migrations", "3 passes"."""
    if n == 1:
        return f"{n} {noun}"
    return f"{n} {noun}es" if noun.endswith("s") else f"{n} {noun}s"


def places(world: World) -> dict[str, tuple[int, str]]:
    """Every queued migration's place (1: next) and what it waits for ("": room now)."""
    return {mid: (n, why) for n, (mid, why) in enumerate(waiting(world).items(), start=1)}


def set_limits(world: World, req: I.SetMigrationLimits) -> list[NewEvent]:
    """Record new limits. Running migrations go on; admissions follow the new limits."""
    check_reason(req.reason)
    for name in ("cluster", "per_host_outbound", "per_host_inbound"):
        value = getattr(req.limits, name)
        if value > MAX_LIMIT:
            raise InvalidRequest(f"limit {name} {value} is above {MAX_LIMIT} (0: no limit)")
    new = common_pb2.MigrationLimits()
    new.CopyFrom(req.limits)
    if world.migration_limits is not None and new == world.migration_limits:
        return []  # as a cordon: nothing is recorded when nothing changes
    changed = events_pb2.MigrationLimitsSet(
        limits=new, requested_by=req.principal, reason=req.reason
    )
    return [NewEvent(COORDINATOR_STREAM, changed, req.now_us)]


def admission(world: World, m: MigrationState) -> events_pb2.MigrationAdmitted | None:
    """The admission of queued `m` if it may start now, else None."""
    if waiting(world).get(m.migration_id, "not queued"):
        return None
    now = running(world)
    return events_pb2.MigrationAdmitted(
        migration_id=m.migration_id,
        running_cluster=now.total + 1,
        running_out_of_source=now.out_of.get(m.source, 0) + 1,
        running_into_destination=now.into.get(m.destination, 0) + 1,
    )
