"""Why an event is in the log: the chain of causes from it back to what started it.

Each decision the coordinator writes names the event that led to it (`cause_seq`); a command's
answer is caused by the command; an operator's request (its principal in `requested_by`) and a
host's own observation are where chains start. The same question no other migration tool can
answer: which report or request made the coordinator kill, roll back or fence.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from coordinator.core import Event
from whimbrel.v1 import events_pb2

from .display import joined
from .timeline import summary


@dataclass(frozen=True)
class Link:
    seq: int
    time_us: int
    type: str
    who: str  # "host-a (generation 2)", "spiffe://whimbrel/user/alice", "coordinator"
    summary: str
    because: str  # how it follows from the next link ("" for the start)


def chain(events: Iterable[Event], seq: int) -> list[Link]:
    """The links from event `seq` back to its start (the first link is `seq` itself); empty
    when the log has no such event."""
    by_seq: dict[int, Event] = {}
    issued: dict[str, int] = {}
    for event in events:
        by_seq[event.seq] = event
        if isinstance(event.payload, events_pb2.CommandIssued):
            issued[event.payload.command_id] = event.seq
    links: list[Link] = []
    seen: set[int] = set()
    current = by_seq.get(seq)
    while current is not None and current.seq not in seen:
        seen.add(current.seq)
        cause, because = _cause(current, issued)
        who, what = _who(current), summary(current)
        links.append(Link(current.seq, current.time_us, current.type, who, what, because))
        current = by_seq.get(cause) if cause else None
    return links


def _cause(event: Event, issued: dict[str, int]) -> tuple[int, str]:
    p = event.payload
    if isinstance(p, (events_pb2.CommandSucceeded, events_pb2.CommandFailed)):
        return issued.get(p.command_id, 0), "answers"
    cause = getattr(p, "cause_seq", 0)
    return (cause, "decided after") if cause else (0, "")


def _who(event: Event) -> str:
    if event.origin_host:
        return f"{event.origin_host} (generation {event.origin_generation})"
    return getattr(event.payload, "requested_by", "") or "coordinator"


def render(links: list[Link]) -> str:
    lines = []
    for i, link in enumerate(links):
        when = time.strftime("%H:%M:%S", time.gmtime(link.time_us / 1e6))
        when += f".{link.time_us % 1_000_000:06d}"
        lines.append(f"{'  ' * i}{link.seq:>6}  {when}  {link.who}: {link.summary}")
        if link.because:
            lines.append(f"{'  ' * i}        {link.because}:")
    if links and not links[-1].because:
        start = links[-1]
        kind = "an observation" if "generation" in start.who else "a request or decision"
        lines.append(f"(the chain starts at {kind}, seq {start.seq})")
    return joined(lines)
