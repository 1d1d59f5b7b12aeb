"""Reading a log file without trusting it.

The file is opened read-only by its own path; its events table must have exactly the log's
columns (none generated or hidden, no virtual table); no value may be larger than any event the
coordinator writes; each row's columns must hold the types and ranges the log stores before
anything hashes, decodes or folds it.

    Unreadable      the file is not a readable Whimbrel log (the tool exits 2)
     └ BadEvent     one event of it is malformed, does not decode or cannot be folded (its seq)
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

from coordinator import codec
from coordinator.core import Event, World, evolve
from coordinator.limits import MIB
from coordinator.log import StoredEvent
from coordinator.log.sqlite import COLUMNS, READ_COLUMNS

__all__ = [
    "MAX_VALUE_BYTES",
    "BadEvent",
    "Unreadable",
    "checked_events",
    "decode",
    "fold",
    "head",
    "malformed",
    "open_log",
    "read_events",
    "stored_events",
]

# No event is larger than the coordinator's message bounds (by default 4 MiB received, 16 MiB
# sent: a larger one could not reach the log nor be read from it). A bigger value is a crafted
# file; the cap keeps reading one from taking memory.
MAX_VALUE_BYTES = 16 * MIB
HASH_BYTES = 32
EVENT_COLUMNS = tuple(name.strip() for name in COLUMNS.split(","))
_U64 = (0, 2**64 - 1)
_I64 = (-(2**63), 2**63 - 1)
# The ranges of the canonical encoding (docs/log-format.md): u64 but for time_us.
_INTEGERS = {
    "seq": _U64,
    "epoch": _U64,
    "time_us": _I64,
    "origin_generation": _U64,
    "origin_seq": _U64,
}
_TEXTS = ("stream", "type", "origin_host")
_BLOBS = ("payload", "prev_hash", "hash")


class Unreadable(Exception):
    """The file is not a readable Whimbrel log."""


class BadEvent(Unreadable):
    """One event cannot be read: malformed, undecodable, or beyond what the core can fold."""

    def __init__(self, seq: object, problem: str) -> None:
        super().__init__(f"seq {seq}: {problem}")
        self.seq = seq
        self.problem = problem


def _text(data: bytes) -> str:
    # Invalid UTF-8 stays readable (and is reported at its row) instead of failing the query.
    return data.decode("utf-8", "surrogateescape")


def open_log(path: Path) -> sqlite3.Connection:
    """A read-only connection to the log at `path`, its events table of the log's shape."""
    if not path.is_file():
        raise Unreadable(f"{path}: no such file")
    # An encoded URI: a '#', '?' or '%' in the name must not make SQLite open another file.
    uri = path.resolve().as_uri() + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True)
    except sqlite3.DatabaseError as err:
        raise Unreadable(f"{path}: {err}") from err
    try:
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
        conn.text_factory = _text
        _check_shape(conn, path)
    except sqlite3.DatabaseError as err:
        conn.close()
        raise Unreadable(f"{path}: {err}") from err
    except Unreadable:
        conn.close()
        raise
    return conn


def _check_shape(conn: sqlite3.Connection, path: Path) -> None:
    """The events table holds exactly the log's columns: a generated column (say a
    `zeroblob` of gigabytes) would make each row read cost what it pleases."""
    row = conn.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'events'"
    ).fetchone()
    if row is None:
        raise Unreadable(f"{path}: not a Whimbrel log (no events table)")
    if " ".join(str(row[0]).split()[:2]).upper() == "CREATE VIRTUAL":
        raise Unreadable(f"{path}: events is a virtual table, not the log's")
    columns = conn.execute("PRAGMA table_xinfo(events)").fetchall()
    for _, name, _, _, _, _, hidden in columns:
        if name not in EVENT_COLUMNS:
            raise Unreadable(f"{path}: events has a column the log has not: {name!r}")
        if hidden:
            raise Unreadable(f"{path}: events column {name} is generated or hidden")
    missing = [name for name in EVENT_COLUMNS if name not in {c[1] for c in columns}]
    if missing:
        raise Unreadable(f"{path}: events lacks the column {missing[0]}")


