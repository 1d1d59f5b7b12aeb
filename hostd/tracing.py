"""hostd's spans: one per executed command (joined to the coordinator's command span through
the W3C context the command carries) and one per QMP command under it.

Without a collector configured the OpenTelemetry API is a no-op, so this costs next to nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_tracer = trace.get_tracer("whimbrel.hostd", "0.1.0")
_propagator = TraceContextTextMapPropagator()


def setup(endpoint: str, host_id: str) -> trace.TracerProvider:
    """Install an SDK tracer provider exporting to the OTLP/gRPC `endpoint`."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    from whimbrel.otel import resource, span_processor

    here = Resource({"host.name": host_id, "whimbrel.host": host_id})
    provider = TracerProvider(resource=resource("whimbrel-hostd").merge(here))
    provider.add_span_processor(span_processor(endpoint))
    trace.set_tracer_provider(provider)
    return provider


@contextlib.contextmanager
def command_span(
    name: str, carrier: Mapping[str, str], attributes: Mapping[str, str | int]
) -> Iterator[trace.Span]:
    """A SERVER span for one coordinator command, child of the coordinator's command span."""
    parent = _propagator.extract(dict(carrier))
    with _tracer.start_as_current_span(
        name, context=parent, kind=SpanKind.SERVER, attributes=dict(attributes)
    ) as span:
        yield span


@contextlib.contextmanager
def qmp_span(vm: str, command: str) -> Iterator[trace.Span]:
    """A CLIENT span around one QMP command, child of whatever span is current."""
    with _tracer.start_as_current_span(
        f"qmp {command}",
        kind=SpanKind.CLIENT,
        attributes={"rpc.system": "qmp", "rpc.method": command, "whimbrel.vm": vm},
    ) as span:
        yield span


def failed(span: trace.Span, error: BaseException) -> None:
    span.set_status(Status(StatusCode.ERROR, str(error)))
