"""Coordinator metrics through the OpenTelemetry SDK, scraped by Prometheus.

Names follow OpenTelemetry (dots, units); the Prometheus exporter turns them into
`whimbrel_migrations_total`, `whimbrel_migration_phase_duration_seconds`, and so on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from coordinator.core import Event
from coordinator.core.state import MigrationState, Phase, World
from whimbrel.v1 import events_pb2

# Guest pauses are milliseconds; phases and recoveries seconds to minutes.
PAUSE_BUCKETS = [0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]
DURATION_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600]
APPEND_BUCKETS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]


class CoordinatorMetrics:
    def __init__(self, meter: Meter, world: Callable[[], World]) -> None:
        self._world = world
        self.migrations = meter.create_counter(
            "whimbrel.migrations", unit="{migration}",
            description="Migrations that reached a terminal phase, by outcome",
        )  # fmt: skip
        self.phase_duration = meter.create_histogram(
            "whimbrel.migration.phase.duration", unit="s",
            description="Time spent in each migration phase",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )  # fmt: skip
        self.pause = meter.create_histogram(
            "whimbrel.switchover.pause", unit="s",
            description="Guest-visible pause: destination RESUME minus source STOP (QEMU clocks)",
            explicit_bucket_boundaries_advisory=PAUSE_BUCKETS,
        )  # fmt: skip
        self.transferred = meter.create_counter(
            "whimbrel.migration.transferred", unit="By",
            description="Bytes QEMU reported transferred by migrations",
        )  # fmt: skip
        self.appended = meter.create_counter(
            "whimbrel.log.events.appended", unit="{event}",
            description="Events committed to the log",
        )  # fmt: skip
        self.append_latency = meter.create_histogram(
            "whimbrel.log.append.duration", unit="s",
            description="Time from handing a batch to the log to its durable commit",
            explicit_bucket_boundaries_advisory=APPEND_BUCKETS,
        )  # fmt: skip
        self.refused = meter.create_counter(
            "whimbrel.rpc.refused", unit="{call}",
            description="Calls refused before reaching a servicer (authentication, roles)",
        )  # fmt: skip
        self.recovery = meter.create_gauge(
            "whimbrel.recovery.duration", unit="s",
            description="Start-up: replay and new epoch until serving, last start",
        )  # fmt: skip
        meter.create_observable_gauge(
            "whimbrel.hosts.connected", [self._hosts_connected], unit="{host}",
            description="hostd streams open now",
        )  # fmt: skip
        meter.create_observable_gauge(
            "whimbrel.migrations.open", [self._migrations_open], unit="{migration}",
            description="Migrations not yet in a terminal phase",
        )  # fmt: skip
        self._phases: dict[str, tuple[Phase, int]] = {}
        self._bytes: dict[str, int] = {}

    def seed(self, world: World) -> None:
        for migration_id in world.open_migrations:
            m = world.migrations[migration_id]
            self._phases[migration_id] = (m.phase, m.phase_since_us)
            self._bytes[migration_id] = m.progress.transferred_bytes

    def staged(self, world: World, event: Event, migration_id: str) -> None:
        m = world.migrations.get(migration_id) if migration_id else None
        if m is None:
            return
        self._count_bytes(m)
        known = self._phases.get(migration_id)
        if known is not None and known[0] != m.phase:
            seconds = max(m.phase_since_us - known[1], 0) / 1e6
            self.phase_duration.record(seconds, {"phase": known[0].label})
        if m.phase.terminal:
            if known is not None and known[0] != m.phase:
                self._finished(m)
            self._phases.pop(migration_id, None)
            self._bytes.pop(migration_id, None)
        else:
            self._phases[migration_id] = (m.phase, m.phase_since_us)
        p = event.payload
        if (
            isinstance(p, events_pb2.QmpEventReceived)
            and p.event == "RESUME"
            and event.origin_host == m.destination
            and m.pause_us
        ):
            self.pause.record(m.pause_us / 1e6, {"postcopy": m.postcopy_started})

    def _count_bytes(self, m: MigrationState) -> None:
        now = m.progress.transferred_bytes
        before = self._bytes.get(m.migration_id, 0)
        if now > before:
            self.transferred.add(now - before)
            self._bytes[m.migration_id] = now

    def _finished(self, m: MigrationState) -> None:
        self.migrations.add(1, {"outcome": m.phase.label})

    def committed(self, events: int, seconds: float) -> None:
        self.appended.add(events)
        self.append_latency.record(seconds)

    def _hosts_connected(self, options: CallbackOptions) -> Iterable[Observation]:
        # Called on the scrape thread: copy before iterating (the loop may be changing it).
        hosts = list(self._world().hosts.values())
        yield Observation(sum(1 for h in hosts if h.connected))

    def _migrations_open(self, options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(len(self._world().open_migrations))
