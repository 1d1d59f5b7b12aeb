"""hostd's durable state, in one SQLite file under the state dir.

- the generation, bumped on every start;
- the highest coordinator epoch seen, stored before any command of that epoch is acted on;
- the outbox: every observation, numbered per (generation, seq), kept until the coordinator
  acknowledges it as durable, re-sent after any reconnect or restart (it survives a hostd
  crash; see the synchronous setting for power cuts);
- executed commands: "started" is durable before a command acts and its result after, so a
  command id is executed at most once and repeats are answered with the stored result. A
  command a previous generation left "started" is "interrupted" from this start on: "started"
  then always means running in this process.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from whimbrel import files
from whimbrel.v1 import events_pb2, host_pb2
from whimbrel.walcheckpoint import BackgroundCheckpointer

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    generation INTEGER NOT NULL, seq INTEGER NOT NULL, time_us INTEGER NOT NULL,
    payload BLOB NOT NULL, PRIMARY KEY (generation, seq));
CREATE TABLE IF NOT EXISTS commands (
    command_id TEXT PRIMARY KEY, state TEXT NOT NULL, result BLOB);
"""


@dataclass(frozen=True)
class StoredCommand:
    state: str  # "started", "done" or "interrupted" (by a restart; no result)
    result: events_pb2.EventPayload | None


class HostStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _refuse_links(path)
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a commit reaches the OS before sqlite returns, so it survives a hostd crash
        # (kill -9) but not a power cut, which would take this host's QEMU processes with it.
        # Leases are fsynced by their own driver, and the epoch below is synced explicitly.
        self._db.execute("PRAGMA synchronous=NORMAL")
        # Checkpoints run beside hostd's loop (whimbrel.walcheckpoint), never inside the
        # statement that records an observation in a guest's pause.
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._db.executescript(SCHEMA)
        with self._tx():
            generation = self._meta("generation") + 1
            self._set_meta("generation", generation)
            self._db.execute("UPDATE commands SET state = 'interrupted' WHERE state = 'started'")
        self.generation = generation
        self.highest_epoch = self._meta("highest_epoch")
        row = self._db.execute(
            "SELECT MAX(seq) FROM outbox WHERE generation = ?", [generation]
        ).fetchone()
        self._seq = int(row[0] or 0)
        self.checkpointer = BackgroundCheckpointer(path)

    def _tx(self) -> sqlite3.Connection:
        return _Tx(self._db)  # type: ignore[return-value]

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
        return int(row[0]) if row else 0

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", [key, value])

    def raise_epoch(self, epoch: int) -> None:
        """Durably record a higher coordinator epoch (before acting on anything under it)."""
        if epoch > self.highest_epoch:
            # Fencing depends on this surviving anything, power cuts included.
            self._db.execute("PRAGMA synchronous=FULL")
            try:
                with self._tx():
                    self._set_meta("highest_epoch", epoch)
            finally:
                self._db.execute("PRAGMA synchronous=NORMAL")
            self.highest_epoch = epoch

    def record(self, payload: events_pb2.EventPayload, time_us: int) -> host_pb2.HostEvent:
        """Durably number and keep an observation until it is acknowledged."""
        self._seq += 1
        self._db.execute(
            "INSERT INTO outbox (generation, seq, time_us, payload) VALUES (?, ?, ?, ?)",
            [self.generation, self._seq, time_us, payload.SerializeToString(deterministic=True)],
        )
        return host_pb2.HostEvent(
            seq=self._seq, time_us=time_us, payload=payload, generation=self.generation
        )

    def acknowledge(self, generation: int, seq: int) -> None:
        self._db.execute("DELETE FROM outbox WHERE generation = ? AND seq <= ?", [generation, seq])

    def unacknowledged(self) -> list[host_pb2.HostEvent]:
        rows = self._db.execute(
            "SELECT generation, seq, time_us, payload FROM outbox ORDER BY generation, seq"
        ).fetchall()
        return [
            host_pb2.HostEvent(
                generation=g, seq=s, time_us=t, payload=events_pb2.EventPayload.FromString(p)
            )
            for g, s, t, p in rows
        ]

    def command(self, command_id: str) -> StoredCommand | None:
        row = self._db.execute(
            "SELECT state, result FROM commands WHERE command_id = ?", [command_id]
        ).fetchone()
        if row is None:
            return None
        result = events_pb2.EventPayload.FromString(row[1]) if row[1] else None
        return StoredCommand(row[0], result)

    def command_started(self, command_id: str) -> None:
        self._db.execute(
            "INSERT INTO commands (command_id, state) VALUES (?, 'started')", [command_id]
        )

    def command_done(self, command_id: str, result: events_pb2.EventPayload) -> None:
        self._db.execute(
            "UPDATE commands SET state = 'done', result = ? WHERE command_id = ?",
            [result.SerializeToString(deterministic=True), command_id],
        )

    def close(self) -> None:
        self.checkpointer.close()
        self._db.close()


def _refuse_links(path: Path) -> None:
    """SQLite opens its files by name, following symlinks: make sure the database exists as a
    regular file of ours (created relative to the state dir, O_NOFOLLOW), and that neither it
    nor its WAL and shared-memory files is a link planted to a file elsewhere."""
    dir_fd = files.open_dir(path.parent)
    try:
        os.close(files.open_in(dir_fd, path.name, os.O_RDWR | os.O_CREAT, 0o600))
        for name in (f"{path.name}-wal", f"{path.name}-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.close(files.open_in(dir_fd, name, os.O_RDONLY))
    finally:
        os.close(dir_fd)


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, *exc: object) -> None:
        self.db.execute("COMMIT" if exc[0] is None else "ROLLBACK")