def stored_events(conn: sqlite3.Connection) -> Iterator[StoredEvent]:
    """Every row in seq order, as stored (unchecked: see `malformed`)."""
    last: object = 0
    try:
        for row in conn.execute(f"SELECT {READ_COLUMNS} FROM events ORDER BY seq"):
            stored = StoredEvent(*row)
            last = stored.seq
            yield stored
    except sqlite3.DatabaseError as err:
        raise Unreadable(f"{_unread(conn, last)} cannot be read: {err}") from err


def _unread(conn: sqlite3.Connection, last: object) -> str:
    """Which row failed, after the last one read: the cursor reads a row ahead, so the one
    after `last` may be whole and the failure the next one's. Probed one row at a time."""
    after = last
    try:
        for _ in range(2):
            row = conn.execute(
                "SELECT seq FROM events WHERE seq > ? ORDER BY seq LIMIT 1", (after,)
            ).fetchone()
            if row is None:
                break
            try:
                conn.execute(f"SELECT {READ_COLUMNS} FROM events WHERE seq = ?", row).fetchone()
            except sqlite3.DatabaseError:
                return f"seq {row[0]}"
            after = row[0]
    except sqlite3.DatabaseError:
        pass
    return f"the row after seq {last}"


def head(conn: sqlite3.Connection) -> StoredEvent | None:
    """The last row, checked; None for an empty log."""
    try:
        row = conn.execute(
            f"SELECT {READ_COLUMNS} FROM events ORDER BY seq DESC LIMIT 1"
        ).fetchone()
    except sqlite3.DatabaseError as err:
        raise Unreadable(f"the last row cannot be read: {err}") from err
    if row is None:
        return None
    stored = StoredEvent(*row)
    problem = malformed(stored)
    if problem:
        raise BadEvent(stored.seq, f"malformed row: {problem}")
    return stored


def _shown(value: object) -> str:
    kind = {str: "text", float: "a real", bytes: "a blob", int: "an integer"}.get(type(value))
    if kind is None:
        return "NULL" if value is None else type(value).__name__
    if isinstance(value, bytes):
        return f"{kind} of {len(value)} bytes"
    return f"{kind} {value!r:.40}"


def malformed(e: StoredEvent) -> str:
    """What is wrong with the types or ranges of a row's columns ("" for nothing): plain SQL
    stores any value in any column, and such a row can be neither hashed nor decoded."""
    for name, (low, high) in _INTEGERS.items():
        value = getattr(e, name)
        if type(value) is not int:
            return f"{name} holds {_shown(value)}, not an integer"
        if not low <= value <= high:
            return f"{name} {value} is out of range"
    for name in _TEXTS:
        value = getattr(e, name)
        if not isinstance(value, str):
            return f"{name} holds {_shown(value)}, not text"
        try:
            value.encode()
        except UnicodeEncodeError:
            return f"{name} is not valid UTF-8"
    for name in _BLOBS:
        value = getattr(e, name)
        if not isinstance(value, bytes):
            return f"{name} holds {_shown(value)}, not a blob"
        if name != "payload" and len(value) != HASH_BYTES:
            return f"{name} holds {len(value)} bytes, not {HASH_BYTES}"
    return ""


def decode(stored: StoredEvent) -> Event:
    """The event of a row that `malformed` passed."""
    try:
        return codec.from_stored(stored)
    except KeyError:
        raise BadEvent(stored.seq, f"unknown event type {stored.type!r}") from None
    # protobuf raises DecodeError, but its runtimes (upb, C++, pure Python) differ in what
    # else a hostile payload can make them raise: any of it is this event's fault.
    except Exception as err:
        message = f"payload of type {stored.type!r} does not decode: {err}"
        raise BadEvent(stored.seq, message) from err


def checked_events(conn: sqlite3.Connection) -> Iterator[tuple[StoredEvent, Event]]:
    """Every row with its event, in seq order; BadEvent at the first that is malformed or
    does not decode."""
    for stored in stored_events(conn):
        problem = malformed(stored)
        if problem:
            raise BadEvent(stored.seq, f"malformed row: {problem}")
        yield stored, decode(stored)


def read_events(conn: sqlite3.Connection) -> Iterator[Event]:
    """`checked_events`, the events alone."""
    return (event for _, event in checked_events(conn))


def fold(world: World, event: Event) -> None:
    """`evolve`, refusing at its seq an event the core cannot fold."""
    try:
        evolve(world, event)
    # The core folds what the coordinator wrote; a forged log can hold what it never writes.
    except Exception as err:
        raise BadEvent(event.seq, f"{event.type} cannot be folded: {err}") from err
