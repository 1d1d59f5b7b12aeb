"""The QMP adapter: the only module that imports qemu.qmp.

One `QmpSession` per VM: commands go through `execute`, and every QMP event is handed to the
single consumer given at connect time (the VM runtime forwards them to the coordinator). QMP
failures are re-raised as hostd errors `from` the original.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient
from qemu.qmp.error import QMPError

from hostd import tracing
from hostd.errors import QmpError, QmpUnavailable

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


class QmpSession:
    def __init__(self, vm: str, socket_path: str) -> None:
        self.vm = vm
        self.socket_path = socket_path
        self._client = self._new_client()
        self._listener: EventListener | None = None
        self._pump: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    def _new_client(self) -> QMPClient:
        client = QMPClient(self.vm)
        client.logger.addFilter(_QEMU_GONE)  # the client logs as qemu.qmp.protocol.<vm>
        return client

    async def connect(self, sink: EventSink, attempts: int = 50, interval: float = 0.05) -> None:
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
        self._listener = EventListener()
        self._client.register_listener(self._listener)
        self._pump = asyncio.create_task(self._forward(sink), name=f"qmp-events-{self.vm}")

    async def _forward(self, sink: EventSink) -> None:
        assert self._listener is not None
        try:
            async for event in self._listener:
                try:
                    message: dict[str, Any] = dict(event)
                    ts = message.get("timestamp", {})
                    seconds, micros = int(ts.get("seconds", 0)), int(ts.get("microseconds", 0))
                    name, data = str(message["event"]), dict(message.get("data", {}))
                except (AttributeError, KeyError, TypeError, ValueError) as err:
                    # QEMU never sends these; a malformed one is skipped, not the stream.
                    log.getChild(self.vm).warning("malformed QMP event skipped: %s", err)
                    continue
                try:
                    await sink(name, data, seconds * 1_000_000 + micros)
                except Exception:
                    # One event the handler could not take (odd data from a broken QEMU, a
                    # forged lease record met on the way) must not silence every later one.
                    log.getChild(self.vm).exception("QMP event %s not handled", name)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.getChild(self.vm).exception("event forwarding failed")

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
