"""The read gate: reads and watches keep off the coordinator's loop while a guest is paused.

From the switch to post-copy being requested, or the source's stop, until the destination is
seen running (`MigrationState.in_switchover`), the coordinator is on the guest's critical path:
each step of the handoff waits for a host's report to be folded and committed and for the next
command to be written to a host's stream, the destination's `cont` last of all. A read served
meanwhile, or a watcher woken by one of those commits, takes the loop (and, on a small machine,
a CPU) from those steps. So while some migration is in its switchover the gate is shut: reads
wait at `opened()`, and the window's commits wake no watcher. When it opens, every reader held
goes on, and each watcher is woken once, to send the latest state.

The gate is judged from the committed world after each commit (`judge`), never on the commit
path: only readers wait on it. It opens when a committed world shows no migration in its
switchover, or HOLD_S after it shut, whichever comes first, and then stays open until the next
switchover begins: a handoff that hangs (a host that does not answer) delays readers by HOLD_S
once, and never starves them.
"""

from __future__ import annotations

import asyncio
import contextlib

from coordinator.core import World

__all__ = ["HOLD_S", "ReadGate"]

# The longest the gate stays shut for one switchover. A post-copy handoff takes milliseconds;
# a pre-copy stop-and-copy may take up to its downtime limit (300 ms by default) and the
# handoff's round trips after it, and a bound shorter than that would let every held reader
# in during the pause it was held out of. A reader held by a hung handoff waits this once.
HOLD_S = 0.5


class ReadGate:
    """Shut while a migration is in its switchover, for at most `hold_s` at a time (see the
    module's docstring)."""

    def __init__(self, hold_s: float = HOLD_S) -> None:
        self.hold_s = hold_s
        self._open = asyncio.Event()
        self._open.set()
        # Set, and replaced, by each commit judged while the gate is open, and by its opening:
        # what a watcher waits for.
        self._changed = asyncio.Event()
        # While shut: the bound's timer. Held open past the bound: True until the switchover
        # that shut it is over, so the same one does not shut it again.
        self._bound: asyncio.TimerHandle | None = None
        self._overdue = False

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    def judge(self, world: World) -> None:
        """After a commit: shut the gate while `world` has a migration in its switchover, open
        it otherwise. Wakes the watchers only when the gate is open afterwards."""
        if world.switching_over():
            if self._open.is_set() and not self._overdue:
                self._open.clear()
                loop = asyncio.get_running_loop()
                self._bound = loop.call_later(self.hold_s, self._hold_expired)
                return
            if not self._open.is_set():
                return  # shut: the window's commits wake nobody
        else:
            self._overdue = False
            if self._bound is not None:
                self._bound.cancel()
                self._bound = None
            self._open.set()
        self._wake()

    def _hold_expired(self) -> None:
        self._bound = None
        self._overdue = True
        self._open.set()
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def opened(self) -> None:
        """Return once the gate is open (at once if it is)."""
        await self._open.wait()

    def next_change(self) -> asyncio.Event:
        """The event the next change seen open sets. Take it before reading the world and wait
        on it after (`wait`): a change committed in between is not missed."""
        return self._changed

    async def wait(self, change: asyncio.Event, max_wait: float) -> None:
        """Return once `change` (from `next_change`) is set, or after `max_wait` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max_wait):
                await change.wait()

    def close(self) -> None:
        """Open now, without the bound's timer (the coordinator is stopping)."""
        if self._bound is not None:
            self._bound.cancel()
            self._bound = None
        self._overdue = False
        self._open.set()
        self._wake()
