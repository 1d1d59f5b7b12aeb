"""Migration traces are a function of the log: a coordinator restarted anywhere in a migration
continues the same trace, and the spans it emits are exactly those one uninterrupted coordinator
would have emitted."""

from __future__ import annotations

import itertools

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from coordinator.core import Event, World, evolve
from coordinator.core import inputs as I
from coordinator.telemetry import ids
from coordinator.telemetry.hub import migration_of
from coordinator.telemetry.tracing import MigrationTracer
from tools.sim import Driver, SimHosts, migration, running_vm
from whimbrel.v1 import events_pb2


def completed_postcopy_log() -> list[Event]:
    driver = Driver()
    driver.connect("host-a", "host-b")
    running_vm(driver)
    hosts = SimHosts()
    hosts.leases["vm-1"] = ("host-a", 1)
    policy = events_pb2.MigrationPolicy()
    driver.request(I.StartMigration("m-1", "vm-1", "host-b", 2, policy, driver.now_us))
    driver.run("m-1", hosts)
    driver.observe(
        migration("host-a", "vm-1", "completed"), migration("host-b", "vm-1", "completed")
    )
    driver.run("m-1", hosts)
    assert driver.world.migrations["m-1"].phase.label == "completed"
    return driver.log


Span = tuple[str, int, int, int, int, int]


def trace(events: list[Event], world: World | None = None) -> tuple[list[Span], World]:
    """Feed `events` as the coordinator does (fold, then observe); a given `world` is the
    replayed state of a restart."""
    exporter = InMemorySpanExporter()
    tracer = MigrationTracer(SimpleSpanProcessor(exporter), Resource.create({}))
    world = world or World()
    tracer.seed(world)
    for event in events:
        evolve(world, event)
        tracer.staged(world, event, migration_of(world, event.payload))
        tracer.flush()
    spans = [
        (s.name, s.context.trace_id, s.context.span_id, s.parent.span_id if s.parent else 0,
         s.start_time or 0, s.end_time or 0)
        for s in exporter.get_finished_spans()
    ]  # fmt: skip
    return spans, world


def test_one_trace_per_migration_with_phases_and_commands_under_the_root() -> None:
    spans, _ = trace(completed_postcopy_log())
    migration_spans = [s for s in spans if s[1] == ids.trace_id("m-1")]
    (root,) = [s for s in migration_spans if s[0] == "migration vm-1"]
    assert root[2] == ids.root_span_id("m-1") and root[3] == 0
    names = [s[0] for s in migration_spans if s[3] == root[2]]
    assert {"phase preparing", "phase transferring", "phase handoff", "phase finishing"} <= set(
        names
    )
    assert "command resume-vm" in names and "command prepare-incoming" in names
    # Phases tile the root: each starts where the previous ended.
    phases = sorted((s for s in migration_spans if s[0].startswith("phase ")), key=lambda s: s[4])
    assert phases[0][4] == root[4] and phases[-1][5] == root[5]
    assert all(a[5] == b[4] for a, b in itertools.pairwise(phases))


@pytest.mark.parametrize("restart_at", [0.2, 0.4, 0.5, 0.6, 0.8, 0.95])
def test_a_restarted_coordinator_continues_the_same_trace(restart_at: float) -> None:
    log = completed_postcopy_log()
    whole, _ = trace(log)
    cut = int(len(log) * restart_at)
    before, world = trace(log[:cut])
    after, _ = trace(log[cut:], world)
    assert sorted(before + after) == sorted(whole)
