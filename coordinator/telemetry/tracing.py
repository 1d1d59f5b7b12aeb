"""Spans of migrations, built from committed events.

One trace per migration: a root span from the request to the terminal phase, one span per phase,
and one span per command (from its CommandIssued to its result), the command span being the
parent that hostd's own spans join (its W3C context travels with the command). Spans are made
whole from the log's timestamps when they end, with deterministic ids (`ids`), so a restarted
coordinator continues the trace where the previous one stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    get_current_span,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from coordinator.core import Event
from coordinator.core.state import Command, MigrationState, Phase, World
from coordinator.telemetry import ids
from whimbrel.v1 import common_pb2, events_pb2

_PROPAGATOR = TraceContextTextMapPropagator()
SCOPE = InstrumentationScope("whimbrel.coordinator", "0.1.0")
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


def _context(trace: int, span: int) -> SpanContext:
    return SpanContext(trace, span, is_remote=False, trace_flags=_SAMPLED)


@dataclass(slots=True)
class _OpenPhase:
    phase: Phase
    since_us: int


class MigrationTracer:
    """Turns staged events into finished spans; `flush` hands them to the processor once the
    events are durable."""

    def __init__(self, processor: SpanProcessor, resource: Resource) -> None:
        self.processor = processor
        self.resource = resource
        self._phases: dict[str, _OpenPhase] = {}
        self._ready: list[ReadableSpan] = []
        # The span of whoever asked for a migration (from gRPC metadata), linked from its root
        # span. Kept in memory only: a restarted coordinator's root span has no link.
        self._callers: dict[str, SpanContext] = {}

    def seed(self, world: World) -> None:
        """After replay: the open migrations' current phases (their spans end later)."""
        for migration_id in world.open_migrations:
            m = world.migrations[migration_id]
            self._phases[migration_id] = _OpenPhase(m.phase, m.phase_since_us)

    def staged(self, world: World, event: Event, migration_id: str) -> None:
        p = event.payload
        m = world.migrations.get(migration_id) if migration_id else None
        if m is None:
            if isinstance(p, (events_pb2.CommandSucceeded, events_pb2.CommandFailed)):
                self._vm_command_span(world, p, event.time_us)
            return
        changed = self._phase_change(m)
        if isinstance(p, (events_pb2.CommandSucceeded, events_pb2.CommandFailed)):
            command = m.commands.get(p.command_id)
            if command is not None:
                self._command_span(m, command, p, event.time_us)
        if changed and m.phase.terminal:
            self._root_span(m)

    def flush(self) -> None:
        ready, self._ready = self._ready, []
        for span in ready:
            self.processor.on_end(span)

    def shutdown(self) -> None:
        self.flush()
        self.processor.shutdown()

    def requested_by(self, migration_id: str, metadata: dict[str, str]) -> None:
        caller = get_current_span(_PROPAGATOR.extract(metadata)).get_span_context()
        if caller.is_valid:
            self._callers[migration_id] = caller

    def command_context(self, command: Command) -> dict[str, str]:
        """The W3C carrier hostd extracts to parent its spans on this command's span."""
        trace = (
            ids.trace_id(command.migration_id)
            if command.migration_id
            else ids.command_trace_id(command.command_id)
        )
        return {"traceparent": ids.traceparent(trace, ids.command_span_id(command.command_id))}

    # --- spans --------------------------------------------------------------------------------

    def _span(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        start_us: int,
        end_us: int,
        attributes: dict[str, AttributeValue],
        kind: SpanKind = SpanKind.INTERNAL,
        status: Status | None = None,
        links: Sequence[Link] = (),
    ) -> None:
        self._ready.append(
            ReadableSpan(
                name,
                context=context,
                parent=parent,
                resource=self.resource,
                attributes=attributes,
                kind=kind,
                status=status or Status(StatusCode.UNSET),
                links=links,
                start_time=start_us * 1000,
                end_time=max(end_us, start_us) * 1000,
                instrumentation_scope=SCOPE,
            )
        )

    def _phase_change(self, m: MigrationState) -> bool:
        """Emit the span of the phase `m` just left, if it left one."""
        known = self._phases.get(m.migration_id)
        if known is None:
            if not m.phase.terminal:
                self._phases[m.migration_id] = _OpenPhase(m.phase, m.phase_since_us)
            return False
        if known.phase == m.phase:
            return False
        trace = ids.trace_id(m.migration_id)
        span = ids.phase_span_id(m.migration_id, known.phase.label, known.since_us)
        self._span(
            f"phase {known.phase.label}",
            _context(trace, span),
            _context(trace, ids.root_span_id(m.migration_id)),
            known.since_us,
            m.phase_since_us,
            {
                "whimbrel.migration.id": m.migration_id,
                "whimbrel.vm": m.vm,
                "whimbrel.phase": known.phase.label,
                "whimbrel.next_phase": m.phase.label,
            },
        )
        self._phases[m.migration_id] = _OpenPhase(m.phase, m.phase_since_us)
        return True

    def _command_span(
        self,
        m: MigrationState,
        command: Command,
        result: events_pb2.CommandSucceeded | events_pb2.CommandFailed,
        end_us: int,
    ) -> None:
        trace = ids.trace_id(m.migration_id)
        self._span(
            f"command {command.kind_name}",
            _context(trace, ids.command_span_id(command.command_id)),
            _context(trace, ids.root_span_id(m.migration_id)),
            command.issued_at_us,
            end_us,
            self._command_attributes(command, result),
            SpanKind.CLIENT,
            self._command_status(result),
        )

    def _vm_command_span(
        self, world: World, result: events_pb2.CommandSucceeded | events_pb2.CommandFailed,
        end_us: int,
    ) -> None:  # fmt: skip
        command = world.command(result.command_id, result.vm)
        if command is None or command.migration_id:
            return
        trace = ids.command_trace_id(command.command_id)
        self._span(
            f"command {command.kind_name}",
            _context(trace, ids.command_span_id(command.command_id)),
            None,
            command.issued_at_us,
            end_us,
            self._command_attributes(command, result),
            SpanKind.CLIENT,
            self._command_status(result),
        )

    @staticmethod
    def _command_attributes(
        command: Command, result: events_pb2.CommandSucceeded | events_pb2.CommandFailed
    ) -> dict[str, AttributeValue]:
        attributes: dict[str, AttributeValue] = {
            "whimbrel.command.id": command.command_id,
            "whimbrel.command.kind": command.kind_name,
            "whimbrel.host": command.host,
            "whimbrel.vm": command.vm,
            "whimbrel.attempt": command.attempt,
            "whimbrel.command.outcome": (
                "succeeded" if isinstance(result, events_pb2.CommandSucceeded) else "failed"
            ),
        }
        if command.migration_id:
            attributes["whimbrel.migration.id"] = command.migration_id
        return attributes

    @staticmethod
    def _command_status(result: events_pb2.CommandSucceeded | events_pb2.CommandFailed) -> Status:
        if isinstance(result, events_pb2.CommandFailed):
            return Status(StatusCode.ERROR, result.error)
        return Status(StatusCode.OK)

    def _root_span(self, m: MigrationState) -> None:
        self._phases.pop(m.migration_id, None)
        caller = self._callers.pop(m.migration_id, None)
        links = [Link(caller, {"whimbrel.link": "requested by"})] if caller is not None else []
        trace = ids.trace_id(m.migration_id)
        ok = m.phase == Phase.COMPLETED
        self._span(
            f"migration {m.vm}",
            _context(trace, ids.root_span_id(m.migration_id)),
            None,
            m.requested_at_us,
            m.finished_at_us or m.phase_since_us,
            {
                "whimbrel.migration.id": m.migration_id,
                "whimbrel.vm": m.vm,
                "whimbrel.source": m.source,
                "whimbrel.destination": m.destination,
                "whimbrel.mode": common_pb2.MigrationMode.Name(
                    common_pb2.MigrationMode.ValueType(m.mode)
                ),
                "whimbrel.outcome": m.phase.label,
                "whimbrel.reason": m.reason,
                "whimbrel.attempts": m.attempt,
                "whimbrel.recovery_attempts": m.recovery_attempts,
                "whimbrel.postcopy": m.postcopy_started,
                "whimbrel.pause_us": m.pause_us,
            },
            status=Status(StatusCode.OK) if ok else Status(StatusCode.ERROR, m.reason),
            links=links,
        )
