"""One contract every EventStore honours: the SQLite log and the in-memory one."""

from __future__ import annotations

import itertools
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlite_utils

from coordinator.log import (
    LogLocked,
    MemoryDatabase,
    MemoryEventStore,
    PendingEvent,
    SqliteEventStore,
    StaleEpoch,
    verify_chain,
)
from coordinator.log.sqlite import connect, create_schema, insert_rows
from whimbrel.walcheckpoint import BackgroundCheckpointer


def started(epoch: int) -> PendingEvent:
    return PendingEvent("coordinator", "CoordinatorStarted", 1, f"epoch {epoch}".encode())


def event(n: int, host: str = "", generation: int = 0, seq: int = 0) -> PendingEvent:
    return PendingEvent(
        f"vm/v{n % 3}", "QmpEventReceived", 1000 + n, f"payload {n}".encode(), host, generation, seq
    )


class Backend:
    """Opens stores that share one underlying database."""

    def __init__(self, kind: str, tmp: Path) -> None:
        self.kind, self.tmp = kind, tmp
        self.memory = MemoryDatabase()
        self.opened: list[object] = []

    def open(self):  # type: ignore[no-untyped-def]
        store = (
            SqliteEventStore(self.tmp / "log.db")
            if self.kind == "sqlite"
            else MemoryEventStore(self.memory)
        )
        self.opened.append(store)
        return store


