"""Room for the streams a client keeps open: ReadEvents with follow, and WatchMigration.

Every call the coordinator serves takes one of gRPC's `max_concurrent_rpcs` slots, the hosts'
streams included. A watch lasts as long as its client wants, so without a bound of its own one
viewer holding a thousand of them would lock operators and hosts out of the coordinator. Watches
therefore get at most `total` slots together, one caller (a certificate's principal) at most
`per_caller` of them, and every other call keeps the rest. A watch past either bound is refused
with RESOURCE_EXHAUSTED, naming the bound.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

__all__ = ["TooManyWatches", "WatchSlots"]


class TooManyWatches(Exception):
    pass


class WatchSlots:
    def __init__(self, total: int, per_caller: int) -> None:
        self.total = total
        self.per_caller = per_caller
        self.open: Counter[str] = Counter()

    @contextlib.contextmanager
    def taken(self, caller: str) -> Iterator[None]:
        """One slot for `caller` ("" without TLS) while the block runs; raises TooManyWatches
        when there is none."""
        who = caller or "callers without a certificate"
        if self.open[caller] >= self.per_caller:
            raise TooManyWatches(
                f"{who} already has {self.open[caller]} watch streams open (at most "
                f"{self.per_caller} per caller: --max-watch-streams-per-caller)"
            )
        if self.open.total() >= self.total:
            raise TooManyWatches(
                f"{self.open.total()} watch streams are open (at most {self.total}: "
                "--max-watch-streams)"
            )
        self.open[caller] += 1
        try:
            yield
        finally:
            self.open[caller] -= 1
            if not self.open[caller]:
                del self.open[caller]
