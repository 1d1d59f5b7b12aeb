"""The append-only, hash-chained event log.

The log stores `PendingEvent`s as `StoredEvent`s: bytes and plain columns, nothing of the domain.
Errors:

    StoreError              root
    ├── StaleEpoch          a newer coordinator took over; this writer may append nothing more
    ├── CorruptLog          seq gap or broken hash chain found while reading
    └── StoreFailure        the database failed (disk full, I/O error); the batch was not stored
        └── LogLocked       another writer holds the write lock (a hung coordinator)
"""

from coordinator.log.chain import VerifyResult, verify_chain
from coordinator.log.memory import MemoryDatabase, MemoryEventStore
from coordinator.log.records import (
    CorruptLog,
    EventStore,
    LogLocked,
    PendingEvent,
    StaleEpoch,
    StoredEvent,
    StoreError,
    StoreFailure,
)
from coordinator.log.sqlite import SqliteEventStore

__all__ = [
    "CorruptLog",
    "EventStore",
    "LogLocked",
    "MemoryDatabase",
    "MemoryEventStore",
    "PendingEvent",
    "SqliteEventStore",
    "StaleEpoch",
    "StoreError",
    "StoreFailure",
    "StoredEvent",
    "VerifyResult",
    "verify_chain",
]
