"""The migration QMP commands of one simulated VM: its outgoing side (`Source`), its incoming
side (`Destination`) and the settings both read. query-migrate shows the incoming side
overlaid by the outgoing one, as QEMU fills it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .cmdline import Launch
from .destination import Destination
from .knobs import Clock, Knobs
from .machine import Emit, Machine
from .settings import PARAMETERS, Settings
from .source import IN_PROGRESS, Source
from .wire import Command, QmpError, param

__all__ = ["Migration"]


class Migration:
    def __init__(
        self,
        launch: Launch,
        machine: Machine,
        knobs: Knobs,
        emit: Emit,
        exit_process: Callable[[int], None],
    ) -> None:
        self.settings = Settings()
        self.source = Source(launch, self.settings, machine, knobs, Clock(knobs.speed), emit)
        self.destination = Destination(launch, self.settings, machine, emit, exit_process)

    def query(self, _: dict[str, Any]) -> dict[str, Any]:
        return {**self.destination.info(), **self.source.info()}

    def set_capabilities(self, arguments: dict[str, Any]) -> dict[str, Any]:
        if self.source.status in IN_PROGRESS:
            raise QmpError("There's a migration process in progress")
        self.settings.set_capabilities(arguments["capabilities"])
        return {}

    def set_parameters(self, arguments: dict[str, Any]) -> dict[str, Any]:
        self.settings.set_parameters(arguments)
        self.source.parameters_changed()
        return {}

    def pause(self, _: dict[str, Any]) -> dict[str, Any]:
        if not (self.source.pause() or self.destination.pause()):
            raise QmpError("migrate-pause is currently only supported during postcopy-active state")
        return {}

    def shutdown(self) -> None:
        self.source.shutdown()
        self.destination.close()

    def commands(self) -> dict[str, Command]:
        uri = {"uri": param("string")}
        return {
            "query-migrate": Command(self.query),
            "query-migrate-capabilities": Command(lambda _: self.settings.query_capabilities()),
            "query-migrate-parameters": Command(lambda _: dict(self.settings.parameters)),
            "migrate-set-capabilities": Command(
                self.set_capabilities, {"capabilities": param("array")}
            ),
            "migrate-set-parameters": Command(
                self.set_parameters,
                {name: param(kind, required=False) for name, kind in PARAMETERS.items()},
            ),
            "migrate": Command(
                self.source.migrate,
                {
                    **uri,
                    **{
                        name: param("boolean", required=False)
                        for name in ("blk", "inc", "detach", "resume")
                    },
                },
            ),
            "migrate-incoming": Command(self.destination.migrate_incoming, uri),
            "migrate-start-postcopy": Command(self.source.start_postcopy),
            "migrate-continue": Command(self.source.continue_, {"state": param("string")}),
            "migrate_cancel": Command(self.source.cancel),
            "migrate-pause": Command(self.pause, oob=True),
            "migrate-recover": Command(self.destination.recover, uri, oob=True),
        }
