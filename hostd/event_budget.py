"""A VM's budget for the QMP events it sends up, each appended to the coordinator's log.

Events kept only for the record (any but `protocol.QMP_EVENTS_ACTED_ON`) a guest can have QEMU
send at will: a guest resetting itself in a loop sends a RESET every few tens of milliseconds,
for as long as it likes. Those go up at a bounded rate (a token bucket).

The events hostd and the coordinator act on come a few per migration or power change from a
QEMU that behaves; a guest that took QEMU over can send any number. Those have a bucket of
their own, far larger: past it they are dropped as well, and hostd then reads the VM's state
from QEMU afresh and reports that instead (`VmRuntime`), so what was acted on stays true
without every event of a flood in the log.

Dropped events are counted, and hostd reports the counts once per period as one DROPPED_EVENT
(`VmRuntime`).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

from whimbrel import protocol

__all__ = ["BURST", "DROPPED_EVENT", "RATE_PER_S", "REPORT_EVERY_S", "RecordBudget"]

# Record-only events a VM may send: a burst, then this many a second.
BURST = 20
RATE_PER_S = 5.0
# Events acted on: a migration's whole life (setup, passes, statuses, STOP, RESUME) within the
# burst many times over, then this many a second.
ACTED_ON_BURST = 500
ACTED_ON_RATE_PER_S = 50.0
# How often the counts of dropped events are reported (while any are dropped).
REPORT_EVERY_S = 1.0
# Not QEMU's: hostd's report of what it dropped, {"dropped": {EVENT: count}, "period_s": ...}.
DROPPED_EVENT = "WHIMBREL_QMP_EVENTS_DROPPED"
# A report names at most this many events, each cut to MAX_NAME characters.
MAX_NAMES = 16
MAX_NAME = 64
OTHERS = "(others)"


class _Bucket:
    """A token bucket: `burst` at once, refilled at `rate_per_s`."""

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float]) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


class RecordBudget:
    def __init__(
        self,
        rate_per_s: float = RATE_PER_S,
        burst: int = BURST,
        clock: Callable[[], float] = time.monotonic,
        acted_on_rate_per_s: float = ACTED_ON_RATE_PER_S,
        acted_on_burst: int = ACTED_ON_BURST,
    ) -> None:
        self._record_only = _Bucket(rate_per_s, burst, clock)
        self._acted_on = _Bucket(acted_on_rate_per_s, acted_on_burst, clock)
        self._dropped: Counter[str] = Counter()

    def admit(self, event: str) -> bool:
        """Whether QMP event `event` goes up now; one that does not is counted."""
        acted_on = event in protocol.QMP_EVENTS_ACTED_ON
        if (self._acted_on if acted_on else self._record_only).take():
            return True
        self._dropped[event] += 1
        return False

    def take_dropped(self) -> dict[str, int]:
        """The counts dropped since the last call, by event name: the most dropped ones, the
        rest summed as OTHERS (a broken QEMU could make up any number of names)."""
        dropped, self._dropped = self._dropped, Counter()
        report = {name[:MAX_NAME]: n for name, n in dropped.most_common(MAX_NAMES)}
        rest = sum(dropped.values()) - sum(report.values())
        if rest:
            report[OTHERS] = rest
        return report
