"""A migration's commands as `lifecycle` reads and writes them: new intents with ids unique for
ever, whether a kind is still to be issued, and how often it failed."""

from __future__ import annotations

from typing import Any

from coordinator.core.state import CommandState, Kind, MigrationState
from whimbrel.v1 import events_pb2

FAILED = CommandState.FAILED


class Issuer:
    """Builds CommandIssued intents with ids unique within the migration: a decision may issue
    several, so it counts from the migration's commands on."""

    def __init__(self, m: MigrationState) -> None:
        self.m = m
        self.count = len(m.commands)

    def __call__(self, kind: int, host: str, **args: Any) -> events_pb2.CommandIssued:
        self.count += 1
        m = self.m
        return events_pb2.CommandIssued(
            command_id=f"{m.migration_id}/{m.attempt}/{self.count}-{Kind(kind).label}",
            migration_id=m.migration_id,
            attempt=m.attempt,
            host_id=host,
            vm=m.vm,
            kind=events_pb2.CommandKind.ValueType(kind),
            args=events_pb2.CommandArgs(**args),
        )


def to_issue(m: MigrationState, kind: int, host: str) -> bool:
    """No live command of `kind` on `host`: never issued, or failed under an earlier attempt
    (a post-copy recovery started a new attempt and left that failure behind). A failure in the
    current attempt is the lifecycle's problem check to judge."""
    command = m.cmd(kind, host)
    return command is None or (command.state == FAILED and command.attempt != m.attempt)


def retries(m: MigrationState, kind: int, host: str, *, this_attempt: bool = False) -> int:
    """How many commands of `kind` on `host` failed (in the current attempt only, if asked)."""
    return sum(
        1
        for c in m.commands.values()
        if c.kind == kind
        and c.host == host
        and c.state == FAILED
        and (not this_attempt or c.attempt == m.attempt)
    )


def continues_at_pre_switchover(m: MigrationState) -> bool:
    """START_MIGRATION asked the source's hostd to continue the switchover itself once its
    source stopped in pre-switchover."""
    start = m.cmd(Kind.START_MIGRATION, m.src.host)
    return start is not None and start.args.continue_at_pre_switchover


def releases_at_switchover(m: MigrationState) -> bool:
    """START_MIGRATION asked the source's hostd to release the lease at its switchover stop."""
    start = m.cmd(Kind.START_MIGRATION, m.src.host)
    return start is not None and start.args.release_lease_at_switchover
