"""Derived state at any point of history: fold the log up to a seq (or a time) and describe
hosts, VMs and migrations as the coordinator saw them then."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from coordinator.core import Event, World

from .display import joined
from .logfile import fold


def at(events: Iterable[Event], seq: int = 0, time_us: int = 0) -> World:
    """The world after event `seq`, or after the last event stamped at or before `time_us`."""
    world = World()
    for event in events:
        if seq and event.seq > seq:
            break
        if time_us and event.time_us > time_us:
            continue  # host clocks may disagree a little: keep folding later seqs up to time
        fold(world, event)
    return world


def parse_time(text: str) -> int:
    """Microseconds since the Unix epoch, from an integer or an ISO 8601 time."""
    if text.isdigit():
        return int(text)
    when = datetime.fromisoformat(text)
    return int(when.timestamp() * 1_000_000)


def describe(world: World) -> dict[str, Any]:
    return {
        "last_seq": world.last_seq,
        "epoch": world.epoch,
        "hosts": {h.host_id: {"generation": h.generation, "connected": h.connected}
                  for h in sorted(world.hosts.values(), key=lambda h: h.host_id)},
        "vms": {vm.name: {"status": vm.status.name.lower(), "host": vm.host,
                          "lease_holder": vm.lease_holder, "lease_generation": vm.lease_generation,
                          "migration": vm.migration_id, "lost_reason": vm.lost_reason}
                for vm in sorted(world.vms.values(), key=lambda v: v.name)},
        "migrations": {m.migration_id: {"vm": m.vm, "source": m.source,
                                        "destination": m.destination, "phase": m.phase.label,
                                        "point_of_no_return_passed": m.cont_issued,
                                        "attempt": m.attempt, "reason": m.reason}
                       for m in world.migrations.values()},
    }  # fmt: skip


def render(state: dict[str, Any]) -> str:
    lines = [f"state after seq {state['last_seq']} (epoch {state['epoch']})", "hosts:"]
    for host, h in state["hosts"].items():
        lines.append(f"  {host:<16} generation {h['generation']}, "
                     f"{'connected' if h['connected'] else 'disconnected'}")  # fmt: skip
    lines.append("vms:")
    for name, vm in state["vms"].items():
        lines.append(f"  {name:<16} {vm['status']:<10} host={vm['host'] or '-'} "
                     f"lease={vm['lease_holder'] or '-'}@{vm['lease_generation']}"
                     + (f" migration={vm['migration']}" if vm["migration"] else ""))  # fmt: skip
    lines.append("migrations:")
    for mid, m in state["migrations"].items():
        lines.append(f"  {mid:<16} {m['vm']} {m['source']}->{m['destination']} {m['phase']}"
                     + (" (past the point of no return)" if m["point_of_no_return_passed"]
                        else ""))  # fmt: skip
    return joined(lines)
