"""The SQLite event log, through sqlite-utils.

One writer thread owns the write connection. Appenders queue batches; the writer takes everything
queued (group commit), and in one IMMEDIATE transaction checks that its epoch is still the
current one, drops host events it already holds, assigns gap-free seqs, links the hash chain,
inserts, and commits with WAL + synchronous=FULL. Only then are the appenders' futures resolved:
an acknowledged event is durable. Append-only is enforced by triggers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import sqlite_utils

from coordinator.log.canonical import SEQ_EPOCH
from coordinator.log.chain import ZERO_HASH
from coordinator.log.records import (
    AppendResult,
    LogLocked,
    Mark,
    PendingEvent,
    StaleEpoch,
    StoredEvent,
    StoreError,
    StoreFailure,
    materialize,
)
from whimbrel.walcheckpoint import BackgroundCheckpointer

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# Upper bound on events per transaction, so one commit never holds the writer for long.
MAX_BATCH_EVENTS = 2000
COLUMNS = (
    "seq, stream, type, epoch, time_us, origin_host, origin_generation, origin_seq, "
    "migration_id, vm, host, payload, prev_hash, hash"
)
READ_COLUMNS = (
    "seq, stream, type, epoch, time_us, payload, origin_host, origin_generation, origin_seq, "
    "prev_hash, hash"
)
INSERT = f"INSERT INTO events ({COLUMNS}) VALUES ({', '.join('?' * 14)})"
# The writer's insert: what the writer assigns first, then PendingEvent.row (same table, same
# values; only the order of the column list differs).
STORE_INSERT = (
    "INSERT INTO events (seq, epoch, prev_hash, hash, stream, type, time_us, origin_host, "
    "origin_generation, origin_seq, migration_id, vm, host, payload) "
    f"VALUES ({', '.join('?' * 14)})"
)

# Rows per insert statement, largest first. sqlite3 releases the GIL around each statement
# step and takes it back after, so executemany hands the GIL over once per row: with the event
# loop busy each handover waits, and the writer and the loop convoy. A statement of many rows
# steps once. The largest size is cut to what the SQLite linked in takes (999 parameters
# before 3.32, 32766 since).
_ROWS_PER_INSERT = (256, 64, 16, 4, 1)
_COLUMNS_PER_ROW = 14
_ROW_PLACEHOLDERS = f", ({', '.join('?' * _COLUMNS_PER_ROW)})"


def insert_rows(conn: sqlite3.Connection, values: list[Any]) -> None:
    """Insert rows given as one flat list of values, STORE_INSERT's columns row after row, in
    few statement steps (the statements, one per size, stay in sqlite3's cache)."""
    most = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // _COLUMNS_PER_ROW
    rows, at = len(values) // _COLUMNS_PER_ROW, 0
    for size in _ROWS_PER_INSERT:
        if size > most and size > 1:  # one row per statement always: no row is ever left out
            continue
        statement, width = _insert(size), size * _COLUMNS_PER_ROW
        while rows >= size:
            conn.execute(statement, values[at : at + width])
            at += width
            rows -= size


@functools.cache
def _insert(rows: int) -> str:
    return STORE_INSERT + _ROW_PLACEHOLDERS * (rows - 1)


# Stream prefix -> the indexed column that holds the stream's name for every event in it.
_STREAM_TAGS = {"migration": "migration_id", "vm": "vm", "host": "host"}

_TRIGGERS = """
CREATE TRIGGER IF NOT EXISTS events_append_only_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'events are append-only: UPDATE is not allowed'); END;
CREATE TRIGGER IF NOT EXISTS events_append_only_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'events are append-only: DELETE is not allowed'); END;
"""


# Only another coordinator would hold the write lock: wait this long, then report it (LogLocked).
BUSY_TIMEOUT_S = 5.0


def connect(path: str | Path) -> sqlite3.Connection:
    conn = sqlite3.connect(
        str(path), isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S
    )
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    # Checkpoints run beside the writer (whimbrel.walcheckpoint), never inside a commit.
    conn.execute("PRAGMA wal_autocheckpoint=0")
    return conn


def keep_private(path: Path) -> None:
    """The log holds every VM's spec and every host's commands: readable by its owner only.
    A new database is created 0600 before SQLite opens it (SQLite gives its -wal and -shm files
    the database's mode); an existing one loses what it gave to others than its owner and group."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    for name in (path.name, f"{path.name}-wal", f"{path.name}-shm"):
        with contextlib.suppress(FileNotFoundError):
            mode = (path.parent / name).stat().st_mode & 0o7777
            if mode & 0o007:
                os.chmod(path.parent / name, mode & ~0o007)


def _schema_complete(db: sqlite_utils.Database) -> bool:
    names = {r[0] for r in db.execute("SELECT name FROM sqlite_master").fetchall()}
    needed = {"meta", "events", "events_origin", "events_append_only_update",
              "events_append_only_delete"}  # fmt: skip
    return needed <= names


def create_schema(db: sqlite_utils.Database) -> None:
    """Create the tables, indexes and triggers (idempotent). Writes nothing when the schema is
    already there: opening a log must not need the write lock (a hung coordinator may hold it
    while a standby starts)."""
    if _schema_complete(db):
        return
    if "meta" not in db.table_names():
        db.table("meta").create({"key": str, "value": int}, pk="key")
    if "events" not in db.table_names():
        db.table("events").create(
            {
                "seq": int,
                "stream": str,
                "type": str,
                "epoch": int,
                "time_us": int,
                "origin_host": str,
                "origin_generation": int,
                "origin_seq": int,
                "migration_id": str,
                "vm": str,
                "host": str,
                "payload": bytes,
                "prev_hash": bytes,
                "hash": bytes,
            },
            pk="seq",
            not_null={"stream", "type", "epoch", "time_us", "payload", "prev_hash", "hash"},
        )
        events = db.table("events")
        # No index on stream: it would cost a quarter of the append rate, and stream reads use
        # the tag columns instead (see read_rows).
        for columns in (["type"], ["migration_id"], ["vm"], ["host"], ["time_us"]):
            events.create_index(columns)
        # Host events are unique per (host, generation, seq): retries can never store twice.
        db.execute(
            "CREATE UNIQUE INDEX events_origin ON events (origin_host, origin_generation, "
            "origin_seq) WHERE origin_seq > 0"
        )
    db.conn.executescript(_TRIGGERS)
    db.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", [SCHEMA_VERSION]
    )
    db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', 0)")


class _Batch:
    """Events submitted together, and how to tell their submitter the outcome.

    Threads wait on a concurrent Future; asyncio callers get an asyncio future that the writer
    settles from the loop's thread, all of one commit in a single call_soon_threadsafe, which
    keeps the cost per acknowledged event small.
    """

    __slots__ = ("events", "future", "loop", "marks_only", "waiter")

    def __init__(
        self,
        events: Sequence[PendingEvent],
        loop: asyncio.AbstractEventLoop | None = None,
        marks_only: bool = False,
        waiter: asyncio.Future[Any] | None = None,
    ) -> None:
        self.events = events
        self.loop = loop
        self.marks_only = marks_only
        self.waiter = waiter
        self.future: Future[AppendResult] | None = None
        if loop is None:
            self.future = Future()
        elif waiter is None:
            self.waiter = loop.create_future()


class SqliteEventStore:
    """EventStore on one SQLite file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        keep_private(self.path)
        self._conn = connect(self.path)
        self.db = sqlite_utils.Database(self._conn)
        with self._conn:
            create_schema(self.db)
        version = self._meta("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreFailure(f"{self.path}: schema version {version}, expected {SCHEMA_VERSION}")
        self._epoch = 0
        self._head_seq, self._head_hash = self._read_head()
        self._high_water: dict[tuple[str, int], int] = {}
        self._queue: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self._committed = threading.Condition()
        self._fenced: StoreError | None = None
        self.batches_committed = 0
        self.events_committed = 0
        self._writer = threading.Thread(
            target=self._write_loop, name="whimbrel-log-writer", daemon=True
        )
        self._writer.start()
        self.checkpointer = BackgroundCheckpointer(self.path)

    # --- public -------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._epoch

    def begin_epoch(self, first: Callable[[int], PendingEvent]) -> int:
        """Bump the epoch and append `first(epoch)` atomically, before anything else."""
        future: Future[int] = Future()
        self._queue.put(_EpochBatch(first, future))  # type: ignore[arg-type]
        return future.result()

    def submit(self, events: Sequence[PendingEvent]) -> Future[AppendResult]:
        batch = _Batch(events)
        assert batch.future is not None
        if self._fenced is not None:
            batch.future.set_exception(self._fenced)
        elif not events:
            batch.future.set_result([])
        else:
            self._queue.put(batch)
        return batch.future

    async def append_async(self, events: Sequence[PendingEvent]) -> AppendResult:
        """Append from asyncio and wait until committed."""
        if self._fenced is not None:
            raise self._fenced
        if not events:
            return []
        batch = _Batch(events, asyncio.get_running_loop())
        assert batch.waiter is not None
        self._queue.put(batch)
        result: AppendResult = await batch.waiter
        return result

    async def append_marks(self, events: Sequence[PendingEvent]) -> tuple[int, list[Mark]]:
        """Like append_async, but answers (epoch, marks) and builds no StoredEvents: for a
        caller that keeps its own copy of what it appended, as the coordinator does."""
        return await self.submit_marks(events)

    def submit_marks(self, events: Sequence[PendingEvent]) -> Awaitable[tuple[int, list[Mark]]]:
        """Queue an append now and answer an awaitable of its (epoch, marks), so a caller can
        queue its next append before this one has committed (they commit in queue order)."""
        if self._fenced is not None:
            raise self._fenced
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[tuple[int, list[Mark]]] = loop.create_future()
        if not events:
            waiter.set_result((self._epoch, []))
        else:
            self._queue.put(_Batch(events, loop, marks_only=True, waiter=waiter))
        return waiter

    def append(self, events: Sequence[PendingEvent]) -> AppendResult:
        return self.submit(events).result()

    def read(
        self, from_seq: int = 1, stream: str | None = None, limit: int = 0
    ) -> Iterator[StoredEvent]:
        for row in self.read_rows(from_seq, stream, limit):
            yield StoredEvent(*row)

    def read_rows(
        self, from_seq: int = 1, stream: str | None = None, limit: int = 0, columns: str = ""
    ) -> Iterator[tuple[Any, ...]]:
        """Raw rows (READ_COLUMNS order unless `columns` is given), fetched in chunks."""
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        try:
            sql = f"SELECT {columns or READ_COLUMNS} FROM events WHERE seq >= ?"
            args: list[Any] = [from_seq]
            if stream:
                sql += " AND stream = ?"
                args.append(stream)
                prefix, _, name = stream.partition("/")
                tag = _STREAM_TAGS.get(prefix)
                if tag and name:
                    sql += f" AND {tag} = ?"
                    args.append(name)
            sql += " ORDER BY seq"
            if limit:
                sql += " LIMIT ?"
                args.append(limit)
            cursor = conn.execute(sql, args)
            while rows := cursor.fetchmany(4096):
                yield from rows
        finally:
            conn.close()

    def head(self) -> tuple[int, bytes]:
        return self._head_seq, self._head_hash

    def host_high_water(self, host: str, generation: int) -> int:
        row = self._conn.execute(
            "SELECT MAX(origin_seq) FROM events WHERE origin_host = ? AND origin_generation = ? "
            "AND origin_seq > 0",  # so the partial index events_origin serves it
            [host, generation],
        ).fetchone()
        return int(row[0] or 0)

    def wait_past(self, seq: int, timeout: float) -> bool:
        with self._committed:
            return bool(self._committed.wait_for(lambda: self._head_seq > seq, timeout))

    def close(self) -> None:
        self._queue.put(None)
        self._writer.join()
        self.checkpointer.close()
        self._conn.close()

    # --- writer thread ------------------------------------------------------------------------

    def _meta(self, key: str) -> int:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
        return int(row[0]) if row else 0

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, _EpochBatch):
                self._write_epoch(item)
                continue
            batches = [item]
            count = len(item.events)
            while count < MAX_BATCH_EVENTS:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None or isinstance(more, _EpochBatch):
                    self._queue.put(more)  # handled after this group
                    break
                batches.append(more)
                count += len(more.events)
            self._write_group(batches)

    def _read_head(self) -> tuple[int, bytes]:
        row = self._conn.execute(
            "SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        return (int(row[0]), bytes(row[1])) if row else (0, ZERO_HASH)

    def _write_group(self, batches: list[_Batch], new_epoch: _EpochBatch | None = None) -> None:
        if self._fenced is not None and new_epoch is None:
            _settle(batches, self._fenced, epoch=0)
            return
        seq, prev, epoch = self._head_seq, self._head_hash, self._epoch
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            current = self._meta("epoch")
            if new_epoch is not None:
                # The new epoch and its first event commit together, before anything else,
                # after whatever the previous writer committed since this store opened (it
                # may have held the write lock until now).
                seq, prev = self._read_head()
                epoch = current + 1
                self._conn.execute("UPDATE meta SET value = ? WHERE key = 'epoch'", [epoch])
                batches = [_Batch([new_epoch.first(epoch)])]
            elif current != epoch:
                raise StaleEpoch(epoch, current)
            values: list[Any] = []  # the rows' values, row after row (see insert_rows)
            results: list[list[Mark]] = []
            high_water = dict(self._high_water)
            # Hot loop: only what needs the chain's order happens here; body and row were
            # computed by the submitter, StoredEvents are built by whoever waits.
            # The digest is chain.link's, spelled out: one call per event less.
            sha256, seq_epoch, add_values = hashlib.sha256, SEQ_EPOCH.pack, values.extend
            for batch in batches:
                marks: list[Mark] = []
                add_mark = marks.append
                for e in batch.events:
                    if e.origin_seq:  # seq 0: unnumbered host facts (hello snapshots)
                        key = (e.origin_host, e.origin_generation)
                        known = high_water.get(key)
                        if known is None:
                            known = self.host_high_water(*key)
                        if e.origin_seq <= known:
                            add_mark(None)
                            high_water[key] = known
                            continue
                        high_water[key] = e.origin_seq
                    seq += 1
                    digest = sha256(b"".join((prev, seq_epoch(seq, epoch), e.body))).digest()
                    add_values((seq, epoch, prev, digest))
                    add_values(e.row)
                    add_mark((seq, prev, digest))
                    prev = digest
                results.append(marks)
            insert_rows(self._conn, values)
            self._conn.execute("COMMIT")
        except StaleEpoch as err:
            self._rollback()
            self._fenced = err
            log.error("log fenced: %s", err)
            _settle(batches, err, epoch)
            return
        except sqlite3.Error as err:
            self._rollback()
            failure = _failure(err)
            # Appends queued behind this one may rest on it (a decision on a fact that did not
            # commit): every later one fails too, until a new epoch starts over.
            self._fenced = failure
            log.error("%s", failure)
            log.debug("append failure", exc_info=True)
            _settle(batches, failure, epoch)
            if new_epoch is not None:
                new_epoch.future.set_exception(failure)
            return
        with self._committed:
            self._epoch, self._fenced = epoch, None
            self._head_seq, self._head_hash = seq, prev
            self._high_water = high_water
            self.batches_committed += 1
            self.events_committed += len(values) // _COLUMNS_PER_ROW
            self._committed.notify_all()
        _settle(batches, results, epoch)

    def _write_epoch(self, item: _EpochBatch) -> None:
        self._high_water.clear()
        self._write_group([], new_epoch=item)
        if not item.future.done():
            item.future.set_result(self._epoch)

    def _rollback(self) -> None:
        try:
            self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            log.debug("rollback failed", exc_info=True)


def _failure(err: sqlite3.Error) -> StoreFailure:
    """The store's error for SQLite's, typed here, at the transaction's edge."""
    if getattr(err, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return LogLocked(f"append failed: the log is locked by another writer ({err})")
    return StoreFailure(f"append failed: {err}")


def _settle(batches: list[_Batch], outcome: list[list[Mark]] | StoreError, epoch: int) -> None:
    """Resolve every batch of one commit; asyncio waiters with one wake-up per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Batch, Any]]] = {}
    for i, batch in enumerate(batches):
        value: Any = outcome if isinstance(outcome, StoreError) else outcome[i]
        if batch.future is not None:
            if isinstance(value, StoreError):
                batch.future.set_exception(value)
            else:
                batch.future.set_result(materialize(batch.events, value, epoch))
        elif batch.loop is not None:
            by_loop.setdefault(batch.loop, []).append((batch, value))
    for loop, waiting in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, waiting, epoch)
        except RuntimeError:
            log.debug("event loop closed before its appends were acknowledged")


def _resolve(waiting: list[tuple[_Batch, Any]], epoch: int) -> None:
    """In the waiter's event loop: build the stored events and wake the appenders."""
    for batch, value in waiting:
        waiter = batch.waiter
        if waiter is None or waiter.done():
            continue
        if isinstance(value, StoreError):
            waiter.set_exception(value)
        elif batch.marks_only:
            waiter.set_result((epoch, value))
        else:
            waiter.set_result(materialize(batch.events, value, epoch))


class _EpochBatch:
    __slots__ = ("first", "future")

    def __init__(self, first: Callable[[int], PendingEvent], future: Future[int]) -> None:
        self.first = first
        self.future = future
