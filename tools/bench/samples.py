"""Switchover samples: what one migration's QMP events say about the guest's pause, and which
samples a benchmark rejects instead of counting.

A sample is the source's STOP and the destination's RESUME, by QEMU's clocks, and whether the
source reported `postcopy-active`. Both sides of the switchover bench (Whimbrel, read from its
log; the direct baseline, from its own QMP sessions) build their samples here from the same
events, and are judged by the same rules: a sample missing its STOP or its RESUME has no pause
(counting it as 0 ms would flatter whichever side lost an event), and a post-copy run whose
source never went post-copy measured a stop-and-copy, not a post-copy switchover.

A sample also says when the destination had the state the source sends once stopped (its
`postcopy-active`, or `completed` in pre-copy): the guest cannot run before that, whatever the
control plane does, so it tells QEMU's share of a pause from the control plane's.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hostd.vm import SOURCE_STATE_HERE_STATUSES

__all__ = ["QmpEvent", "Rejection", "Sample", "Tally", "judge"]

# (event name, data, QEMU timestamp in microseconds), as hostd's QMP adapter delivers them.
QmpEvent = tuple[str, Mapping[str, Any], int]


class Rejection(enum.Enum):
    """Why a sample does not count; the value names its counter in the bench's JSON."""

    NO_STOP = "no_stop"
    NO_RESUME = "no_resume"
    RESUME_BEFORE_STOP = "resume_before_stop"
    # Mode postcopy, but the source never reported postcopy-active: it finished as pre-copy.
    NOT_POSTCOPY = "not_postcopy"
    # Mode precopy, but the source reported postcopy-active.
    POSTCOPY_IN_PRECOPY = "postcopy_in_precopy"


@dataclass(frozen=True)
class Sample:
    """One migration's switchover as QEMU reported it."""

    stop_us: int | None
    resume_us: int | None
    source_postcopy: bool
    # The destination's first status saying the source's state is there (hostd's cont waits
    # for it): postcopy-active, or completed in pre-copy.
    state_here_us: int | None = None

    @classmethod
    def from_events(cls, source: Iterable[QmpEvent], destination: Iterable[QmpEvent]) -> Sample:
        """The first STOP of the source, the first RESUME of the destination, whether the
        source reported postcopy-active, and when the destination had the source's state, from
        each side's events of this migration only."""
        stop_us: int | None = None
        source_postcopy = False
        for name, data, time_us in source:
            if name == "STOP" and stop_us is None:
                stop_us = time_us
            elif name == "MIGRATION" and data.get("status") == "postcopy-active":
                source_postcopy = True
        resume_us = next((t for name, _, t in destination if name == "RESUME"), None)
        state_here_us = next(
            (t for name, data, t in destination
             if name == "MIGRATION" and data.get("status") in SOURCE_STATE_HERE_STATUSES),
            None,
        )  # fmt: skip
        return cls(stop_us, resume_us, source_postcopy, state_here_us)

    @property
    def pause_ms(self) -> float | None:
        if self.stop_us is None or self.resume_us is None:
            return None
        return (self.resume_us - self.stop_us) / 1000

    @property
    def state_here_ms(self) -> float | None:
        """From the source's STOP until the destination had the source's state."""
        if self.stop_us is None or self.state_here_us is None:
            return None
        return (self.state_here_us - self.stop_us) / 1000


def judge(sample: Sample, *, postcopy: bool) -> Rejection | None:
    """Why `sample` of a run in mode post-copy (or pre-copy) must be rejected; None if it
    counts."""
    if sample.stop_us is None:
        return Rejection.NO_STOP
    if sample.resume_us is None:
        return Rejection.NO_RESUME
    if sample.resume_us <= sample.stop_us:
        return Rejection.RESUME_BEFORE_STOP
    if postcopy and not sample.source_postcopy:
        return Rejection.NOT_POSTCOPY
    if not postcopy and sample.source_postcopy:
        return Rejection.POSTCOPY_IN_PRECOPY
    return None


@dataclass
class Tally:
    """The accepted pauses of one side of a bench, and its rejected samples by reason."""

    postcopy: bool
    pauses_ms: list[float] = field(default_factory=list)
    # Of the accepted samples that have it: STOP until the destination had the source's state.
    state_here_ms: list[float] = field(default_factory=list)
    rejected: Counter[Rejection] = field(default_factory=Counter)

    def add(self, sample: Sample) -> Rejection | None:
        """Count `sample` as a pause or as a rejection; returns the rejection, if any."""
        rejection = judge(sample, postcopy=self.postcopy)
        if rejection is not None:
            self.rejected[rejection] += 1
            return rejection
        pause = sample.pause_ms
        assert pause is not None  # judge() accepts only samples with both events
        self.pauses_ms.append(pause)
        if sample.state_here_ms is not None:
            self.state_here_ms.append(sample.state_here_ms)
        return None

    def rejected_counts(self) -> dict[str, int]:
        """Every reason with its count, zeros included, so the JSON keys never vary."""
        counts = {reason.value: self.rejected[reason] for reason in Rejection}
        return {"total": sum(counts.values()), **counts}
