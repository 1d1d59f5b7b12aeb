"""Finding what a request names, or the `CoreError` that says why it cannot be used."""

from __future__ import annotations

from coordinator.core.errors import HostUnavailable, IllegalTransition, NotFound
from coordinator.core.state import HostState, MigrationState, VmState, World
from coordinator.core.validate import check_migration_id, check_name


def find_vm(world: World, name: str) -> VmState:
    check_name("VM", name)
    vm = world.vms.get(name)
    if vm is None:
        raise NotFound("VM", name)
    return vm


def find_migration(world: World, migration_id: str) -> MigrationState:
    check_migration_id(migration_id)
    m = world.migrations.get(migration_id)
    if m is None:
        raise NotFound("migration", migration_id)
    return m


def find_host(world: World, host_id: str) -> HostState:
    check_name("host", host_id)
    host = world.hosts.get(host_id)
    if host is None:
        raise NotFound("host", host_id)
    return host


def require_connected(world: World, host_id: str) -> None:
    if not find_host(world, host_id).connected:
        raise HostUnavailable(host_id)


def is_connected(world: World, host_id: str) -> bool:
    host = world.hosts.get(host_id)
    return host is not None and host.connected


def refuse_cordoned(world: World, host_id: str, action: str) -> None:
    """A cordoned host takes no new VM: `action` ("start VM vm-1 on") is refused."""
    host = world.hosts.get(host_id)
    if host is not None and host.cordoned:
        found = f"cordoned ({host.cordon_reason})" if host.cordon_reason else "cordoned"
        raise IllegalTransition(f"host {host_id}", action, found, ["uncordoned"])
