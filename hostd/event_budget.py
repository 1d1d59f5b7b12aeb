"""A VM's budget for the QMP events kept only for the record.

The events hostd and the coordinator act on (`protocol.QMP_EVENTS_ACTED_ON`) always go up.
Any other is for the record, and a guest can have QEMU send some at will: a guest resetting
itself in a loop sends a RESET every few tens of milliseconds, each appended to the
coordinator's durable log, for every such VM, for as long as it likes. Those go up at a bounded
rate (a token bucket); the ones dropped are counted, and hostd reports the counts once per
period as one DROPPED_EVENT (`VmRuntime`).
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
# How often the counts of dropped events are reported (while any are dropped).
REPORT_EVERY_S = 1.0
# Not QEMU's: hostd's report of what it dropped, {"dropped": {EVENT: count}, "period_s": ...}.
DROPPED_EVENT = "WHIMBREL_QMP_EVENTS_DROPPED"
# A report names at most this many events, each cut to MAX_NAME characters.
MAX_NAMES = 16
MAX_NAME = 64
OTHERS = "(others)"


class RecordBudget:
    def __init__(
        self,
        rate_per_s: float = RATE_PER_S,
        burst: int = BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()
        self._dropped: Counter[str] = Counter()

    def admit(self, event: str) -> bool:
        """Whether QMP event `event` goes up now; one that does not is counted."""
        if event in protocol.QMP_EVENTS_ACTED_ON:
            return True
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
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
