"""A migration's switchover window (`MigrationState.in_switchover`, what the read gate shuts
on): it opens with the transfer once post-copy is requested, or at the source's stop in
pre-copy, holds the destination's cont, and closes only with the destination seen running."""

from __future__ import annotations

import pytest

from coordinator.core import Event, Phase, World, evolve
from coordinator.core import inputs as I
from tests.unit.helpers import fresh
from tools.sim import migration
from whimbrel.v1 import common_pb2 as C
from whimbrel.v1 import events_pb2 as E


def _label(event: Event) -> str:
    p = event.payload
    if isinstance(p, E.QmpEventReceived):
        status = '"status": "' in p.data_json and p.data_json.split('"status": "')[1].split('"')[0]
        return f"{p.event}{':' + status if status else ''}@{event.origin_host}"
    if isinstance(p, E.CommandIssued):
        return f"{E.CommandKind.Name(p.kind).removeprefix('COMMAND_KIND_')}@{p.host_id}"
    return event.type


def window(mode: int) -> list[tuple[str, bool, Phase]]:
    """Each event of one migration in `mode`, with whether the window is open after it and
    the migration's phase."""
    driver, hosts = fresh()
    driver.request(
        I.StartMigration("m-1", "vm-1", "host-b", mode, E.MigrationPolicy(), driver.now_us)
    )
    driver.run("m-1", hosts)
    if mode == C.MIGRATION_MODE_POSTCOPY:
        # The simulation leaves the end of a post-copy transfer to the test.
        driver.observe(*(migration(h, "vm-1", "completed") for h in ("host-a", "host-b")))
        driver.run("m-1", hosts)
    world = World()
    out: list[tuple[str, bool, Phase]] = []
    for event in driver.log:
        evolve(world, event)
        m = world.migrations.get("m-1")
        if m is not None:
            out.append((_label(event), m.in_switchover, m.phase))
    assert world.migrations["m-1"].phase.terminal
    return out


def _opens_and_closes(steps: list[tuple[str, bool, Phase]]) -> tuple[int, int]:
    """The index of the event that opened the window and of the one that closed it."""
    flags = [inside for _, inside, _ in steps]
    first = flags.index(True)
    closed = len(flags) - flags[::-1].index(True)
    assert all(flags[first:closed]), f"the window opened more than once: {steps}"
    return first, closed


@pytest.mark.parametrize("mode", [C.MIGRATION_MODE_PRECOPY, C.MIGRATION_MODE_POSTCOPY])
def test_the_window_holds_the_cont_and_closes_with_the_destination_running(mode: int) -> None:
    """The window opens with the transfer once post-copy is requested (QEMU stops the source
    within a pass of it), or in pre-copy with the switchover phase (the source stopped to
    switch over); the destination's cont is issued inside it; it closes with the
    destination's RESUME, not with the cont's intent."""
    steps = window(mode)
    first, closed = _opens_and_closes(steps)
    inside = [label for label, _, _ in steps[first:closed]]
    assert "RESUME_VM@host-b" in inside
    assert steps[closed][0] == "RESUME@host-b"
    if mode == C.MIGRATION_MODE_POSTCOPY:
        # Mode postcopy's start carries the switch (START_MIGRATION.start_postcopy).
        assert steps[first][0] == "START_MIGRATION@host-a"
        assert steps[first - 1][0] == "PostcopyRequested"
    else:
        assert steps[first][2] == Phase.SWITCHOVER and steps[first - 1][2] == Phase.TRANSFERRING
        assert "STOP@host-a" in [label for label, _, _ in steps[: first + 1]]