@pytest.fixture(params=["sqlite", "memory"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b = Backend(request.param, tmp_path)
    yield b
    for store in b.opened:
        store.close()  # type: ignore[attr-defined]


def test_epoch_event_comes_first_and_seqs_are_gap_free(backend: Backend) -> None:
    """The epoch's first event is seq 1; appends get consecutive seqs in submission order."""
    store = backend.open()
    assert store.begin_epoch(started) == 1
    stored = store.append([event(i) for i in range(5)])
    assert [e.seq for e in stored] == [2, 3, 4, 5, 6]
    assert [e.type for e in store.read()][:1] == ["CoordinatorStarted"]
    assert all(e.epoch == 1 for e in store.read())


def test_hash_chain_verifies_and_links(backend: Backend) -> None:
    """Every event links to the previous hash and the whole chain verifies."""
    store = backend.open()
    store.begin_epoch(started)
    store.append([event(i) for i in range(10)])
    events = list(store.read())
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(events))
    result = verify_chain(events)
    assert result.ok and result.events_checked == 11 and result.head_hash == store.head()[1]


def test_host_events_are_deduplicated_by_host_generation_seq(backend: Backend) -> None:
    """A re-sent host event (same host, generation, seq) is dropped, within and across batches."""
    store = backend.open()
    store.begin_epoch(started)
    first = store.append([event(1, "h", 1, 1), event(2, "h", 1, 2), event(2, "h", 1, 2)])
    assert [e.seq if e else None for e in first] == [2, 3, None]
    again = store.append([event(1, "h", 1, 1), event(3, "h", 1, 3), event(4, "h", 2, 1)])
    assert [e.seq if e else None for e in again] == [None, 4, 5]
    assert store.host_high_water("h", 1) == 3 and store.host_high_water("h", 2) == 1


def test_stale_epoch_cannot_append_and_leaves_nothing(backend: Backend) -> None:
    """A second coordinator's epoch fences the first: its appends fail and store nothing."""
    old = backend.open()
    old.begin_epoch(started)
    old.append([event(1)])
    new = backend.open()
    assert new.begin_epoch(started) == 2
    with pytest.raises(StaleEpoch) as err:
        old.append([event(2)])
    assert (err.value.mine, err.value.current) == (1, 2)
    assert [e.type for e in new.read()] == [
        "CoordinatorStarted",
        "QmpEventReceived",
        "CoordinatorStarted",
    ]
    assert verify_chain(new.read()).ok


def test_new_epoch_follows_what_the_old_writer_committed_after_the_open(backend: Backend) -> None:
    """A standby opens the log while the old coordinator still writes (it held the write lock
    until it was woken); the new epoch lands after those writes, and the chain holds."""
    old = backend.open()
    old.begin_epoch(started)
    new = backend.open()  # reads the head now: seq 1
    old.append([event(1), event(2)])  # committed after the standby opened the log
    assert new.begin_epoch(started) == 2
    assert [e.seq for e in new.read()] == [1, 2, 3, 4]
    assert new.head()[0] == 4
    assert verify_chain(new.read()).ok


def test_a_log_locked_by_another_writer_is_reported_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holding the write lock (a hung coordinator mid-transaction) is a typed
    LogLocked, not a failure to read from its text: the coordinator's takeover waits on it."""
    from coordinator.log import sqlite as sqlite_log

    monkeypatch.setattr(sqlite_log, "BUSY_TIMEOUT_S", 0.2)
    path = tmp_path / "log.db"
    SqliteEventStore(path).close()
    holder = sqlite3.connect(str(path), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    store = SqliteEventStore(path)
    try:
        with pytest.raises(LogLocked, match="locked by another writer"):
            store.begin_epoch(started)
        holder.execute("ROLLBACK")
        assert store.begin_epoch(started) == 1  # once it lets go, the takeover goes through
    finally:
        holder.close()
        store.close()


def test_concurrent_appenders_all_acknowledged_once(backend: Backend) -> None:
    """Twenty threads appending at once: every event stored once, seqs gap-free, chain intact."""
    store = backend.open()
    store.begin_epoch(started)
    acked: list[int] = []
    lock = threading.Lock()

    def writer(w: int) -> None:
        for i in range(25):
            (e,) = store.append([event(w * 100 + i)])
            with lock:
                acked.append(e.seq)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(acked) == list(range(2, 502))
    assert verify_chain(store.read()).ok


def test_read_from_seq_stream_and_limit(backend: Backend) -> None:
    """Reads start at a seq, filter by stream and stop at a limit."""
    store = backend.open()
    store.begin_epoch(started)
    store.append([event(i) for i in range(9)])
    assert [e.seq for e in store.read(from_seq=8)] == [8, 9, 10]
    assert [e.seq for e in store.read(stream="vm/v0")] == [2, 5, 8]
    assert [e.seq for e in store.read(from_seq=3, limit=2)] == [3, 4]


def test_wait_past_wakes_on_commit(backend: Backend) -> None:
    """A follower blocked at the head wakes when a later event commits."""
    store = backend.open()
    store.begin_epoch(started)
    assert not store.wait_past(1, 0.01)
    woke: list[bool] = []
    t = threading.Thread(target=lambda: woke.append(store.wait_past(1, 10)))
    t.start()
    store.append([event(1)])
    t.join()
    assert woke == [True]


def test_sqlite_log_survives_reopen_and_refuses_update_delete(tmp_path: Path) -> None:
    """Committed events are on disk; the database itself refuses UPDATE and DELETE."""
    store = SqliteEventStore(tmp_path / "log.db")
    store.begin_epoch(started)
    store.append([event(1)])
    store.close()
    reopened = SqliteEventStore(tmp_path / "log.db")
    assert reopened.head()[0] == 2 and reopened.begin_epoch(started) == 2
    reopened.close()
    conn = sqlite3.connect(tmp_path / "log.db")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE events SET payload = x'00' WHERE seq = 1")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM events WHERE seq = 1")
    conn.close()


def test_verify_names_first_tampered_seq(tmp_path: Path) -> None:
    """Editing a payload behind the triggers' back is caught at that seq."""
    store = SqliteEventStore(tmp_path / "log.db")
    store.begin_epoch(started)
    store.append([event(i) for i in range(5)])
    store.close()
    conn = sqlite3.connect(tmp_path / "log.db")
    conn.execute("DROP TRIGGER events_append_only_update")
    conn.execute("UPDATE events SET payload = x'00' WHERE seq = 4")
    conn.commit()
    conn.close()
    result = verify_chain(SqliteEventStore(tmp_path / "log.db").read())
    assert not result.ok and result.first_bad_seq == 4 and "hash" in result.problem


async def test_asyncio_appends_are_acknowledged_after_commit(backend: Backend) -> None:
    """append_async and append_marks (the coordinator's path) give seqs, hashes and drops
    that agree with what is stored."""
    store = backend.open()
    store.begin_epoch(started)
    stored = await store.append_async([event(1), event(2, "h", 1, 1)])
    epoch, marks = await store.append_marks([event(3, "h", 1, 1), event(4, "h", 1, 2)])
    assert [e.seq for e in stored if e] == [2, 3]
    assert epoch == 1 and marks[0] is None and marks[1] is not None and marks[1][0] == 4
    on_disk = list(store.read())
    assert (on_disk[-1].seq, on_disk[-1].prev_hash, on_disk[-1].hash) == marks[1]
    assert verify_chain(on_disk).ok


def test_sqlite_commits_never_checkpoint_the_background_thread_does(tmp_path: Path) -> None:
    """A commit never copies the write-ahead log into the database file (a commit that did took
    5-12 ms, in a guest's pause); the background checkpointer does, beside the writer."""
    path = tmp_path / "log.db"
    store = SqliteEventStore(path)
    store.begin_epoch(started)
    store.checkpointer.close()  # (checkpointed once more on the way out)
    before = path.stat().st_size
    for n in range(1, 1201):  # far more than SQLite's automatic threshold of 1000 WAL pages
        store.append([event(n)])
    assert path.stat().st_size == before
    assert Path(f"{path}-wal").stat().st_size > 1000 * 4096
    checkpointer = BackgroundCheckpointer(path)
    try:
        assert checkpointer.wait(1, timeout=10)
        assert path.stat().st_size > before
    finally:
        checkpointer.close()
        store.close()
    reopened = SqliteEventStore(path)
    assert reopened.head()[0] == 1201
    reopened.close()


@pytest.mark.parametrize("count", [1, 3, 4, 15, 16, 17, 63, 64, 65, 129, 300])
def test_every_event_of_a_transaction_is_stored_in_order(backend: Backend, count: int) -> None:
    """The SQLite store inserts a transaction's rows many per statement, in statements of a few
    sizes: whatever the count, every event is stored once, in order, its chain intact."""
    store = backend.open()
    store.begin_epoch(started)
    submitted = [event(i, "host-a", 1, i + 1) for i in range(count)]
    appended = store.append(submitted)
    stored = list(store.read())[1:]
    assert [e.seq for e in appended] == list(range(2, count + 2))
    assert [(e.payload, e.origin_seq, e.time_us) for e in stored] == [
        (p.payload, p.origin_seq, p.time_us) for p in submitted
    ]
    assert verify_chain(list(store.read())).ok


def test_rows_are_all_inserted_whatever_sqlite_takes_per_statement(tmp_path: Path) -> None:
    """Where the linked SQLite takes fewer parameters than a multi-row insert needs, the rows
    still go in, one statement each at worst; where it cannot take even one row, the insert
    fails: no row is ever silently left out of a commit."""
    conn = connect(tmp_path / "log.db")
    create_schema(sqlite_utils.Database(conn))
    columns = ["vm/v", "QmpEventReceived", 1000, "", 0, 0, None, "v", None, b"payload"]
    values: list[object] = []
    for seq in range(1, 6):
        values += [seq, 1, b"prev", b"hash", *columns]
    conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 20)  # room for one row of 14 values
    conn.execute("BEGIN")
    insert_rows(conn, values)
    conn.execute("COMMIT")
    assert [r[0] for r in conn.execute("SELECT seq FROM events ORDER BY seq")] == [1, 2, 3, 4, 5]
    conn.close()
    tight = connect(tmp_path / "other.db")
    create_schema(sqlite_utils.Database(tight))
    tight.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 10)  # not even one row
    with pytest.raises(sqlite3.OperationalError, match="too many SQL variables"):
        insert_rows(tight, values)
    tight.close()
