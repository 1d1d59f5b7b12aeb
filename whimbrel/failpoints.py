"""Failpoints: exact places where a process exits (or freezes) on purpose, so tests crash at
precise moments.

`WHIMBREL_FAILPOINTS` names them, comma-separated; unset (the default) nothing happens. A hit
process exits at once with code 97, like a kill -9 at that instant (no cleanup, no flush).
`NAME=stop` instead freezes the process there (it sends itself SIGSTOP): a test does what it
wants to happen at that instant (kill a QEMU, ...), then sends SIGCONT, and the process goes on
from the failpoint as if the fault had struck exactly there. Either fires once per process.

    coordinator.after-cont-intent   the destination's cont intent is committed, not yet sent
    coordinator.after-commit        any transaction committed, its commands not yet sent
    coordinator.entered-PHASE       a migration entered PHASE (preparing, transferring,
                                    switchover, handoff, finishing, ...), committed, its
                                    commands not yet sent
    hostd.before-execute[.KIND]     a command (of KIND, e.g. acquire-lease) is recorded as
                                    started, nothing done yet
    hostd.after-execute[.KIND]      a command acted, its result not yet recorded
    hostd.after-qmp-event.NAME[.STATUS]
                                    a QMP event (e.g. STOP, or MIGRATION.pre-switchover) was
                                    handed to the stream, nothing done about it yet
"""

from __future__ import annotations

import logging
import os
import signal

EXIT_CODE = 97


def _parse(spec: str) -> dict[str, str]:
    armed: dict[str, str] = {}
    for item in spec.split(","):
        name, _, action = item.strip().partition("=")
        if name:
            armed[name] = action or "exit"
    return armed


_ARMED = _parse(os.environ.get("WHIMBREL_FAILPOINTS", ""))


def hit(name: str) -> None:
    """Exit (or freeze) the process now if failpoint `name` is armed."""
    action = _ARMED.get(name)
    if action is None:
        return
    if action == "stop":
        del _ARMED[name]  # once: the process goes on normally after SIGCONT
        logging.getLogger(__name__).critical("failpoint %s hit: stopping", name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    logging.getLogger(__name__).critical("failpoint %s hit: exiting", name)
    logging.shutdown()
    os._exit(EXIT_CODE)
