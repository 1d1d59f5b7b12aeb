"""Writing checkpoints without stopping the loop: a forked child (copy-on-write) writes the
world as it is right after a commit, and a thread reaps it."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path

from coordinator import checkpoint
from coordinator.core import World
from coordinator.log import EventStore

log = logging.getLogger(__name__)


class Checkpointer:
    """A checkpoint of the world every `every` events (0: never); restarts then fold only the
    tail of the log."""

    def __init__(self, path: Path | None, every: int) -> None:
        self.path = path
        self.every = every
        self.written = 0
        self._seq = 0  # where the last checkpoint was taken (or the replay ended)
        self._child = 0

    def replayed_up_to(self, seq: int) -> None:
        self._seq = seq

    def after_commit(self, world: World, store: EventStore) -> None:
        """Right after a commit the world is exactly the log up to its head: if enough events
        came since the last checkpoint, fork a child that writes it and exits."""
        if not self.path or not self.every or self._child:
            return
        seq, event_hash = store.head()
        if seq - self._seq < self.every or world.last_seq != seq:
            return
        self._seq = seq
        path = self.path
        pid = os.fork()
        if pid == 0:  # the child: write, and leave without running anything of the parent's
            code = 0
            try:
                checkpoint.write(path, world, seq, event_hash)
            except BaseException:
                code = 1
            os._exit(code)
        self._child = pid
        loop = asyncio.get_running_loop()

        def reap() -> None:
            _, status = os.waitpid(pid, 0)
            loop.call_soon_threadsafe(self._done, pid, seq, status)

        threading.Thread(target=reap, name="checkpoint-reaper", daemon=True).start()

    def _done(self, pid: int, seq: int, status: int) -> None:
        self._child = 0
        if os.waitstatus_to_exitcode(status) == 0:
            log.info("checkpoint at seq %d written", seq)
        else:
            log.warning("checkpoint at seq %d failed (child %d: status %d)", seq, pid, status)
        self.written += 1
