"""WAL checkpoints of a SQLite file, off the writer's path.

By default SQLite checkpoints inside the commit that makes the write-ahead log pass 1000 pages:
that commit then copies megabytes into the database file and syncs it, 5 to 12 ms here instead
of half a millisecond, and it can be the commit a guest's pause waits for. Writers therefore
turn automatic checkpoints off (`PRAGMA wal_autocheckpoint=0`) and this thread, on a connection
of its own, checkpoints a little at a time. PASSIVE checkpoints never block the writer: they
copy what is committed while new commits go on appending to the log.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

from whimbrel import priority

log = logging.getLogger(__name__)

# Often enough that each checkpoint copies little, rarely enough to cost nothing when idle.
INTERVAL_S = 0.25


class BackgroundCheckpointer:
    def __init__(self, path: Path, interval: float = INTERVAL_S) -> None:
        self.path = path
        self.interval = interval
        self.checkpoints = 0
        self._done = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"wal-checkpoint-{path.name}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        # Background work: this thread yields to the daemon's others and to the VMs.
        priority.as_background_thread()
        conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=5)
        try:
            while not self._stop.wait(self.interval):
                self._checkpoint(conn)
            self._checkpoint(conn)
        finally:
            conn.close()

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            with self._done:
                self.checkpoints += 1
                self._done.notify_all()
        except sqlite3.Error as err:  # e.g. the file went away under a test: retried next time
            log.warning("WAL checkpoint of %s failed: %s", self.path, err)

    def wait(self, count: int, timeout: float) -> bool:
        """Until `count` checkpoints have run (tests)."""
        with self._done:
            return self._done.wait_for(lambda: self.checkpoints >= count, timeout)

    def close(self) -> None:
        """Stop, after one last checkpoint."""
        self._stop.set()
        self._thread.join()
