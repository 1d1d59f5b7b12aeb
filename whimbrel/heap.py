"""Python's cyclic garbage collector, kept out of the guests' pauses.

A full collection scans every object the process holds. Once a daemon is up, most of them are
modules, classes, protobuf descriptors and the state it loaded, which live as long as the
process; scanning them took 8 to 11 ms here, long enough to double a post-copy pause it fell
into. So a started daemon freezes them out of the collector: later collections scan only what
was made since (objects freed by reference counting are freed as before).

What a busy daemon makes since is mostly work in flight: events on their way to the log and
their acknowledgements, alive for a commit or two, old enough by then to reach the oldest
generation. With Python's default a full collection followed every tenth collection of the
middle generation and scanned all of them: under a steady stream of host events, one every
half second, tens of milliseconds each, and half of the collector's time. Full collections
therefore wait for a hundred middle ones; the young generations keep their defaults, since
their collections are short and what they free is freed soon.
"""

from __future__ import annotations

import gc

# Collections of the middle generation between two full ones (Python's default: 10).
MIDDLE_COLLECTIONS_PER_FULL = 100


def freeze_startup_objects() -> None:
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, MIDDLE_COLLECTIONS_PER_FULL)
