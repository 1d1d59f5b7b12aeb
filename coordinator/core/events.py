"""Event envelopes and the registry of payload types.

A payload is one of the generated messages listed in `whimbrel.v1.EventPayload`; its message name
is the event type stored in the log. `NewEvent` is what `decide` and hosts produce; the log turns
it into an `Event` by giving it a seq and an epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import Message

from whimbrel.protocol import PAYLOAD_CLASSES


def type_name(payload: Message) -> str:
    """The event type of a payload: its message name."""
    return payload.DESCRIPTOR.name


def payload_class(type_: str) -> type[Message]:
    """The payload class for an event type; KeyError for unknown types."""
    return PAYLOAD_CLASSES[type_]


# NewEvent and Event are made for every event folded; they are not frozen because a frozen
# dataclass costs five times as much to make (every field set through object.__setattr__),
# which was a tenth of the coordinator's time per host event. Nothing changes one once made.


@dataclass(slots=True)
class NewEvent:
    """An event not yet in the log.

    `origin_*` are set for host observations: the log drops a (host, generation, seq) it already
    holds, which makes re-sent host events idempotent.
    """

    stream: str
    payload: Message
    time_us: int
    origin_host: str = ""
    origin_generation: int = 0
    origin_seq: int = 0

    @property
    def type(self) -> str:
        return type_name(self.payload)


@dataclass(slots=True)
class Event:
    """An event as stored: gap-free `seq`, the epoch it was appended under, and its payload."""

    seq: int
    stream: str
    type: str
    epoch: int
    time_us: int
    payload: Message
    origin_host: str = ""
    origin_generation: int = 0
    origin_seq: int = 0
