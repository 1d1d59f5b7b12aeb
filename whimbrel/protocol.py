"""What the coordinator and hostd must agree on beyond the generated messages: the protocol's
version, the log's stream names, the payload types and their fields in `EventPayload`, the
labels of command kinds, and which commands disarm what a host was asked to do by itself at a
switchover.

Both sides (and the tools: the simulator, the audit) import it from here; nothing here imports
either side.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from google.protobuf.message import Message

from whimbrel.v1 import events_pb2

__all__ = [
    "COORDINATOR_STREAM",
    "DISARMING",
    "DISARMING_INCOMING",
    "MAX_QMP_EVENT_DATA",
    "PAYLOAD_CLASSES",
    "PAYLOAD_FIELDS",
    "QMP_EVENTS_ACTED_ON",
    "VERSION",
    "host_stream",
    "is_qmp_event_name",
    "kind_label",
    "migration_stream",
    "parse_stream",
    "qmp_event_data",
    "vm_stream",
    "wrap",
]

VERSION = "0.1.0"

# The QMP events hostd and the coordinator act on: always forwarded, in order. Any other
# (RESET, RTC_CHANGE, ...) is kept for the record only, and a guest can have QEMU send some at
# will, so hostd forwards those at a bounded rate (hostd.event_budget).
QMP_EVENTS_ACTED_ON = frozenset({"MIGRATION", "MIGRATION_PASS", "STOP", "RESUME", "SHUTDOWN"})

# A QMP event's data as hostd forwards it: QEMU's own are a few hundred bytes; hostd replaces
# larger ones with {"whimbrel_dropped_bytes": N}, and the coordinator refuses them.
MAX_QMP_EVENT_DATA = 65536
# QEMU's event names (and hostd's own report of dropped ones): capitals, digits, underscores.
# A name like no other is no QEMU's, and one of any length would go into the log as it came.
_QMP_EVENT_NAME = re.compile(r"[A-Z0-9_]{1,64}")
# Data this short is cached parsed (statuses, pass numbers: a few distinct strings, each seen
# often); longer data, rare and possibly a hostile QEMU's, would pin up to 64 KiB an entry.
_CACHED_DATA = 256


def is_qmp_event_name(name: str) -> bool:
    return _QMP_EVENT_NAME.fullmatch(name) is not None


def qmp_event_data(data_json: str) -> dict[str, Any] | None:
    """A QMP event's data (QmpEventReceived.data_json) as the object hostd forwards, or None
    when it is not a JSON object within MAX_QMP_EVENT_DATA. Callers must not change it: short
    data parses once, and every caller gets the same object."""
    if len(data_json) <= _CACHED_DATA:
        return _short_event_data(data_json)
    return _event_data(data_json)


@functools.lru_cache(maxsize=4096)
def _short_event_data(data_json: str) -> dict[str, Any] | None:
    return _event_data(data_json)


def _event_data(data_json: str) -> dict[str, Any] | None:
    if len(data_json) > MAX_QMP_EVENT_DATA:
        return None
    try:
        data = json.loads(data_json) if data_json else {}
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


COORDINATOR_STREAM = "coordinator"
_STREAM_KINDS = ("migration", "vm", "host")


def migration_stream(migration_id: str) -> str:
    return f"migration/{migration_id}"


def vm_stream(name: str) -> str:
    return f"vm/{name}"


def host_stream(host_id: str) -> str:
    return f"host/{host_id}"


def parse_stream(stream: str) -> tuple[str, str] | None:
    """("migration", ID), ("vm", NAME), ("host", ID), ("coordinator", ""), or None when
    `stream` names no stream of the log."""
    if stream == COORDINATOR_STREAM:
        return COORDINATOR_STREAM, ""
    kind, sep, name = stream.partition("/")
    if not sep or kind not in _STREAM_KINDS or not name or "/" in name:
        return None
    return kind, name


# Event type name (a message name) -> payload class, and the snake_case oneof field of
# EventPayload that carries it.
_ONEOF = events_pb2.EventPayload.DESCRIPTOR.oneofs_by_name["kind"]
_MESSAGES = [(field, field.message_type) for field in _ONEOF.fields]
PAYLOAD_CLASSES: dict[str, type[Message]] = {
    message.name: getattr(events_pb2, message.name) for _, message in _MESSAGES if message
}
PAYLOAD_FIELDS: dict[str, str] = {
    message.name: field.name for field, message in _MESSAGES if message
}


# Per payload class: whether it has a migration_id, whether a command_id, and where its VM's name
# is ("vm", "observation" or ""). Filled on first use of each class.
_REF_FIELDS: dict[type[Message], tuple[bool, bool, str]] = {}


def refs(payload: Message) -> tuple[str, str, str]:
    """(migration id, command id, VM name) as `payload` names them, "" for what it has no field
    for; the VM's name is its `vm` field or its observation's. Every event folded asks this, so
    the fields are looked up once per class: a getattr that misses costs more than the read."""
    cls = type(payload)
    plan = _REF_FIELDS.get(cls)
    if plan is None:
        fields = cls.DESCRIPTOR.fields_by_name
        vm_field = next((name for name in ("vm", "observation") if name in fields), "")
        plan = _REF_FIELDS[cls] = ("migration_id" in fields, "command_id" in fields, vm_field)
    has_migration_id, has_command_id, vm_field = plan
    p: Any = payload
    vm = p.vm if vm_field == "vm" else p.observation.vm if vm_field else ""
    return (
        p.migration_id if has_migration_id else "",
        p.command_id if has_command_id else "",
        vm,
    )


# What `whimbrelctl policy default` takes for "no cluster default": no policy may be named so.
NO_POLICY = "none"

# Trailing metadata on every refusal the coordinator itself answers: a client tells "the
# coordinator said no" from "the coordinator could not be reached" by it, not by the status
# code (UNAVAILABLE is both a host that is not connected and a refused connection).
ANSWERED_KEY = "whimbrel-answered"
ANSWERED_BY_COORDINATOR = ((ANSWERED_KEY, "coordinator"),)


# What a host's stream may carry (invariant 9): observations of its own VMs and answers to its
# own commands. Everything else (commands, migration ends, VM definitions, epochs) is the
# coordinator's own.
HOST_OBSERVATIONS = frozenset(
    {
        "VmObserved",
        "QmpEventReceived",
        "MigrationStatsSampled",
        "QemuExited",
        "LeaseAcquired",
        "LeaseReleased",
        "NetworkChanged",
        "CommandSucceeded",
        "CommandFailed",
        "HostCapacityChanged",
    }
)


def wrap(payload: Message) -> events_pb2.EventPayload:
    """`payload` in an EventPayload, as hosts send observations."""
    wrapped = events_pb2.EventPayload()
    getattr(wrapped, PAYLOAD_FIELDS[payload.DESCRIPTOR.name]).CopyFrom(payload)
    return wrapped


def kind_label(kind: int) -> str:
    """ "resume-vm" for COMMAND_KIND_RESUME_VM: how logs, ids and failpoints name a kind."""
    name: str = events_pb2.CommandKind.Name(events_pb2.CommandKind.ValueType(kind))
    return name.removeprefix("COMMAND_KIND_").lower().replace("_", "-")


# Commands after which a source must keep its lease at a later switch: the coordinator has
# changed course (a rollback's acquire and cancel, a resume) or the VM ends.
DISARMING = frozenset(
    {
        events_pb2.COMMAND_KIND_ACQUIRE_LEASE,
        events_pb2.COMMAND_KIND_CANCEL_MIGRATION,
        events_pb2.COMMAND_KIND_RESUME_VM,
        events_pb2.COMMAND_KIND_STOP_VM,
        events_pb2.COMMAND_KIND_DESTROY_VM,
    }
)

# Commands after which a destination must not enable its networking at postcopy-active: its
# QEMU is going away (a rollback, the VM's end).
DISARMING_INCOMING = frozenset(
    {events_pb2.COMMAND_KIND_STOP_VM, events_pb2.COMMAND_KIND_DESTROY_VM}
)
