"""What the coordinator tells SREs: OpenTelemetry traces (one per migration, rebuilt from the
log's own timestamps) and metrics (a Prometheus scrape endpoint). Both only observe committed
events; neither can change a decision."""

from coordinator.telemetry.hub import Telemetry

__all__ = ["Telemetry"]
