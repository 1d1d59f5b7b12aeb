"""Failpoints: exact places where a process exits on purpose, so tests crash at precise moments.

`WHIMBREL_FAILPOINTS` names them, comma-separated; unset (the default) nothing happens. A hit
process exits at once with code 97, like a kill -9 at that instant (no cleanup, no flush).

    coordinator.after-cont-intent   the destination's cont intent is committed, not yet sent
    coordinator.after-commit        any transaction committed, its commands not yet sent
    coordinator.entered-PHASE       a migration entered PHASE (preparing, transferring,
                                    switchover, handoff, finishing, ...), committed, its
                                    commands not yet sent
    hostd.before-execute[.KIND]     a command (of KIND, e.g. acquire-lease) is recorded as
                                    started, nothing done yet
    hostd.after-execute[.KIND]      a command acted, its result not yet recorded
"""

from __future__ import annotations

import logging
import os

EXIT_CODE = 97
_ARMED = frozenset(
    p.strip() for p in os.environ.get("WHIMBREL_FAILPOINTS", "").split(",") if p.strip()
)


def hit(name: str) -> None:
    """Exit the process now if failpoint `name` is armed."""
    if name in _ARMED:
        logging.getLogger(__name__).critical("failpoint %s hit: exiting", name)
        logging.shutdown()
        os._exit(EXIT_CODE)
