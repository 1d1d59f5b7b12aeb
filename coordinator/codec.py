"""Conversion between the core's events and the log's stored records.

The log stores a payload as the serialized payload message; its type column names the message.
The plain query columns (migration id, VM, host) are filled from the payload here so that
`sqlite-utils` or Datasette can explore a log with no Whimbrel code.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from google.protobuf.message import Message

from coordinator.core import Event, NewEvent, payload_class
from coordinator.core.evolve import Fact
from coordinator.log import PendingEvent, StoredEvent

# Per payload type: whether it has a migration_id, the field its VM's name comes from ("" for
# none), and the fields that may name a host, in order. Filled on first use of each type.
_TAG_FIELDS: dict[type[Message], tuple[bool, str, tuple[str, ...]]] = {}


def _tag_fields(cls: type[Message]) -> tuple[bool, str, tuple[str, ...]]:
    fields = cls.DESCRIPTOR.fields_by_name
    vm = next((name for name in ("vm", "spec", "observation") if name in fields), "")
    hosts = tuple(name for name in ("host_id", "holder", "destination") if name in fields)
    _TAG_FIELDS[cls] = plan = ("migration_id" in fields, vm, hosts)
    return plan


def _tags(payload: Any) -> tuple[str, str, str]:
    cls: type[Message] = type(payload)
    has_migration_id, vm_field, host_fields = _TAG_FIELDS.get(cls) or _tag_fields(cls)
    migration_id = payload.migration_id if has_migration_id else ""
    vm = ""
    if vm_field == "vm":
        vm = payload.vm
    elif vm_field == "spec":
        vm = payload.spec.name
    elif vm_field == "observation":
        vm = payload.observation.vm
    host = ""
    for name in host_fields:
        if value := getattr(payload, name):
            host = value
            break
    return migration_id, vm, host


def to_pending(new: NewEvent | Event) -> PendingEvent:
    """The log's record of an event (a staged one's seq and epoch are the writer's to assign)."""
    migration_id, vm, host = _tags(new.payload)
    # Every event of a stream carries the stream's name in its tag column: stream reads use
    # those indexes (the log has no index on stream itself).
    prefix, _, name = new.stream.partition("/")
    if prefix == "migration":
        migration_id = name
    elif prefix == "vm":
        vm = name
    elif prefix == "host" and not (new.origin_host or host):
        host = name
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


# What folding needs of each row; the rest of the envelope is only for readers of the log.
REPLAY_COLUMNS = "seq, type, time_us, payload, origin_host"


def decode_for_replay(rows: Iterable[tuple[Any, ...]]) -> Iterator[Fact]:
    """Facts for `fold` from rows in REPLAY_COLUMNS order; checks seq continuity as it goes."""
    from coordinator.log import CorruptLog
    from whimbrel.protocol import PAYLOAD_CLASSES

    decoders = {name: cls.FromString for name, cls in PAYLOAD_CLASSES.items()}
    expected = None
    for seq, type_, time_us, payload, host in rows:
        if expected is not None and seq != expected:
            raise CorruptLog(expected, f"seq gap: found {seq}")
        expected = seq + 1
        decode = decoders.get(type_)
        if decode is None:
            raise CorruptLog(seq, f"unknown event type {type_!r}")
        yield seq, type_, time_us, host, decode(payload)
