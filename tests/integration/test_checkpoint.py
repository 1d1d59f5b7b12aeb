"""Checkpoints: a restart from a checkpoint plus the tail of the log rebuilds exactly the world a
full replay does; any checkpoint that does not fit the log or the code is ignored; the running
coordinator writes them from a forked child without stopping."""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import stat
from pathlib import Path

import pytest

from coordinator import checkpoint, codec
from coordinator.app import Coordinator
from coordinator.core import World, evolve
from coordinator.core import inputs as I
from coordinator.log import SqliteEventStore
from coordinator.replay import replay
from tools.sim import Driver, SimHosts, migration, running_vm, store_log
from whimbrel.files import write_atomically
from whimbrel.v1 import common_pb2, events_pb2


def log_of_migrations(path: Path, count: int = 3, start_us: int = 0) -> SqliteEventStore:
    """A real SQLite log of `count` completed post-copy migrations back and forth, plus one
    left open mid-transfer."""
    driver = Driver()
    driver.now_us += start_us
    driver.connect("host-a", "host-b")
    running_vm(driver)
    hosts = SimHosts()
    hosts.leases["vm-1"] = ("host-a", 1)
    for n in range(count):
        dest = ("host-b", "host-a")[n % 2]
        policy = events_pb2.MigrationPolicy()
        driver.request(I.StartMigration(f"m-{n}", "vm-1", dest, 2, policy, driver.now_us))
        driver.run(f"m-{n}", hosts)
        driver.observe(*[migration(h, "vm-1", "completed") for h in ("host-a", "host-b")])
        driver.run(f"m-{n}", hosts)
    hosts.converge_after_passes = 0
    driver.request(I.StartMigration("open", "vm-1", "host-a" if count % 2 else "host-b", 1,
                                    events_pb2.MigrationPolicy(), driver.now_us))  # fmt: skip
    driver.run("open", hosts)
    return store_log(driver.log, path)


def world_at(store: SqliteEventStore, seq: int) -> World:
    world = World()
    for stored in store.read():
        if stored.seq > seq:
            break
        evolve(world, codec.from_stored(stored))
    return world


def checkpoint_at(store: SqliteEventStore, path: Path, seq: int) -> None:
    (at,) = store.read(from_seq=seq, limit=1)
    checkpoint.write(path, world_at(store, seq), seq, at.hash)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 1.0])
def test_checkpoint_plus_tail_is_the_full_replay(tmp_path: Path, fraction: float) -> None:
    store = log_of_migrations(tmp_path / "log.db")
    head, _ = store.head()
    path = checkpoint.path_for(tmp_path / "log.db")
    checkpoint_at(store, path, max(1, int(head * fraction)))
    assert checkpoint.load(path, store) is not None
    assert replay(store, path) == replay(store)
    assert "open" in replay(store, path).open_migrations
    store.close()


