"""Bytes flowing at a rate on simulated time, with one timer for when they are through.

No ticking: how much is left is computed when asked, and a change of rate (a new
max-bandwidth) moves the one timer. A paused transfer keeps what is left for a resume.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .knobs import Clock

__all__ = ["Transfer"]


class Transfer:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._left = 0.0
        self._rate = 0.0
        self._since = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._done: Callable[[], None] | None = None
        # Bytes that went through, all transfers together, and the bytes left at the last
        # (re)start of the timer.
        self._sent_before = 0.0
        self._started_with = 0.0
        # When the last transfer was due to end, in simulated time: the model goes on from
        # there, not from when the event loop got round to it (at a high speed factor the
        # loop's own latency would otherwise count as seconds of guest dirtying).
        self.finished_at = 0.0

    @property
    def active(self) -> bool:
        return self._timer is not None

    @property
    def rate(self) -> float:
        return self._rate if self.active else 0.0

    def start(
        self, nbytes: float, rate: float, done: Callable[[], None], at: float | None = None
    ) -> None:
        """Send `nbytes` at `rate` from simulated time `at` (now; a round that follows
        another starts when that one was due to end), then call `done`."""
        self.stop()
        self._left, self._done = max(0.0, nbytes), done
        self._run(rate, at)

    def left(self) -> float:
        if not self.active:
            return self._left
        return max(0.0, self._left - self._rate * (self._clock.now() - self._since))

    def sent(self) -> float:
        return self._sent_before + (self._started_with - self.left() if self.active else 0.0)

    def set_rate(self, rate: float) -> None:
        if self.active and rate != self._rate:
            self._settle()
            self._run(rate)

    def stop(self) -> float:
        """Stop (pause) the transfer; returns the bytes left."""
        if self.active:
            self._settle()
            assert self._timer is not None
            self._timer.cancel()
            self._timer = None
        return self._left

    def resume(self, rate: float) -> None:
        if not self.active and self._done is not None:
            self._run(rate)

    def _settle(self) -> None:
        left = self.left()
        self._sent_before += self._started_with - left
        self._left = self._started_with = left

    def _run(self, rate: float, at: float | None = None) -> None:
        self._rate = max(rate, 1.0)
        self._since = self._clock.now() if at is None else at
        self._started_with = self._left
        if self._timer is not None:
            self._timer.cancel()
        due = self._since + self._left / self._rate - self._clock.now()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._clock.real_delay(due), self._fire)

    def _fire(self) -> None:
        self.finished_at = self._since + self._started_with / self._rate
        self._sent_before += self._started_with
        self._left = self._started_with = 0.0
        self._timer = None
        done, self._done = self._done, None
        if done is not None:
            done()
