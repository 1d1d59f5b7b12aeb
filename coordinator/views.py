"""Read views: the committed world as public messages, made once per change and shared.

Every read (List*, Get*, WatchMigration) is served from here, never under the coordinator's
lock: a view is taken while the world is exactly the log (no commit in flight) and is immutable
from then on, so readers and watchers, however many, never hold up the folding and committing of
host events. A view is keyed by the world's last seq: fifty watchers of one migration woken by
the same commit convert it once, and a ListMigrations loop converts each migration once per
change, not once per call.

Reads also keep out of a guest's pause: each waits at the coordinator's read gate
(`coordinator.read_gate`), shut while a migration is in its switchover, before it is served.

Errors: NotFound (coordinator.core) for an unknown migration or VM.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from coordinator import convert
from coordinator.app import Coordinator
from coordinator.core import NotFound, World, scheduling
from whimbrel.v1 import host_pb2, migration_pb2, vm_pb2

__all__ = ["Views"]

T = TypeVar("T")


class Views:
    """Views of one coordinator's committed world (see the module's docstring)."""

    def __init__(self, app: Coordinator) -> None:
        self.app = app
        self._seq = -1
        self._migrations: dict[str, migration_pb2.Migration] = {}
        self._vms: dict[str, vm_pb2.Vm] = {}
        self._lists: dict[str, object] = {}

    async def quiet(self) -> None:
        """Return once the read gate is open: no migration is in its switchover, or the gate
        has been shut for as long as it may be."""
        await self.app.read_gate.opened()

    async def _world(self) -> World:
        """The committed world, with the caches of its version. Use it before the next await."""
        while True:
            await self.quiet()
            async with self.app.reading() as world:
                # A commit landing while this waited for it may have shut the gate again.
                if not self.app.read_gate.is_open:
                    continue
                if world.last_seq != self._seq:
                    self._seq = world.last_seq
                    self._migrations.clear()
                    self._vms.clear()
                    self._lists.clear()
                return world

    def _list(self, key: str, make: Callable[[], T]) -> T:
        if key not in self._lists:
            self._lists[key] = make()
        return self._lists[key]  # type: ignore[return-value]

    def _queue(self, world: World) -> dict[str, tuple[int, str]]:
        return self._list("queue", lambda: scheduling.places(world))

    def _migration(self, world: World, migration_id: str) -> migration_pb2.Migration | None:
        view = self._migrations.get(migration_id)
        if view is None:
            m = world.migrations.get(migration_id)
            if m is None:
                return None
            view = self._migrations[migration_id] = convert.migration_to_proto(
                m, self._queue(world)
            )
        return view

    def _vm(self, world: World, name: str) -> vm_pb2.Vm | None:
        view = self._vms.get(name)
        if view is None:
            vm = world.vms.get(name)
            if vm is None:
                return None
            view = self._vms[name] = convert.vm_to_proto(vm)
        return view

    async def migration(self, migration_id: str) -> migration_pb2.Migration:
        world = await self._world()
        view = self._migration(world, migration_id)
        if view is None:
            raise NotFound("migration", migration_id)
        return view

    async def migrations(self) -> list[migration_pb2.Migration]:
        """Every migration, newest request first."""
        world = await self._world()

        def make() -> list[migration_pb2.Migration]:
            ordered = sorted(
                world.migrations.values(), key=lambda m: m.requested_at_us, reverse=True
            )
            queue = self._queue(world)
            return [convert.migration_to_proto(m, queue) for m in ordered]

        return self._list("migrations", make)

    async def vm(self, name: str) -> vm_pb2.Vm:
        world = await self._world()
        view = self._vm(world, name)
        if view is None:
            raise NotFound("VM", name)
        return view

    async def vms(self) -> list[vm_pb2.Vm]:
        """Every VM, by name."""
        world = await self._world()

        def make() -> list[vm_pb2.Vm]:
            return [convert.vm_to_proto(world.vms[name]) for name in sorted(world.vms)]

        return self._list("vms", make)

    async def hosts(self) -> list[host_pb2.Host]:
        """Every host, by id."""
        world = await self._world()

        def make() -> list[host_pb2.Host]:
            return [convert.host_to_proto(world, world.hosts[h]) for h in sorted(world.hosts)]

        return self._list("hosts", make)
