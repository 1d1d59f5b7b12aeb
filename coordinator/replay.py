"""Replay: the world the log describes, from a usable checkpoint plus the events after it, or by
folding the whole log."""

from __future__ import annotations

import gc
from collections.abc import Iterable
from pathlib import Path

from coordinator import checkpoint, codec
from coordinator.core import World
from coordinator.core.evolve import Fact, fold
from coordinator.log import EventStore


def replay(store: EventStore, checkpoint_path: Path | None = None) -> World:
    """The world the log describes (fast path for SQLite's raw rows)."""
    world = checkpoint.load(checkpoint_path, store) if checkpoint_path is not None else None
    from_seq = world.last_seq + 1 if world is not None else 1
    world = world or World()
    read_rows = getattr(store, "read_rows", None)
    if read_rows is not None:
        rows = read_rows(from_seq=from_seq, columns=codec.REPLAY_COLUMNS)
        facts: Iterable[Fact] = codec.decode_for_replay(rows)
    else:
        facts = (
            (e.seq, e.type, e.time_us, e.origin_host, e.payload)
            for e in map(codec.from_stored, store.read(from_seq=from_seq))
        )
    # Replay allocates millions of objects that all live on; the cyclic collector would walk
    # them over and over while they are being built. Nothing here makes garbage cycles.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        fold(world, facts)
    finally:
        if gc_was_enabled:
            gc.enable()
    return world
