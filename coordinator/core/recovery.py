"""The recovery table: what becomes of a migration when one of its hosts did not come back.

After a restart the coordinator waits a bounded time for every host of an open migration to say
hello (nothing about a migration is decided while one of its hosts is awaited: the log's picture
of that host may be stale). A host that misses the bound is "missing" until it returns. A
migration with a missing host is then treated by its stage, never by guessing whether an
unanswered command ran. The principle is libvirt's `qemuProcessRecoverMigration`, taken to a
terminal state: before the point of no return fall back to the source; after it drive forward.

This module is the single source of the table; `docs/recovery.md` shows the same table, and a
test keeps the two equal.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from coordinator.core.state import MigrationState, World


class Stage(enum.Enum):
    BEFORE_SWITCH = "before the switch (source running, transfer in progress)"
    SWITCHING = "switching, pre-copy (source stopped, destination never resumed)"
    POSTCOPY = "post-copy started or asked for, destination not yet resumed"
    AFTER_CONT = "past the point of no return (destination's cont logged)"


class Missing(enum.Enum):
    SOURCE = "source"
    DESTINATION = "destination"
    BOTH = "both"


class Action(enum.Enum):
    # Fall back to the source: the rollback's commands to a missing host wait for it, and a
    # destination that never ran is destroyed when its host returns.
    ROLLBACK = "roll back"
    # Keep the migration open until the host returns: its QEMU holds state nobody else has,
    # so any other move could lose the VM or run it twice. Its hello then decides.
    WAIT = "wait for the host"
    # Complete without the source: the destination already has everything.
    COMPLETE = "complete; the source's QEMU is destroyed when its host returns"


@dataclass(frozen=True)
class Rule:
    action: Action
    why: str


_BEFORE_PNR = "before the point of no return the source is the VM; the destination never ran"
TABLE: dict[tuple[Stage, Missing], Rule] = {
    (Stage.BEFORE_SWITCH, Missing.SOURCE): Rule(Action.ROLLBACK, _BEFORE_PNR),
    (Stage.BEFORE_SWITCH, Missing.DESTINATION): Rule(Action.ROLLBACK, _BEFORE_PNR),
    (Stage.BEFORE_SWITCH, Missing.BOTH): Rule(Action.ROLLBACK, _BEFORE_PNR),
    (Stage.SWITCHING, Missing.SOURCE): Rule(Action.ROLLBACK, _BEFORE_PNR),
    (Stage.SWITCHING, Missing.DESTINATION): Rule(
        Action.ROLLBACK, _BEFORE_PNR + "; a lease it took is given back only through it"
    ),
    (Stage.SWITCHING, Missing.BOTH): Rule(Action.ROLLBACK, _BEFORE_PNR),
    (Stage.POSTCOPY, Missing.SOURCE): Rule(
        Action.WAIT, "the destination holds part of the memory, the source the rest"
    ),
    (Stage.POSTCOPY, Missing.DESTINATION): Rule(
        Action.WAIT, "a source is never resumed once post-copy started"
    ),
    (Stage.POSTCOPY, Missing.BOTH): Rule(Action.WAIT, "both halves of the memory are needed"),
    (Stage.AFTER_CONT, Missing.SOURCE): Rule(
        Action.WAIT,
        "post-copy: the destination still pulls pages from the source "
        "(pre-copy already completed: see the next row)",
    ),
    (Stage.AFTER_CONT, Missing.DESTINATION): Rule(
        Action.WAIT, "the destination is the VM; the source must never run again"
    ),
    (Stage.AFTER_CONT, Missing.BOTH): Rule(Action.WAIT, "the destination is the VM"),
}
# Past the point of no return with the transfer completed, the source has nothing left to give.
COMPLETED_TRANSFER = Rule(Action.COMPLETE, "the destination has all the memory and runs")


def stage(m: MigrationState) -> Stage:
    if m.cont_issued:
        return Stage.AFTER_CONT
    # QEMU answers migrate-start-postcopy before it switches, and a hostd restart can lose
    # both the answer and the status: once sent, post-copy may have begun (however the
    # command ended), and a source in post-copy can never be resumed.
    if m.postcopy_started or m.postcopy_switch_sent:
        return Stage.POSTCOPY
    if m.src.status in ("pre-switchover", "device", "completed") or m.src_lease_released:
        return Stage.SWITCHING
    return Stage.BEFORE_SWITCH


def missing(world: World, m: MigrationState) -> Missing | None:
    gone = world.missing_hosts
    src, dst = m.source in gone, m.destination in gone
    if src and dst:
        return Missing.BOTH
    if src:
        return Missing.SOURCE
    if dst:
        return Missing.DESTINATION
    return None


def describe_missing(world: World, m: MigrationState) -> str:
    """Which host of `m` did not return, in words: "source host-a did not return"."""
    who = missing(world, m)
    if who == Missing.BOTH:
        return f"source {m.source} and destination {m.destination} did not return"
    if who == Missing.SOURCE:
        return f"source {m.source} did not return"
    if who == Missing.DESTINATION:
        return f"destination {m.destination} did not return"
    return "every host returned"


def rule_for(world: World, m: MigrationState) -> Rule | None:
    """The rule for `m` if one of its hosts is missing, else None (decide as usual)."""
    who = missing(world, m)
    if who is None:
        return None
    where = stage(m)
    if (
        where == Stage.AFTER_CONT
        and who == Missing.SOURCE
        and m.dst_resumed
        and m.dst.status == "completed"
    ):
        return COMPLETED_TRANSFER
    return TABLE[(where, who)]


def awaiting_hello(world: World, m: MigrationState) -> bool:
    """True while a host of `m` is awaited after a restart: decide nothing on stale knowledge."""
    awaited = world.awaited_hosts
    return bool(awaited) and (m.source in awaited or m.destination in awaited)


def render_table() -> str:
    """The table as Markdown (docs/recovery.md embeds exactly this)."""
    lines = [
        "| stage | missing host | action | why |",
        "|---|---|---|---|",
    ]
    for (where, who), rule in TABLE.items():
        lines.append(f"| {where.value} | {who.value} | {rule.action.value} | {rule.why} |")
    lines.append(
        f"| {Stage.AFTER_CONT.value}, transfer completed | {Missing.SOURCE.value} | "
        f"{COMPLETED_TRANSFER.action.value} | {COMPLETED_TRANSFER.why} |"
    )
    return "\n".join(lines) + "\n"
