"""A migration's story from the log: every event of its stream with its time, the commands with
their results and durations, the phases with their durations, the guest-visible pause (from
QEMU's own timestamps), the outcome, and who asked for the migration, its post-copy switch and its
abort (the principals of their certificates; "unknown" for a coordinator served without TLS)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from coordinator.core import Event, World
from coordinator.core.invariants import qmp_data
from coordinator.core.state import Kind, Phase
from whimbrel.protocol import migration_stream
from whimbrel.v1 import events_pb2

from .display import joined
from .logfile import fold


@dataclass
class Timeline:
    migration_id: str
    vm: str = ""
    source: str = ""
    destination: str = ""
    entries: list[dict[str, Any]] = field(default_factory=list)
    phases: list[dict[str, Any]] = field(default_factory=list)
    commands: list[dict[str, Any]] = field(default_factory=list)
    pause_us: int = 0
    outcome: str = ""
    reason: str = ""
    requested_by: str = ""
    postcopy_requested_by: str = ""
    aborted_by: str = ""


def _who(principal: str) -> str:
    return principal or "unknown"


def _label(kind: int) -> str:
    """A command kind's name; a kind no coordinator issues by its number."""
    try:
        return Kind(kind).label
    except ValueError:
        return f"kind {kind}"


def summary(event: Event) -> str:
    """One line saying what `event` is, for people."""
    p = event.payload
    if isinstance(p, events_pb2.QmpEventReceived):
        data = qmp_data(p.data_json)
        return f"QMP {p.event} {data if data else ''}".strip()
    if isinstance(p, events_pb2.CommandIssued):
        return f"issue {_label(p.kind)} -> {p.host_id}"
    if isinstance(p, events_pb2.CommandSucceeded):
        result = json_format.MessageToDict(p.result)
        return f"{_label(p.kind)} succeeded {result if result else ''}".strip()
    if isinstance(p, events_pb2.CommandFailed):
        return f"{_label(p.kind)} FAILED: {p.error}"
    fields = json_format.MessageToDict(p, preserving_proto_field_name=True)
    fields.pop("migration_id", None)
    fields.pop("vm", None)
    by = fields.pop("requested_by", "")
    summary = f"{event.type} {fields if fields else ''}".strip()
    return f"{summary} by {by}" if by else summary


def build(events: list[Event], migration_id: str) -> Timeline:
    """Fold the whole log (so the migration's state is exact) and narrate its stream."""
    timeline = Timeline(migration_id)
    world = World()
    stream = migration_stream(migration_id)
    start_us = 0
    phase: Phase | None = None
    phase_since = 0
    issued: dict[str, Event] = {}
    for event in events:
        fold(world, event)
        m = world.migrations.get(migration_id)
        if m is None or event.stream != stream:
            continue
        if not start_us:
            start_us = event.time_us
            timeline.vm, timeline.source, timeline.destination = m.vm, m.source, m.destination
        # QMP events carry QEMU's clock; the rest carry the host's or the coordinator's.
        timeline.entries.append(
            {
                "seq": event.seq,
                "at_ms": round((event.time_us - start_us) / 1000, 3),
                "host": event.origin_host or "coordinator",
                "what": summary(event),
            }
        )
        p = event.payload
        if isinstance(p, events_pb2.MigrationRequested):
            timeline.requested_by = _who(p.requested_by)
        elif isinstance(p, events_pb2.PostcopyRequested) and p.by == "operator":
            timeline.postcopy_requested_by = _who(p.requested_by)
        elif isinstance(p, events_pb2.RollbackDecided) and p.reason.startswith("aborted by"):
            timeline.aborted_by = _who(p.requested_by)
        if isinstance(p, events_pb2.CommandIssued):
            issued[p.command_id] = event
        elif isinstance(p, (events_pb2.CommandSucceeded, events_pb2.CommandFailed)):
            start = issued.get(p.command_id)
            if start is not None:
                timeline.commands.append(
                    {
                        "command": _label(p.kind),
                        "host": event.origin_host,
                        "ok": isinstance(p, events_pb2.CommandSucceeded),
                        "ms": round((event.time_us - start.time_us) / 1000, 3),
                    }
                )
        if m.phase != phase:
            if phase is not None:
                timeline.phases.append(
                    {"phase": phase.label, "ms": round((event.time_us - phase_since) / 1000, 3)}
                )
            phase, phase_since = m.phase, event.time_us
        timeline.pause_us = m.pause_us
        timeline.outcome = m.phase.label if m.phase.terminal else ""
        timeline.reason = m.reason
    return timeline


def render(t: Timeline) -> str:
    lines = [f"migration {t.migration_id}: {t.vm} {t.source} -> {t.destination}"]
    asked = [f"requested by {t.requested_by}"] if t.requested_by else []
    if t.postcopy_requested_by:
        asked.append(f"post-copy requested by {t.postcopy_requested_by}")
    if t.aborted_by:
        asked.append(f"aborted by {t.aborted_by}")
    if asked:
        lines.append(", ".join(asked))
    for e in t.entries:
        lines.append(f"  +{e['at_ms']:>10.1f} ms  {e['host']:<12} {e['what']}")
    if t.phases:
        lines.append("phases: " + ", ".join(f"{p['phase']} {p['ms']:.1f} ms" for p in t.phases))
    if t.commands:
        lines.append(
            "commands: "
            + ", ".join(
                f"{c['command']}@{c['host']} {c['ms']:.1f} ms{'' if c['ok'] else ' FAILED'}"
                for c in t.commands
            )
        )
    if t.pause_us:
        lines.append(
            f"guest-visible pause: {t.pause_us / 1000:.1f} ms "
            f"({t.destination} RESUME minus {t.source} STOP, QEMU clocks)"
        )
    lines.append(f"outcome: {t.outcome or 'still open'}" + (f" ({t.reason})" if t.reason else ""))
    return joined(lines)
