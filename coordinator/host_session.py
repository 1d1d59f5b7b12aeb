"""One open hostd stream as the coordinator sees it, and its outbox: the commands a host is
owed (issued, durable, never answered), sent again whenever it reconnects."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from coordinator.core import World
from coordinator.core.state import Command, CommandState
from whimbrel.v1 import events_pb2, host_pb2

# A host's events are acknowledged at most this often (HostSession.acknowledge).
ACK_INTERVAL_S = 0.02


@dataclass
class HostSession:
    """One open hostd stream."""

    host_id: str
    generation: int
    outbox: asyncio.Queue[host_pb2.CoordinatorMessage | None] = field(default_factory=asyncio.Queue)
    # generation -> highest host seq in the log (or staged), to drop re-sent events early.
    stored: dict[int, int] = field(default_factory=dict)

    # The newest acknowledgement not sent yet, and the timer that sends it.
    _ack: host_pb2.Ack | None = None
    _ack_timer: asyncio.TimerHandle | None = None

    def send(self, message: host_pb2.CoordinatorMessage) -> None:
        self.outbox.put_nowait(message)

    def send_command(self, command: Command, epoch: int, trace: dict[str, str]) -> None:
        self.send(
            host_pb2.CoordinatorMessage(
                command=host_pb2.Command(
                    command_id=command.command_id,
                    migration_id=command.migration_id,
                    attempt=command.attempt,
                    epoch=epoch,
                    vm=command.vm,
                    kind=events_pb2.CommandKind.ValueType(command.kind),
                    args=command.args,
                    trace_context=trace,
                )
            )
        )

    def acknowledge(self, ack: host_pb2.Ack) -> None:
        """Acknowledge up to `ack`, at most once per ACK_INTERVAL_S: the commits of a
        switchover come a millisecond apart, and an ack per commit woke both ends each time,
        in the guest's pause. A later ack covers the earlier ones; one never sent (the stream
        ended) only means hostd re-sends events the log already has, which it drops."""
        self._ack = ack
        if self._ack_timer is None:
            loop = asyncio.get_running_loop()
            self._ack_timer = loop.call_later(ACK_INTERVAL_S, self._send_ack)

    def _send_ack(self) -> None:
        self._ack_timer = None
        if self._ack is not None:
            self.send(host_pb2.CoordinatorMessage(ack=self._ack))
            self._ack = None

    def close(self) -> None:
        self.outbox.put_nowait(None)


def outstanding(world: World, host_id: str) -> list[Command]:
    """Commands for `host_id` that were issued and never answered (the outbox)."""
    commands: list[Command] = []
    for migration_id in world.open_migrations:
        m = world.migrations[migration_id]
        commands += [c for c in m.commands.values() if c.host == host_id]
    for vm in world.vms.values():
        commands += [c for c in vm.commands.values() if c.host == host_id]
    return [c for c in commands if c.state == CommandState.ISSUED]


def issued_command(world: World, issued: events_pb2.CommandIssued) -> Command | None:
    """The world's record of a command whose intent was just committed."""
    owner = world.migrations.get(issued.migration_id) if issued.migration_id else None
    vm = world.vms.get(issued.vm)
    commands = owner.commands if owner is not None else (vm.commands if vm else {})
    return commands.get(issued.command_id)
