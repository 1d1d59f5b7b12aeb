"""Conversion between the core's events and the log's stored records.

The log stores a payload as the serialized payload message; its type column names the message.
The plain query columns (migration id, VM, host) are filled from the payload here so that
`sqlite-utils` or Datasette can explore a log with no Whimbrel code.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from coordinator.core import Event, NewEvent, payload_class
from coordinator.log import PendingEvent, StoredEvent


def _tags(payload: Any) -> tuple[str, str, str]:
    fields = payload.DESCRIPTOR.fields_by_name
    migration_id = payload.migration_id if "migration_id" in fields else ""
    vm = ""
    if "vm" in fields:
        vm = payload.vm
    elif "spec" in fields:
        vm = payload.spec.name
    elif "observation" in fields:
        vm = payload.observation.vm
    host = ""
    for name in ("host_id", "holder", "destination"):
        if name in fields and getattr(payload, name):
            host = getattr(payload, name)
            break
    return migration_id, vm, host


def to_pending(new: NewEvent) -> PendingEvent:
    migration_id, vm, host = _tags(new.payload)
    return PendingEvent(
        stream=new.stream,
        type=new.type,
        time_us=new.time_us,
        payload=new.payload.SerializeToString(deterministic=True),
        origin_host=new.origin_host,
        origin_generation=new.origin_generation,
        origin_seq=new.origin_seq,
        migration_id=migration_id,
        vm=vm,
        host=new.origin_host or host,
    )


def from_stored(stored: StoredEvent) -> Event:
    return Event(
        seq=stored.seq,
        stream=stored.stream,
        type=stored.type,
        epoch=stored.epoch,
        time_us=stored.time_us,
        payload=payload_class(stored.type).FromString(stored.payload),
        origin_host=stored.origin_host,
        origin_generation=stored.origin_generation,
        origin_seq=stored.origin_seq,
    )


REPLAY_COLUMNS = (
    "seq, stream, type, epoch, time_us, payload, origin_host, origin_generation, origin_seq"
)


def decode_rows(rows: Iterable[tuple[Any, ...]]) -> Iterator[Event]:
    """Events from raw rows in REPLAY_COLUMNS order; checks seq continuity as it goes."""
    from coordinator.core.events import PAYLOAD_CLASSES
    from coordinator.log import CorruptLog

    decoders = {name: cls.FromString for name, cls in PAYLOAD_CLASSES.items()}
    expected = None
    for seq, stream, type_, epoch, time_us, payload, host, generation, origin_seq in rows:
        if expected is not None and seq != expected:
            raise CorruptLog(expected, f"seq gap: found {seq}")
        expected = seq + 1
        decode = decoders.get(type_)
        if decode is None:
            raise CorruptLog(seq, f"unknown event type {type_!r}")
        yield Event(seq, stream, type_, epoch, time_us, decode(payload), host, generation,
                    origin_seq)  # fmt: skip
