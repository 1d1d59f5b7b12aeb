"""The QMP adapter: the only module that imports qemu.qmp.

One `QmpSession` per VM: commands go through `execute`, and every QMP event is handed to the
single consumer given at connect time (the VM runtime forwards them to the coordinator). QMP
failures are re-raised as hostd errors `from` the original.

Everything QEMU says is taken as a guest that took QEMU over could say it: events wait in one
bounded queue (qemu.qmp's own listeners keep every event for good), and a timestamp that
cannot be QEMU's gives way to hostd's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from qemu.qmp import ExecuteError, Message, QMPClient
from qemu.qmp.error import QMPError

from hostd import tracing
from hostd.errors import QmpError, QmpUnavailable
from whimbrel.protocol import is_qmp_event_name

log = logging.getLogger(__name__)


class _QemuGoneFilter(logging.Filter):
    """qemu.qmp logs an ERROR when QEMU's socket is reset or closed under its reader; that is
    how a killed or exiting QEMU looks, which hostd reports itself (QemuExited). Such records
    are kept only at DEBUG."""

    GONE = ("ConnectionResetError", "BrokenPipeError", "EOFError", "IncompleteReadError")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and any(g in record.getMessage() for g in self.GONE):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


_QEMU_GONE = _QemuGoneFilter()

# (event name, data, QEMU timestamp in microseconds since the Unix epoch)
EventSink = Callable[[str, dict[str, Any], int], Awaitable[None]]
# Told how many events were dropped since it was last told (the queue was full, or the
# consumer dropped them itself: `QmpSession.dropped`).
OverflowSink = Callable[[int], None]

# Events read from QEMU and not yet handled, at most. Handling keeps up with any QEMU that
# behaves (a few events a second); only a stuck handler or a flooding QEMU fills it, and what
# is dropped then is made up for by reading QEMU's state afresh (`on_overflow`).
MAX_QUEUED_EVENTS = 1024
# QEMU stamps its events with the wall clock hostd reads too, when it sends them: a stamp
# ahead of hostd's clock, or older than this, is no stamp of QEMU's. hostd's own time of
# receipt stands in (a stamp from the future would have the coordinator refuse the host's
# whole stream, and a stamp beyond SQLite's integers would fail hostd's own outbox).
MAX_EVENT_AGE_S = 600


class _Client(QMPClient):
    """qemu.qmp hands each event to every registered listener, each of which keeps it in an
    unbounded queue and an unbounded history, its default listener (never read here)
    included: a session that lives long, or a QEMU that floods, grows hostd without bound.
    Here events go to one bounded queue and nowhere else."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.queued: asyncio.Queue[Message] = asyncio.Queue(MAX_QUEUED_EVENTS)
        self.dropped = 0

    async def _event_dispatch(self, msg: Message) -> None:
        try:
            self.queued.put_nowait(msg)
        except asyncio.QueueFull:
            self.dropped += 1


def event_time_us(seconds: object, microseconds: object, now_us: int) -> int:
    """The time of an event stamped (`seconds`, `microseconds`) by QEMU, or `now_us` when the
    stamp cannot be one of QEMU's."""
    if type(seconds) is not int or type(microseconds) is not int:
        return now_us  # QEMU's are JSON integers (and a bool is no stamp)
    stamp = seconds * 1_000_000 + microseconds
    if now_us - MAX_EVENT_AGE_S * 1_000_000 <= stamp <= now_us:
        return stamp
    return now_us


class QmpSession:
    def __init__(self, vm: str, socket_path: str) -> None:
        self.vm = vm
        self.socket_path = socket_path
        self._client = self._new_client()
        self._pump: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    def _new_client(self) -> _Client:
        client = _Client(self.vm)
        client.logger.addFilter(_QEMU_GONE)  # the client logs as qemu.qmp.protocol.<vm>
        return client

    async def connect(
        self,
        sink: EventSink,
        on_overflow: OverflowSink,
        attempts: int = 50,
        interval: float = 0.05,
    ) -> None:
        """Connect (retrying while QEMU creates its socket) and start forwarding events."""
        last: Exception | None = None
        for _ in range(attempts):
            try:
                await self._client.connect(self.socket_path)
                break
            except (QMPError, OSError) as err:
                last = err
                self._client = self._new_client()
                await asyncio.sleep(interval)
        else:
            raise QmpUnavailable(
                f"QMP at {self.socket_path} unreachable: {last}", vm=self.vm
            ) from last
        self._pump = asyncio.create_task(
            self._forward(self._client, sink, on_overflow), name=f"qmp-events-{self.vm}"
        )

    async def _forward(self, client: _Client, sink: EventSink, on_overflow: OverflowSink) -> None:
        told = malformed = 0
        try:
            while True:
                if client.dropped != told and client.queued.empty():
                    # Told once the events queued before the drops are handled: QEMU's state
                    # read then covers what was dropped, and no older event follows it.
                    on_overflow(client.dropped - told)
                    told = client.dropped
                event = await client.queued.get()
                try:
                    message: dict[str, Any] = dict(event)
                    ts = message.get("timestamp", {})
                    time_us = event_time_us(
                        ts.get("seconds"), ts.get("microseconds"), time.time_ns() // 1000
                    )
                    name, data = str(message["event"]), dict(message.get("data", {}))
                    if not is_qmp_event_name(name):
                        raise ValueError(f"no QEMU event is named {name[:64]!r}")
                except (AttributeError, KeyError, TypeError, ValueError) as err:
                    # QEMU never sends these; a malformed one is skipped, not the stream. Said
                    # at the 1st, 2nd, 4th, 8th...: a QEMU sending nothing else cannot flood
                    # hostd's log either.
                    malformed += 1
                    if malformed & (malformed - 1) == 0:
                        log.getChild(self.vm).warning(
                            "malformed QMP event skipped (%d so far): %s", malformed, err
                        )
                    continue
                try:
                    await sink(name, data, time_us)
                except Exception:
                    # One event the handler could not take (odd data from a broken QEMU, a
                    # forged lease record met on the way) must not silence every later one.
                    log.getChild(self.vm).exception("QMP event %s not handled", name)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.getChild(self.vm).exception("event forwarding failed")

    def dropped(self) -> None:
        """The consumer dropped an event it was handed: it is told, as of events dropped
        beyond the queue, once the events queued now are handled."""
        self._client.dropped += 1

    async def execute(
        self, command: str, arguments: Mapping[str, object] | None = None, *, oob: bool = False
    ) -> Any:
        """`oob`: out of band (exec-oob), run by QEMU's monitor thread at once, for the
        commands QEMU allows there; the only way to reach a QEMU whose main thread is blocked."""
        with tracing.qmp_span(self.vm, command) as span:
            try:
                return await self._client.execute(command, arguments, oob=oob)
            except ExecuteError as err:
                error = QmpError(
                    str(err),
                    vm=self.vm,
                    command=command,
                    error_class=err.error_class,
                    reply=dict(err.received),
                )
                tracing.failed(span, error)
                raise error from err
            except (QMPError, OSError, EOFError) as err:
                lost = QmpUnavailable(f"{command}: QMP connection lost: {err}", vm=self.vm)
                tracing.failed(span, lost)
                raise lost from err

    async def wait_closed(self) -> None:
        """Return once QEMU closed the connection (it exited, or was killed)."""
        with contextlib.suppress(Exception):
            await self._client.runstate_changed()
        while self._client.runstate.name not in ("IDLE", "DISCONNECTING"):
            await self._client.runstate_changed()

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pump
        with contextlib.suppress(Exception):
            await self._client.disconnect()
        self.closed.set()
