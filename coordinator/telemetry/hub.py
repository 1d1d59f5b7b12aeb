"""The coordinator's one handle on telemetry: traces and metrics, each optional.

`Coordinator` calls `staged` right after folding each event (the state of that instant is
visible only then), `committed` once the batch is durable (only then do spans leave), and
`command_context` when it sends a command.
"""

from __future__ import annotations

from google.protobuf.message import Message

from coordinator.core import Event
from coordinator.core.state import Command, World
from coordinator.telemetry.metrics import CoordinatorMetrics
from coordinator.telemetry.tracing import MigrationTracer
from whimbrel import protocol


def migration_of(world: World, payload: Message) -> str:
    """The migration an event concerns, if any."""
    migration_id, command_id, vm_name = protocol.refs(payload)
    if migration_id:
        return migration_id
    if command_id:
        command = world.command(command_id, vm_name)
        return command.migration_id if command is not None else ""
    vm = world.vms.get(vm_name) if vm_name else None
    return vm.migration_id if vm is not None else ""


class Telemetry:
    def __init__(
        self, tracer: MigrationTracer | None = None, metrics: CoordinatorMetrics | None = None
    ) -> None:
        self.tracer = tracer
        self.metrics = metrics

    def seed(self, world: World) -> None:
        for part in (self.tracer, self.metrics):
            if part is not None:
                part.seed(world)

    def staged(self, world: World, event: Event, migration_id: str) -> None:
        """`migration_id`: the migration the event concerns (`migration_of`), or ""."""
        if self.tracer is not None:
            self.tracer.staged(world, event, migration_id)
        if self.metrics is not None:
            self.metrics.staged(world, event, migration_id)

    def committed(self, events: int, seconds: float) -> None:
        if self.tracer is not None:
            self.tracer.flush()
        if self.metrics is not None:
            self.metrics.committed(events, seconds)

    def recovered(self, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.recovery.set(seconds)

    def refused(self, method: str, code: str) -> None:
        if self.metrics is not None:
            self.metrics.refused.add(1, {"rpc.method": method, "rpc.grpc.status_code": code})

    def requested_by(self, migration_id: str, metadata: dict[str, str]) -> None:
        if self.tracer is not None:
            self.tracer.requested_by(migration_id, metadata)

    def command_context(self, command: Command) -> dict[str, str]:
        return self.tracer.command_context(command) if self.tracer is not None else {}

    def shutdown(self) -> None:
        if self.tracer is not None:
            self.tracer.shutdown()
