"""The QMP simulator's outgoing migration where timing decides: a cancel that crosses the
destination's "loaded" message must end as QEMU 7.2 ends it, cancelled with the source running,
or the simulator's source is left believing it stopped while hostd saw it run again (seed 8746
of the shell simulation: the next post-copy then reported no STOP, and stalled). And a switch to
post-copy with pause-before-switchover stops in pre-switchover first, as QEMU 7.2 does."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

from tools.qmpsim.cmdline import Launch
from tools.qmpsim.knobs import Clock, Knobs
from tools.qmpsim.link import Link
from tools.qmpsim.machine import Machine
from tools.qmpsim.settings import Settings
from tools.qmpsim.source import Source


def test_a_cancel_wins_over_a_load_that_crossed_it() -> None:
    """The source stopped for its switchover and is sending the rest when migrate_cancel comes;
    the destination's "loaded" was already read in the same turn of the loop. The source ends
    cancelled, never completed, runs again, and stops (STOP) for the next migration."""
    events: list[tuple[str, dict[str, Any] | None]] = []

    def emit(name: str, data: dict[str, Any] | None) -> None:
        events.append((name, data))

    async def scenario() -> None:
        launch, settings = Launch(), Settings()
        settings.set_capabilities([{"capability": "events", "state": True}])
        machine = Machine(launch, emit, lambda _reason: None)
        source = Source(launch, settings, machine, Knobs(), Clock(1.0), emit)
        machine.stop_for_migration()  # the switchover's stop
        source.status = "active"  # sending the rest, no pause-before-switchover
        source.cancel({})
        source._on_message({"t": "loaded"})  # read before the cancel finished
        await asyncio.sleep(0)  # the cancel finishes on the next turn, as in QEMU's thread
        statuses = [data["status"] for name, data in events if name == "MIGRATION" and data]
        assert statuses == ["cancelling", "cancelled"]
        assert source.status == "cancelled"
        assert machine.running
        events.clear()
        machine.stop_for_migration()
        assert ("STOP", None) in events

    asyncio.run(scenario())


def test_a_switch_to_post_copy_pauses_before_switchover_when_asked() -> None:
    """With pause-before-switchover (mode auto), QEMU 7.2's switch to post-copy stops the guest
    and waits in pre-switchover; migrate-continue takes it to postcopy-active, with no
    "device" between. The simulator went straight to postcopy-active, so the shell simulation
    never exercised the continue of a post-copy switch (where a lost answer fenced a healthy
    migration)."""
    events: list[tuple[str, dict[str, Any] | None]] = []

    def emit(name: str, data: dict[str, Any] | None) -> None:
        events.append((name, data))

    async def scenario() -> None:
        launch, settings = Launch(), Settings()
        settings.set_capabilities(
            [
                {"capability": "events", "state": True},
                {"capability": "postcopy-ram", "state": True},
                {"capability": "pause-before-switchover", "state": True},
            ]
        )
        machine = Machine(launch, emit, lambda _reason: None)
        source = Source(launch, settings, machine, Knobs(), Clock(1.0), emit)
        ours, theirs = socket.socketpair()  # the migration stream, its far end read here
        reader, writer = await asyncio.open_connection(sock=ours)
        source._link = Link(reader, writer, source._on_message, source._on_lost)
        destination, destination_writer = await asyncio.open_connection(sock=theirs)
        source.status = "active"
        source.start_postcopy({})
        await asyncio.sleep(0)
        assert [name if name != "MIGRATION" else data["status"] for name, data in events if data
                or name == "STOP"] == ["STOP", "pre-switchover"]  # fmt: skip
        assert not machine.running
        source.continue_({"state": "pre-switchover"})
        await asyncio.sleep(0)
        statuses = [data["status"] for name, data in events if name == "MIGRATION" and data]
        assert statuses == ["pre-switchover", "postcopy-active"]
        assert json.loads(await destination.readline()) == {"t": "postcopy"}
        source._halt()
        source._drop_link()
        destination_writer.close()

    asyncio.run(scenario())
