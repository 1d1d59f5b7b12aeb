"""An outgoing migration: statuses, passes and progress as QEMU 7.2 shows them.

Pre-copy: `setup`, a first dirty-log sync (MIGRATION_PASS 1), `active`; each round sends what
the last sync found dirty, then syncs again (a pass). Once a sync finds no more than
bandwidth x downtime-limit, the guest stops (STOP), waits in `pre-switchover` if asked, then
`device`, a last sync, and the rest goes while the guest is stopped: `completed` comes when
the destination says it loaded the state (return path). A first round done within 100 ms goes
straight to the switchover, with no sync in between, as QEMU does before it has measured a
bandwidth. Post-copy: `postcopy-active`, STOP, a pass, then the rest at max-postcopy-bandwidth.

Failures follow the transcripts: a lost peer fails a pre-copy (the guest runs again if it had
stopped for the switch) and pauses a post-copy; `pre-switchover` notices nothing until
`migrate-continue`; `migrate_cancel` in `postcopy-paused` leaves `cancelling` for good.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

from . import link
from .cmdline import Launch
from .knobs import Clock, Knobs
from .machine import Machine
from .settings import Settings
from .transfer import Transfer
from .wire import QmpError

__all__ = ["IN_PROGRESS", "Source"]

PAGE = 4096
# QEMU reports RAM plus the machine's ROMs (pc with -nodefaults, measured on 7.2).
ROM_BYTES = 532480
IN_PROGRESS = frozenset(
    [
        "setup",
        "active",
        "postcopy-active",
        "postcopy-paused",
        "postcopy-recover",
        "device",
        "pre-switchover",
        "cancelling",
        "wait-unplug",
    ]
)
# QEMU computes its switchover threshold only after 100 ms of transfer.
FIRST_MEASURE_S = 0.1
PEER_GONE = "Unable to write to socket: Broken pipe"

Emit = Callable[[str, "dict[str, Any] | None"], None]


def ms(seconds: float) -> int:
    return int(seconds * 1000)


class Source:
    def __init__(
        self,
        launch: Launch,
        settings: Settings,
        machine: Machine,
        knobs: Knobs,
        clock: Clock,
        emit: Emit,
    ) -> None:
        self.launch, self.settings, self.machine = launch, settings, machine
        self.knobs, self.clock, self.emit = knobs, clock, emit
        self.total = launch.ram_bytes + ROM_BYTES
        self.status = "none"
        self._reset()

    def _reset(self) -> None:
        self.error_desc = ""
        self._link: link.Link | None = None
        self._address = link.Address()
        self._task: asyncio.Task[None] | None = None
        self._transfer = Transfer(self.clock)
        self._passes = 0
        self._started = self._active_since = self._last_sync = self._stopped_at = 0.0
        self._ended = 0.0
        self._setup_ms = self._downtime_ms = 0
        self._final_bytes = 0.0
        self._postcopy_wanted = self._in_postcopy = self._resuming = False
        # Stopped in pre-switchover on the way to post-copy (not to a pre-copy's completion).
        self._postcopy_after_pause = False
        self._postcopy_from = 0.0
        self._peer_lost = False
        self._refusal = ""

    # --- what QMP sees ---

    def _set(self, status: str) -> None:
        self.status = status
        if self.settings["events"]:
            self.emit("MIGRATION", {"status": status})

    def _sync(self, at: float | None = None) -> float:
        """A dirty-log sync (a pass) at simulated time `at` (now): the bytes the running
        guest dirtied since the last."""
        self._passes += 1
        if self.settings["events"]:
            self.emit("MIGRATION_PASS", {"pass": self._passes})
        now = self.clock.now() if at is None else at
        elapsed, self._last_sync = max(0.0, now - self._last_sync), now
        return (
            min(float(self.total), self.knobs.dirty_rate * elapsed) if self.machine.running else 0.0
        )

    def info(self) -> dict[str, Any]:
        if self.status in ("none",):
            return {}
        if self.status == "setup":
            return {"status": "setup"}
        if self.status == "failed":
            return {
                "status": "failed",
                **({"error-desc": self.error_desc} if self.error_desc else {}),
            }
        if self.status == "cancelled":
            return {"status": "cancelled"}
        now = self.clock.now()
        if self.status == "completed":
            return {
                "status": "completed",
                "setup-time": self._setup_ms,
                "downtime": self._downtime_ms,
                "total-time": ms(self._ended - self._started),
                "ram": self._ram(self._ended - self._started),
            }
        remaining = self._remaining()
        bandwidth = self._rate() or self.settings.bandwidth(self.knobs.link)
        return {
            "expected-downtime": ms(remaining / bandwidth),
            "status": self.status,
            "setup-time": self._setup_ms,
            "total-time": ms(now - self._started),
            "ram": self._ram(now - self._started),
        }

    def _remaining(self) -> float:
        return self._final_bytes if self.status == "pre-switchover" else self._transfer.left()

    def _rate(self) -> float:
        return self._transfer.rate

    def _ram(self, elapsed: float) -> dict[str, Any]:
        sent = int(self._transfer.sent())
        postcopy = int(sent - self._postcopy_from) if self._in_postcopy else 0
        done = self.status == "completed"
        rate = (sent / elapsed if elapsed > 0 else 0.0) if done else self._rate()
        dirty_pages_rate = 0 if done else int(self.knobs.dirty_rate / PAGE)
        return {
            "total": self.total,
            "postcopy-requests": 0,
            "dirty-sync-count": self._passes,
            "multifd-bytes": 0,
            "pages-per-second": int(rate / PAGE),
            "downtime-bytes": 0,
            "page-size": PAGE,
            "remaining": int(self._remaining()),
            "postcopy-bytes": postcopy,
            "mbps": rate * 8 / 1e6,
            "transferred": sent,
            "dirty-sync-missed-zero-copy": 0,
            "precopy-bytes": sent - postcopy,
            "duplicate": 0,
            "dirty-pages-rate": dirty_pages_rate,
            "skipped": 0,
            "normal-bytes": sent,
            "normal": sent // PAGE,
        }

    # --- commands ---

    def migrate(self, arguments: dict[str, Any]) -> dict[str, Any]:
        uri, resume = arguments["uri"], arguments.get("resume", False)
        if self.machine.state == "inmigrate":
            raise QmpError("Guest is waiting for an incoming migration")
        address = link.parse_uri(uri)
        if resume:
            if self.status != "postcopy-paused":
                raise QmpError("Cannot resume if there is no paused migration")
            if address is None:
                raise QmpError("Parameter 'uri' expects a valid migration protocol")
            self._resuming, self._address = True, address
            self._task = asyncio.create_task(self._connect(), name="migration-resume")
            return {}
        if self.status in IN_PROGRESS:
            raise QmpError("There's a migration process in progress")
        self._transfer.stop()
        self._reset()
        self._started = self.clock.now()
        self._set("setup")
        if address is None:
            self._ended = self.clock.now()
            self._set("failed")
            raise QmpError("Parameter 'uri' expects a valid migration protocol")
        self._address = address
        self._task = asyncio.create_task(self._connect(), name="migration-connect")
        return {}

    def start_postcopy(self, _: dict[str, Any]) -> dict[str, Any]:
        if not self.settings["postcopy-ram"]:
            raise QmpError(
                "Enable postcopy with migrate_set_capability before the start of migration"
            )
        if self.status == "none":
            raise QmpError("Postcopy must be started after migration has been started")
        self._postcopy_wanted = True
        if self.status == "active":
            asyncio.get_running_loop().call_soon(self._postcopy_now)
        return {}

    def continue_(self, arguments: dict[str, Any]) -> dict[str, Any]:
        if self.status != arguments["state"]:
            raise QmpError(f"Migration not in expected state: {self.status}")
        if self.status == "pre-switchover":
            # QEMU only wakes its migration thread here: what follows comes after the reply.
            asyncio.get_running_loop().call_soon(self._device)
        return {}

    def cancel(self, _: dict[str, Any]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        if self.status in ("setup", "active", "pre-switchover", "device"):
            self._set("cancelling")
            self._halt()
            self.machine.restart_after_failed_migration()
            loop.call_soon(self._cancelled, "running")
        elif self.status in ("postcopy-active", "postcopy-recover"):
            self._set("cancelling")
            self._halt()
            loop.call_soon(self._cancelled, "postmigrate")
        elif self.status == "postcopy-paused":
            self._set("cancelling")  # and there it stays: QEMU 7.2 never finishes this cancel
        return {}

    def pause(self) -> bool:
        """migrate-pause on the source; False when it does not apply here."""
        if self.status != "postcopy-active":
            return False
        asyncio.get_running_loop().call_soon(self._paused)
        return True

    def parameters_changed(self) -> None:
        if self._in_postcopy:
            self._transfer.set_rate(self.settings.postcopy_bandwidth(self.knobs.link))
        else:
            self._transfer.set_rate(self.settings.bandwidth(self.knobs.link))

    def shutdown(self) -> None:
        """QEMU going down by a signal cancels an outgoing migration first."""
        if self.status in IN_PROGRESS and self.status != "cancelling":
            self._set("cancelling")
        self._halt()

    # --- the stream ---

    async def _connect(self) -> None:
        address = self._address
        try:
            reader, writer = await link.connect(address)
        except OSError as err:
            if not self._resuming:
                reason = os.strerror(err.errno) if err.errno else str(err)
                self._fail(f"Failed to connect to '{address.describe()}': {reason}")
            return
        expected = "postcopy-paused" if self._resuming else "setup"
        if self.status != expected:
            writer.close()
            return
        self._link = link.Link(reader, writer, self._on_message, self._on_lost)
        hello: dict[str, Any] = {"t": "hello", "resume": self._resuming, "tls": None}
        creds = self._tls_creds()
        if creds is not None:
            identity = link.certificate(f"{creds}/client-cert.pem")
            hello["tls"] = {"subject": identity.subject}
        self._link.send(hello)

    def _tls_creds(self) -> str | None:
        """The directory of the TLS credentials tls-creds names (None: plain stream)."""
        creds_id = self.settings.parameters["tls-creds"]
        if not creds_id:
            return None
        creds = self.launch.tls.get(creds_id)
        return creds.directory if creds is not None else ""

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("t")
        if kind == "refused":
            self._refusal = str(message.get("why", ""))
        elif kind == "welcome":
            problem = self._check_destination(message)
            if problem:
                self._drop_link()
                if not self._resuming:
                    self._fail(problem)
                return
            assert self._link is not None
            self._link.send({"t": "start"})
            if self._resuming:
                self._resumed()
            else:
                self._begin()
        elif kind == "loaded" and self.status != "cancelling":
            # A cancel wins over a destination that loaded the state meanwhile: QEMU's
            # completion finds the status changed, and the source runs again.
            self._completed()

    def _check_destination(self, welcome: dict[str, Any]) -> str:
        creds = self._tls_creds()
        if creds is None:
            return ""
        if not creds:
            return f"No TLS credentials with id '{self.settings.parameters['tls-creds']}'"
        expected = self.settings.parameters["tls-hostname"] or self._address.host
        if expected not in welcome.get("names", ()):
            return f"TLS handshake failed: Certificate does not match the hostname {expected}"
        return ""

    def _on_lost(self) -> None:
        self._link = None
        if self.status in ("setup", "active", "device"):
            self._fail(self._refusal or PEER_GONE)
        elif self.status == "pre-switchover":
            self._peer_lost = True
        elif self.status in ("postcopy-active", "postcopy-recover"):
            self._transfer.stop()
            self._set("postcopy-paused")

    def _drop_link(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None

    # --- pre-copy ---

    def _begin(self) -> None:
        now = self.clock.now()
        # The connection is a real one: its time is not scaled.
        self._setup_ms = ms((now - self._started) / self.clock.speed)
        self._active_since = self._last_sync = now
        self._sync()
        self._set("active")
        self._transfer.start(self.total, self.settings.bandwidth(self.knobs.link), self._round_done)
        if self._postcopy_wanted:
            asyncio.get_running_loop().call_soon(self._postcopy_now)

    def _round_done(self) -> None:
        if self.status != "active":
            return
        at = self._transfer.finished_at
        if at - self._active_since < FIRST_MEASURE_S:
            self._switch_over(0.0)
            return
        if self._postcopy_wanted:
            self._start_postcopy(0.0)  # its own sync is the pass
            return
        dirty = self._sync(at)
        if dirty <= self.settings.threshold(self.knobs.link):
            self._switch_over(dirty)
        else:
            rate = self.settings.bandwidth(self.knobs.link)
            self._transfer.start(dirty, rate, self._round_done, at)

    def _switch_over(self, remaining: float) -> None:
        self._final_bytes = remaining
        self._stopped_at = self.clock.now()
        self.machine.stop_for_migration()
        if self.settings["pause-before-switchover"]:
            self._set("pre-switchover")
        else:
            self._device()

    def _device(self) -> None:
        if self.status != "pre-switchover" and self.settings["pause-before-switchover"]:
            return  # cancelled meanwhile
        if self._postcopy_after_pause:
            if self._peer_lost or self._link is None:
                self._fail("")
            else:
                self._switch_to_postcopy(self._final_bytes)
            return
        if self.settings["pause-before-switchover"]:
            self._set("device")
        self._final_bytes += self._sync()
        if self._peer_lost or self._link is None:
            self._fail("")  # QEMU 7.2 records no error for a stream lost while paused
            return
        rate = self.settings.bandwidth(self.knobs.link)
        self._transfer.start(self._final_bytes, rate, self._all_sent)

    def _all_sent(self) -> None:
        if self._link is not None:
            self._link.send({"t": "complete"})

    def _completed(self) -> None:
        self._ended = self.clock.now()
        if not self._in_postcopy:
            self._downtime_ms = ms(self._ended - self._stopped_at)
        self._drop_link()
        self.machine.state = "postmigrate"
        self._set("completed")

    # --- post-copy ---

    def _postcopy_now(self) -> None:
        if self.status != "active" or not self._postcopy_wanted or self._in_postcopy:
            return
        self._start_postcopy(self._transfer.stop())

    def _start_postcopy(self, remaining: float) -> None:
        """Switch to post-copy with `remaining` bytes unsent before its sync. With
        pause-before-switchover, QEMU 7.2 stops in pre-switchover first, as for a pre-copy's
        completion, and goes postcopy-active only at migrate-continue."""
        self._stopped_at = self.clock.now()
        if self.settings["pause-before-switchover"]:
            self.machine.stop_for_migration()
            self._final_bytes, self._postcopy_after_pause = remaining, True
            self._set("pre-switchover")
            return
        self._in_postcopy = True
        self._set("postcopy-active")  # before its STOP, as QEMU 7.2 reports them
        self.machine.stop_for_migration()
        self._send_postcopy(remaining)

    def _switch_to_postcopy(self, remaining: float) -> None:
        """From pre-switchover, at migrate-continue: the guest stopped already."""
        self._in_postcopy = True
        self._set("postcopy-active")
        self._send_postcopy(remaining)

    def _send_postcopy(self, remaining: float) -> None:
        remaining += self._sync()
        self._postcopy_from = self._transfer.sent()
        if self._link is not None:
            self._link.send({"t": "postcopy"})
        # The guest is paused only until the destination is told to run it.
        self._downtime_ms = max(1, ms(self.clock.now() - self._stopped_at))
        rate = self.settings.postcopy_bandwidth(self.knobs.link)
        self._transfer.start(min(float(self.total), remaining), rate, self._all_sent)

    def _paused(self) -> None:
        if self.status != "postcopy-active":
            return
        self._drop_link()
        self._transfer.stop()
        self._set("postcopy-paused")

    def _resumed(self) -> None:
        self._resuming = False
        self._set("postcopy-recover")
        self._set("postcopy-active")
        if self._transfer.left() > 0:
            self._transfer.resume(self.settings.postcopy_bandwidth(self.knobs.link))
        else:
            self._all_sent()

    # --- endings ---

    def _halt(self) -> None:
        self._transfer.stop()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def _cancelled(self, runstate: str) -> None:
        self._drop_link()
        if self.machine.state == "finish-migrate":
            self.machine.state = runstate
        self._ended = self.clock.now()
        self._set("cancelled")

    def _fail(self, desc: str) -> None:
        self._halt()
        self._drop_link()
        self.error_desc, self._ended = desc, self.clock.now()
        self._set("failed")
        self.machine.restart_after_failed_migration()
