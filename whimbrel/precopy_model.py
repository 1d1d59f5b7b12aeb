"""The pre-copy model as pure arithmetic: what qmpsim (tools/qmpsim) simulates, and what
`whimbrel-audit whatif` predicts with.

A round sends what the last dirty-log sync found (the first round: all of RAM) at the
bandwidth (max-bandwidth within what the link carries); the running guest dirties at its rate
meanwhile, at most all of RAM. A sync that finds no more than bandwidth x downtime-limit
switches over, and that remainder is the guest's pause; QEMU takes its first measurement after
100 ms, so a first round shorter than that switches at once. qmpsim's `source.py` runs the same
rules on simulated time.

Auto-converge follows QEMU 7.2: after a sync whose period dirtied more than half of what it
sent, twice in a row, the vCPUs are throttled by cpu-throttle-initial percent, and by
cpu-throttle-increment more each time after; the guest then dirties that much slower.
"""

from __future__ import annotations

from dataclasses import dataclass

PAGE = 4096
FIRST_MEASURE_S = 0.1
# QEMU's defaults when a parameter is not set.
DEFAULT_DOWNTIME_MS = 300
THROTTLE_INITIAL, THROTTLE_INCREMENT, THROTTLE_TRIGGER = 20, 10, 0.5
MAX_THROTTLE = 99


def bandwidth(max_bandwidth: float, link: float) -> float:
    return min(max_bandwidth, link) if max_bandwidth > 0 else link


def threshold(bandwidth_bytes_s: float, downtime_ms: float) -> float:
    """Bytes that may be left for the switchover."""
    return bandwidth_bytes_s * (downtime_ms or DEFAULT_DOWNTIME_MS) / 1000.0


def dirtied(rate: float, seconds: float, total: float) -> float:
    return min(total, rate * seconds)


@dataclass
class Throttle:
    """QEMU's auto-converge throttle, percent (0 while off)."""

    initial: int = THROTTLE_INITIAL
    increment: int = THROTTLE_INCREMENT
    percent: int = 0
    _hot_syncs: int = 0

    def after_sync(self, dirtied_bytes: float, sent_bytes: float) -> None:
        if dirtied_bytes > THROTTLE_TRIGGER * sent_bytes:
            self._hot_syncs += 1
        if self._hot_syncs >= 2:
            self._hot_syncs = 0
            step = self.increment if self.percent else self.initial
            self.percent = min(MAX_THROTTLE, self.percent + step)

    def rate(self, rate: float) -> float:
        return rate * (100 - self.percent) / 100
