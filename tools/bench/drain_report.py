"""What a log says about a drain, read independently of the coordinator's own bookkeeping:
command latencies, how the migrations ended, and the migrations running at every point
against the limits in force (a second witness beside the audit's invariant 11).

Clocks: a CommandIssued's time_us is the coordinator's wall clock when it decided; a
CommandSucceeded's or CommandFailed's is the executing hostd's wall clock when the command
was done. On one machine both read the same CLOCK_REALTIME, so their difference is the
command's latency from decision to done (outbox, stream, hostd, QMP), not counting the
result's way back into the log.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from coordinator.core import Event
from coordinator.core.scheduling import DEFAULT_LIMITS
from whimbrel.v1 import common_pb2, events_pb2

__all__ = ["Peaks", "command_latencies_ms", "destinations", "outcomes", "running_peaks"]


def command_latencies_ms(events: Iterable[Event]) -> dict[str, list[float]]:
    """Milliseconds from each CommandIssued to its result, by command kind."""
    issued: dict[tuple[str, int], Event] = {}
    by_kind: dict[str, list[float]] = {}
    for e in events:
        p = e.payload
        if isinstance(p, events_pb2.CommandIssued):
            issued[p.command_id, p.attempt] = e
        elif isinstance(p, events_pb2.CommandSucceeded | events_pb2.CommandFailed):
            start = issued.pop((p.command_id, p.attempt), None)
            if start is not None:
                kind = events_pb2.CommandKind.Name(p.kind).removeprefix("COMMAND_KIND_")
                by_kind.setdefault(kind, []).append((e.time_us - start.time_us) / 1000)
    return by_kind


def outcomes(events: Iterable[Event], migration_ids: Iterable[str]) -> Counter[str]:
    """How each of these migrations ended ("COMPLETED", "ROLLED_BACK", "FENCED")."""
    wanted = set(migration_ids)
    ended: Counter[str] = Counter()
    for e in events:
        p = e.payload
        if isinstance(p, events_pb2.MigrationFinished) and p.migration_id in wanted:
            ended[common_pb2.MigrationPhase.Name(p.phase).removeprefix("MIGRATION_PHASE_")] += 1
    return ended


def destinations(events: Iterable[Event]) -> dict[str, tuple[str, str]]:
    """(source, destination) of every migration requested."""
    return {
        e.payload.migration_id: (e.payload.source, e.payload.destination)
        for e in events
        if isinstance(e.payload, events_pb2.MigrationRequested)
    }


@dataclass
class Peaks:
    """The most migrations that ran at once, and every admission that went past a limit."""

    cluster: int = 0
    out_of_host: int = 0
    into_host: int = 0
    violations: list[str] = field(default_factory=list)


def running_peaks(events: Sequence[Event]) -> Peaks:
    """Replay admissions and ends in log order, judging each admission by the limits then in
    force (the defaults until a MigrationLimitsSet)."""
    ends = destinations(events)
    limits = DEFAULT_LIMITS
    running: set[str] = set()
    peaks = Peaks()
    for e in events:
        p = e.payload
        if isinstance(p, events_pb2.MigrationLimitsSet):
            limits = p.limits
        elif isinstance(p, events_pb2.MigrationFinished):
            running.discard(p.migration_id)
        elif isinstance(p, events_pb2.MigrationAdmitted):
            running.add(p.migration_id)
            source, destination = ends[p.migration_id]
            total = len(running)
            out = sum(1 for m in running if ends[m][0] == source)
            into = sum(1 for m in running if ends[m][1] == destination)
            peaks.cluster = max(peaks.cluster, total)
            peaks.out_of_host = max(peaks.out_of_host, out)
            peaks.into_host = max(peaks.into_host, into)
            for what, n, limit in (
                ("cluster", total, limits.cluster),
                (f"out of {source}", out, limits.per_host_outbound),
                (f"into {destination}", into, limits.per_host_inbound),
            ):
                if limit and n > limit:
                    peaks.violations.append(
                        f"seq {e.seq}: {p.migration_id} admitted with {n} running {what} "
                        f"(limit {limit})"
                    )
    return peaks
