"""The simulated guest's run state and the QMP commands that act on it alone.

Run states are QEMU's names: `running`, `paused`, `prelaunch` (-S), `inmigrate` (-incoming),
`finish-migrate` (stopped by a migration), `postmigrate` (a completed source). QEMU quirks
kept on purpose (the design leans on them): `cont` on an `inmigrate` destination only arms
autostart; `cont` on a completed source runs it again; `cont` in `finish-migrate` fails.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .cmdline import Launch
from .wire import Command, QmpError, param

__all__ = ["Machine"]

Emit = Callable[[str, "dict[str, Any] | None"], None]
OBJECT_TYPES = frozenset(("authz-list", "authz-simple", "tls-creds-x509"))


class Machine:
    def __init__(self, launch: Launch, emit: Emit, shutdown: Callable[[str], None]) -> None:
        self.emit = emit
        self._shutdown = shutdown
        if launch.incoming:
            self.state = "inmigrate"
        else:
            self.state = "prelaunch" if launch.paused else "running"
        # Whether the guest starts by itself once an incoming migration has its state.
        self.autostart = not launch.paused
        # QOM objects added over QMP (authz lists the migration's TLS check reads), by id.
        self.objects: dict[str, dict[str, Any]] = {
            creds.id: {"qom-type": "tls-creds-x509"} for creds in launch.tls.values()
        }

    @property
    def running(self) -> bool:
        return self.state == "running"

    def start(self) -> None:
        """vm_start: RESUME, unless the guest runs already."""
        if self.state != "running":
            self.state = "running"
            self.emit("RESUME", None)

    def stop_for_migration(self) -> None:
        """The source stops to switch over (STOP, then finish-migrate)."""
        was_running = self.running
        self.state = "finish-migrate"
        if was_running:
            self.emit("STOP", None)

    def restart_after_failed_migration(self) -> None:
        """A failed or cancelled pre-copy source that had stopped runs again by itself."""
        if self.state == "finish-migrate":
            self.start()

    def incoming_loaded(self) -> None:
        """A destination has the source's state: it runs if autostart is armed, else pauses."""
        if self.state != "inmigrate":
            return
        if self.autostart:
            self.start()
        else:
            self.state = "paused"

    # --- commands ---

    def query_status(self, _: dict[str, Any]) -> dict[str, Any]:
        return {"status": self.state, "singlestep": False, "running": self.running}

    def cont(self, _: dict[str, Any]) -> dict[str, Any]:
        if self.state == "inmigrate":
            self.autostart = True
        elif self.state == "finish-migrate":
            raise QmpError("Migration is not finalized yet")
        else:
            self.start()
        return {}

    def stop(self, _: dict[str, Any]) -> dict[str, Any]:
        if self.state == "inmigrate":
            self.autostart = False
        elif self.running:
            self.state = "paused"
            self.emit("STOP", None)
        return {}

    def quit(self, _: dict[str, Any]) -> dict[str, Any]:
        self.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        self._shutdown("quit")
        return {}

    def announce_self(self, _: dict[str, Any]) -> dict[str, Any]:
        return {}  # no NIC is simulated: nothing to announce on

    def object_add(self, arguments: dict[str, Any]) -> dict[str, Any]:
        kind, ident = arguments.get("qom-type"), arguments.get("id")
        if not isinstance(kind, str):
            raise QmpError("Parameter 'qom-type' is missing")
        if not isinstance(ident, str):
            raise QmpError("Parameter 'id' is missing")
        if kind not in OBJECT_TYPES:
            raise QmpError(f"qmpsim does not simulate objects of type '{kind}'")
        if ident in self.objects:
            raise QmpError(
                f"attempt to add duplicate property '{ident}' to object (type 'container')"
            )
        self.objects[ident] = dict(arguments)
        return {}

    def object_del(self, arguments: dict[str, Any]) -> dict[str, Any]:
        if self.objects.pop(arguments["id"], None) is None:
            raise QmpError(f"object '{arguments['id']}' not found")
        return {}

    def commands(self) -> dict[str, Command]:
        announce = {
            name: param("integer", required=False) for name in ("initial", "max", "rounds", "step")
        }
        announce.update(interfaces=param("array", required=False), id=param("string", False))
        return {
            "query-status": Command(self.query_status),
            "cont": Command(self.cont),
            "stop": Command(self.stop),
            "quit": Command(self.quit),
            "announce-self": Command(self.announce_self, announce),
            "object-add": Command(self.object_add, params=None),
            "object-del": Command(self.object_del, {"id": param("string")}),
        }