def test_a_checkpoint_that_does_not_fit_is_ignored(tmp_path: Path) -> None:
    store = log_of_migrations(tmp_path / "log.db")
    path = checkpoint.path_for(tmp_path / "log.db")
    checkpoint_at(store, path, 40)
    good = path.read_bytes()
    # Another log (or a rewritten one): the hash at the seq differs.
    other = log_of_migrations(tmp_path / "other.db", count=2, start_us=1)
    assert checkpoint.load(path, other) is None
    assert replay(other, path) == replay(other)
    # Torn, foreign, or from other code.
    path.write_bytes(good[: len(good) // 2])
    assert checkpoint.load(path, store) is None
    path.write_bytes(b"not a checkpoint")
    assert checkpoint.load(path, store) is None
    fmt_at = len(b"WHIMBREL-CHECKPOINT\n") + 8 + 32
    path.write_bytes(good[:fmt_at] + bytes(32) + good[fmt_at + 32 :])
    assert checkpoint.load(path, store) is None
    assert replay(store, path) == replay(store)
    store.close()
    other.close()


async def test_the_coordinator_writes_checkpoints_from_a_forked_child(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    store = log_of_migrations(db)
    path = checkpoint.path_for(db)
    app = Coordinator(store, checkpoint_path=path, checkpoint_every=5)
    await app.start()
    for n in range(8):  # requests that append events: past the interval
        spec = common_pb2.VmSpec(name=f"extra-{n}", memory_mib=64, vcpus=1)
        await app.request(I.DefineVm(spec, app.clock()))
    async with asyncio.timeout(30):
        while not app.checkpointer.written:
            await app.wait_for_change(0.05)
    await app.close()
    loaded = checkpoint.load(path, store)
    assert loaded is not None and loaded == world_at(store, loaded.last_seq)
    restarted = Coordinator(store, checkpoint_path=path)
    await restarted.start()
    full = replay(store)
    assert restarted.world == full
    await restarted.close()
    await asyncio.to_thread(store.close)


class _MakesAFile:
    """What a hostile pickle does when loaded: here, create a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (Path.touch, (self.path,))


def test_a_crafted_pickle_checkpoint_is_ignored_and_never_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A pickle planted as the checkpoint, with a header that fits the log and the code, is not
    executed: it is ignored with a warning and the full replay gives the world."""
    store = log_of_migrations(tmp_path / "log.db")
    head, head_hash = store.head()
    path = checkpoint.path_for(tmp_path / "log.db")
    planted = tmp_path / "pwned"
    header = checkpoint._MAGIC + checkpoint._HEADER.pack(head, head_hash, checkpoint.FORMAT)
    path.write_bytes(header + pickle.dumps(_MakesAFile(planted)))
    with caplog.at_level(logging.WARNING, logger="coordinator.checkpoint"):
        assert checkpoint.load(path, store) is None
        assert replay(store, path) == replay(store)
    assert not planted.exists()
    assert any("does not load" in r.getMessage() for r in caplog.records)
    # JSON of the wrong shape or types: ignored too.
    for body in (b"[]", b'{"commands": [], "world": {"epoch": "1"}}', b'{"commands": [1]}'):
        path.write_bytes(header + body)
        assert checkpoint.load(path, store) is None
    store.close()


def test_a_loaded_checkpoint_shares_commands_as_the_folded_world_does(tmp_path: Path) -> None:
    """A migration's `latest` and `commands` hold the same Command objects after a load (evolve
    updates one, decide reads the other), and folding on from it matches the full replay."""
    store = log_of_migrations(tmp_path / "log.db")
    head, _ = store.head()
    path = checkpoint.path_for(tmp_path / "log.db")
    checkpoint_at(store, path, head - 5)
    loaded = checkpoint.load(path, store)
    assert loaded is not None
    opened = [m for m in loaded.migrations.values() if m.latest]
    assert opened
    for m in opened:
        for command in m.latest.values():
            assert m.commands[command.command_id] is command
    assert replay(store, path) == replay(store)
    store.close()


def test_checkpoint_and_log_files_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    """Even under a permissive umask the checkpoint is written 0600 through an exclusively
    created temporary file, a new log is 0600 (its WAL too), and an existing world-readable
    log loses what others could do with it."""
    old_umask = os.umask(0)
    try:
        store = log_of_migrations(tmp_path / "log.db")
        path = checkpoint.path_for(tmp_path / "log.db")
        checkpoint_at(store, path, 10)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        for name in ("log.db", "log.db-wal"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
        store.close()
        # A symlink planted at the temporary name is not written through.
        target = tmp_path / "elsewhere"
        target.write_bytes(b"untouched")
        trap = tmp_path / "trap.tmp"
        trap.symlink_to(target)
        with pytest.raises(FileExistsError):
            write_atomically(path, b"data", tmp=trap)
        assert target.read_bytes() == b"untouched"
        old = tmp_path / "old.db"
        old.touch(mode=0o666)
        SqliteEventStore(old).close()
        assert stat.S_IMODE(old.stat().st_mode) == 0o660
    finally:
        os.umask(old_umask)
