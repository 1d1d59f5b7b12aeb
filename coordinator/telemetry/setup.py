"""Build the coordinator's telemetry (see `whimbrel.otel` for the OTEL_* settings honoured)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from coordinator.core.state import World
from coordinator.telemetry.hub import Telemetry
from coordinator.telemetry.metrics import CoordinatorMetrics
from coordinator.telemetry.tracing import MigrationTracer
from whimbrel.otel import otlp_endpoint, resource, span_processor


@dataclass
class MetricsServer:
    """A Prometheus scrape endpoint over a private registry."""

    port: int
    close: Callable[[], None]


def serve_metrics(listen: str, service: str) -> tuple[Any, MetricsServer]:
    """Start `/metrics` on HOST:PORT; returns (meter, server). Raises OSError if it cannot bind."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import CollectorRegistry, start_http_server

    host, _, port = listen.rpartition(":")
    registry = CollectorRegistry()
    reader = PrometheusMetricReader(registry=registry)
    provider = MeterProvider(metric_readers=[reader], resource=resource(service))
    server, thread = start_http_server(int(port), addr=host.strip("[]"), registry=registry)

    def close() -> None:
        server.shutdown()
        server.server_close()
        thread.join()
        provider.shutdown()

    return provider.get_meter("whimbrel.coordinator"), MetricsServer(server.server_port, close)


def coordinator_telemetry(
    otlp_flag: str | None, metrics_listen: str | None, world: Callable[[], World]
) -> tuple[Telemetry, MetricsServer | None]:
    """Telemetry for a coordinator process; raises OSError if the metrics address is unusable."""
    service = "whimbrel-coordinator"
    tracer = None
    endpoint = otlp_endpoint(otlp_flag)
    if endpoint:
        tracer = MigrationTracer(span_processor(endpoint), resource(service))
    metrics, server = None, None
    if metrics_listen:
        meter, server = serve_metrics(metrics_listen, service)
        metrics = CoordinatorMetrics(meter, world)
    return Telemetry(tracer, metrics), server
