"""Migration streams over TLS with real QEMU: pre-copy and post-copy run over TLS (a relay in the
path sees only TLS handshakes), a destination that is not a host of the cluster or speaks
plaintext is refused and the migration rolls back, and the peers a command names are the only
ones either end accepts. Post-copy recovery over TLS: tests/qemu/test_postcopy_recovery.py."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostd.drivers.lease import FileLeaseDriver
from hostd.drivers.network import NullNetworkDriver
from hostd.executor import Executor
from hostd.migration_tls import MigrationTls
from tests.qemu.scenario import PHASE, assert_outcome, start_migration
from tools.cluster import Cluster
from tools.tcp_proxy import TLS_HANDSHAKE, TcpProxy
from whimbrel import pki
from whimbrel.v1 import common_pb2, events_pb2, host_pb2, migration_pb2

pytestmark = pytest.mark.qemu
K = events_pb2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def behind_relays(tmp_path: Path, *hosts: str) -> Iterator[tuple[Cluster, dict[str, TcpProxy]]]:
    """A cluster whose hosts take incoming migrations through a relay each."""
    with contextlib.ExitStack() as stack:
        cluster = Cluster(tmp_path)
        relays: dict[str, TcpProxy] = {}
        for host in hosts:
            port = free_port()
            relays[host] = stack.enter_context(TcpProxy(port))
            cluster.hostd_args[host] = ["--migration-port", str(port),
                "--migration-advertise", f"127.0.0.1:{relays[host].port}"]  # fmt: skip
        try:
            yield cluster.start(*hosts), relays
        finally:
            cluster.teardown()


def migrate(cluster: Cluster, migration_id: str, to: str, mode: int) -> migration_pb2.Migration:
    cluster.migrations.StartMigration(migration_pb2.StartMigrationRequest(
        vm="vm-1", destination=to, mode=mode, migration_id=migration_id))  # fmt: skip
    return cluster.watch(migration_id)


def test_precopy_and_postcopy_run_over_tls(tmp_path: Path) -> None:
    """A pre-copy there and a post-copy back complete, and every migration stream the relays
    carried opened with a TLS handshake (QEMU's plaintext stream opens with its magic)."""
    with behind_relays(tmp_path, "host-a", "host-b") as (cluster, relays):
        cluster.define_and_start("vm-1", "host-a")
        there = migrate(cluster, "m-1", "host-b", common_pb2.MIGRATION_MODE_PRECOPY)
        back = migrate(cluster, "m-2", "host-a", common_pb2.MIGRATION_MODE_POSTCOPY)
        assert (there.phase, back.phase) == (PHASE.MIGRATION_PHASE_COMPLETED,) * 2
        assert back.postcopy
        openings = relays["host-b"].openings + relays["host-a"].openings
        assert len(openings) >= 2 and all(o.startswith(TLS_HANDSHAKE) for o in openings)


@pytest.mark.parametrize("destination", ["plaintext", "user-certificate"])
def test_refused_destination_rolls_back(tmp_path: Path, destination: str) -> None:
    """A destination that speaks plaintext, or presents a certificate of the cluster's CA that
    is not a host's (a user's), fails the source's TLS handshake: the migration rolls back and
    the VM runs on at the source."""
    cluster = Cluster(tmp_path)
    if destination == "plaintext":
        cluster.hostd_args["host-b"] = ["--no-migration-tls"]
    try:
        cluster.start("host-a", "host-b")
        if destination == "user-certificate":
            user = cluster.identity("user", "mallory")
            for role in ("server", "client"):
                shutil.copy(user.cert, tmp_path / "host-b" / "migration-tls" / f"{role}-cert.pem")
                shutil.copy(user.key, tmp_path / "host-b" / "migration-tls" / f"{role}-key.pem")
        cluster.define_and_start("vm-1", "host-a")
        start_migration(cluster, common_pb2.MIGRATION_MODE_PRECOPY)
        final = assert_outcome(cluster, PHASE.MIGRATION_PHASE_ROLLED_BACK, runs_on="host-a")
        # The refused destination's QEMU gives up on the stream and exits as the source's
        # handshake fails: whichever the coordinator hears of first is the reason.
        assert final.reason == "destination QEMU exited" or final.reason.startswith(
            "source migration failed in QEMU: "), final.reason  # fmt: skip
        # Either way the source's failure is on record in QEMU's own words (its error-desc
        # names TLS or the peer's certificate).
        source_errors = [
            e.payload.error_desc
            for e in cluster.events()
            if e.origin_host == "host-a"
            and isinstance(e.payload, K.MigrationStatsSampled)
            and e.payload.error_desc
        ]
        assert source_errors, "the source's failure was not logged"
        words = ("tls", "certificate")
        assert any(w in error.lower() for error in source_errors for w in words), source_errors
    finally:
        cluster.teardown()


# --- the peers a command names (the coordinator names none yet), hostd on its own ---


class Host:
    """One host's executor with migration TLS, as hostd builds it."""

    def __init__(self, root: Path, host_id: str) -> None:
        async def emit(payload: object, time_us: int) -> None:
            return None

        files = pki.ensure(root / "pki", "host", host_id).files
        state = root / host_id
        self.executor = Executor(
            host_id, state, "127.0.0.1", FileLeaseDriver(root / "locks"), NullNetworkDriver(),
            emit, migration_tls=MigrationTls.install(files, state / "migration-tls", host_id),
        )  # fmt: skip

    async def run(self, kind: int, **args: Any) -> events_pb2.CommandResult:
        command = host_pb2.Command(
            command_id=f"c-{id(args)}", vm="vm-1", kind=events_pb2.CommandKind.ValueType(kind),
            args=events_pb2.CommandArgs(**args),
        )  # fmt: skip
        return await self.executor.run(command)

    async def migration(self) -> dict[str, Any]:
        """query-migrate once the migration has ended."""
        for _ in range(300):
            info: dict[str, Any] = await self.executor.vms["vm-1"].execute("query-migrate")
            if info.get("status") in ("completed", "failed"):
                return info
            await asyncio.sleep(0.1)
        raise AssertionError(f"migration still {info.get('status')}")

    async def close(self) -> None:
        for runtime in list(self.executor.vms.values()):
            await runtime.kill("test over")
            await runtime.close()


async def test_only_the_named_peers_are_accepted(tmp_path: Path) -> None:
    """A source that names another destination refuses this one (its certificate does not
    name it); a destination that names another source refuses this one (tls-authz); both
    named right, the migration completes."""
    pki.init(tmp_path / "pki")
    source, destination = Host(tmp_path, "host-a"), Host(tmp_path, "host-b")
    spec = common_pb2.VmSpec(name="vm-1", memory_mib=32, vcpus=1)
    try:
        await source.run(K.COMMAND_KIND_START_VM, spec=spec, lease_generation=1)
        for wanted_source, wanted_destination, outcome in (
            ("host-a", "host-c", "failed"),
            ("host-c", "host-b", "failed"),
            ("host-a", "host-b", "completed"),
        ):
            prepared = await destination.run(
                K.COMMAND_KIND_PREPARE_INCOMING, spec=spec, peer_host=wanted_source
            )
            await source.run(
                K.COMMAND_KIND_START_MIGRATION, uri=prepared.uri, peer_host=wanted_destination
            )
            info = await source.migration()
            assert info["status"] == outcome, (wanted_source, wanted_destination, info)
            if wanted_destination == "host-c":
                assert "does not match the hostname host-c" in info["error-desc"]
            await destination.run(K.COMMAND_KIND_DESTROY_VM, force=True)
    finally:
        await source.close()
        await destination.close()
