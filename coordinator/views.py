"""Read views: the committed world as public messages, made once per change and shared.

Every read (List*, Get*, WatchMigration) is served from here, never under the coordinator's
lock: a view is taken while the world is exactly the log (no commit in flight) and is immutable
from then on, so readers and watchers, however many, never hold up the folding and committing of
host events. A view is keyed by the world's last seq: fifty watchers of one migration woken by
the same commit convert it once, and a ListMigrations loop gets the same response message,
built once per change, not once per call (building it copies every migration's message).

Reads also keep out of a guest's pause: each waits at the coordinator's read gate
(`coordinator.read_gate`), shut while a migration is in its switchover, before it is served.

Errors: NotFound (coordinator.core) for an unknown migration or VM.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from coordinator import convert
from coordinator.app import Coordinator
from coordinator.core import NotFound, Phase, World, scheduling
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
        self._lists: dict[object, object] = {}

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

    def _list(self, key: object, make: Callable[[], T]) -> T:
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

    async def migration_list(
        self, vm: str = "", open_only: bool = False
    ) -> migration_pb2.ListMigrationsResponse:
        """ListMigrations' answer: every migration (of `vm`, if given; only open ones, if
        `open_only`), newest request first. The answers for every VM are shared until the next
        change; one for a single VM is built per call (a cache keyed by whatever name callers
        send would grow with what they send)."""
        migrations = await self.migrations()

        def make() -> migration_pb2.ListMigrationsResponse:
            return migration_pb2.ListMigrationsResponse(
                migrations=[
                    m
                    for m in migrations
                    if (not vm or m.vm == vm) and (not open_only or not Phase(m.phase).terminal)
                ]
            )

        if vm:
            return make()
        return self._list(("migration_list", open_only), make)

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

    async def vm_list(self) -> vm_pb2.ListVmsResponse:
        """ListVms' answer, shared until the next change."""
        vms = await self.vms()
        return self._list("vm_list", lambda: vm_pb2.ListVmsResponse(vms=vms))

    async def hosts(self) -> list[host_pb2.Host]:
        """Every host, by id."""
        world = await self._world()

        def make() -> list[host_pb2.Host]:
            return [convert.host_to_proto(world, world.hosts[h]) for h in sorted(world.hosts)]

        return self._list("hosts", make)

    async def host_list(self) -> host_pb2.ListHostsResponse:
        """ListHosts' answer, shared until the next change."""
        hosts = await self.hosts()
        return self._list("host_list", lambda: host_pb2.ListHostsResponse(hosts=hosts))
