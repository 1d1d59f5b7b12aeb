"""OpenTelemetry settings shared by the coordinator and hostd: flags and the standard OTEL_*
environment.

Traces go to an OTLP/gRPC collector when `--otlp-endpoint` or OTEL_EXPORTER_OTLP_ENDPOINT /
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set (and OTEL_TRACES_EXPORTER is not "none"); the exporter
reads the rest (headers, timeout, insecure, certificates) from the environment itself, and
OTEL_BSP_* tunes batching. OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES name the process.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from opentelemetry.sdk.resources import SERVICE_NAME, Resource


def resource(default_service: str) -> Resource:
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: default_service}
    return Resource.create(attributes)


def otlp_endpoint(flag: str | None) -> str:
    """The collector to send traces to, or "" for none."""
    exporters = os.environ.get("OTEL_TRACES_EXPORTER", "otlp")
    if not flag and "otlp" not in exporters.split(","):
        return ""
    return (
        flag
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    )


def span_processor(endpoint: str) -> Any:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    insecure = endpoint.startswith("http://") or None
    return BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=insecure))


def add_otlp_flag(parser: argparse.ArgumentParser) -> None:
    """`--otlp-endpoint`, the same on every daemon."""
    parser.add_argument(
        "--otlp-endpoint",
        help="OTLP/gRPC collector for traces, e.g. http://127.0.0.1:4317 (default: "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT; none when unset)",
    )
