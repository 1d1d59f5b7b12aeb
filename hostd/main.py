"""whimbrel-hostd: run one host's VMs for a Whimbrel coordinator.

    whimbrel-hostd --host-id ID --coordinator HOST:PORT --state-dir DIR --lockspace DIR
                   [--migration-address IP] [--migration-port PORT]
                   [--migration-advertise IP[:PORT]] [--network none|hook|bridge]
                   [--network-hook PATH]
                   [--allow-disk-root DIR]... [--allow-kernel-root DIR]...
                   [--allow-block-devices] [--allow-bridge NAME]...
                   [--qemu-user USER]
                   [--otlp-endpoint URL]
                   [--tls-cert FILE --tls-key FILE --tls-ca FILE] [--no-migration-tls]

QEMU processes outlive hostd; a restarted hostd re-attaches to them. SIGTERM stops hostd
(exit 0) and leaves the VMs running. An agent that fails ends hostd (exit 1), to be restarted.

With TLS material, migration streams are TLS too (hostd/migration_tls.py): QEMU gets this
host's certificate (copied into STATE-DIR/migration-tls/), verifies the peer's, and a source
accepts only a destination whose certificate names it (the host the coordinator names, or any
host of the cluster when it names none). The certificate must carry the DNS names whimbrel-pki
gives host certificates (ID and hosts.whimbrel). Both ends of a migration must agree: a source
on TLS and a plaintext destination fail the migration, which rolls back.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import signal
import sys
from pathlib import Path

from hostd import capacity, tracing
from hostd.agent import Agent
from hostd.drivers.network import (
    DEFAULT_PHASE_TIMEOUT_S,
    BridgeNetworkDriver,
    HookNetworkDriver,
    NetworkDriver,
    NullNetworkDriver,
)
from hostd.errors import CommandRejected
from hostd.guard import Guard, check_migration_uri
from hostd.migration_tls import MigrationTls
from whimbrel import heap, priority, validate
from whimbrel.otel import add_otlp_flag, otlp_endpoint
from whimbrel.tls import TlsError, TlsFiles, add_tls_flags, tls_files
from whimbrel.v1 import common_pb2

log = logging.getLogger("whimbrel.hostd")
MIGRATION_TLS_HELP = (
    "Migration TLS: with --tls-cert/--tls-key/--tls-ca, migrations (pre-copy, post-copy and "
    "post-copy recovery) run over TLS. hostd copies the material into "
    "STATE-DIR/migration-tls/ (keys 0600); QEMU loads it when it starts, before it drops to "
    "--qemu-user, and verifies the peer: the source accepts only a destination whose "
    "certificate names the destination host (any host of the cluster while the coordinator "
    "names none), the destination only a host's certificate. The certificate must carry the "
    "DNS names whimbrel-pki gives host certificates (ID and hosts.whimbrel), or hostd exits 2. "
    "Both ends must agree: TLS against plaintext fails the migration, which rolls back."
)


def _positive(text: str) -> int:
    value = int(text)
    if not 0 < value < 1 << 32:
        raise argparse.ArgumentTypeError(f"{text}: a whole number from 1 up")
    return value


def check_names_of_host(ns: argparse.Namespace) -> None:
    """This host's own settings follow the rules it holds commands to."""
    validate.check_name("host", ns.host_id)
    if ns.migration_advertise:
        advertise = ns.migration_advertise
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(advertise.strip("[]"))
            advertise += ":1"  # an address alone: the port is chosen per migration
        check_migration_uri(f"tcp:{advertise}")
    check_migration_uri(f"tcp:{ns.migration_address}:1")


def network_driver(ns: argparse.Namespace) -> NetworkDriver:
    if ns.network == "hook":
        if not ns.network_hook:
            raise SystemExit("--network hook needs --network-hook PATH")
        return HookNetworkDriver(Path(ns.network_hook), ns.host_id, ns.network_timeout)
    if ns.network == "bridge":
        return BridgeNetworkDriver(ns.host_id, ns.netns or "", ns.network_timeout)
    return NullNetworkDriver()


async def serve(
    ns: argparse.Namespace, tls: TlsFiles | None = None, migration: MigrationTls | None = None
) -> int:
    endpoint = otlp_endpoint(ns.otlp_endpoint)
    provider = tracing.setup(endpoint, ns.host_id) if endpoint else None
    try:
        return await _serve(ns, tls, migration)
    finally:
        if provider is not None:
            provider.shutdown()  # type: ignore[attr-defined]  # exports what is batched


async def _serve(
    ns: argparse.Namespace, tls: TlsFiles | None, migration: MigrationTls | None
) -> int:
    def read_capacity() -> common_pb2.HostCapacity:
        return capacity.capacity(ns.capacity_memory_mib, ns.capacity_vcpus)

    agent = Agent(
        ns.host_id,
        ns.coordinator,
        Path(ns.state_dir),
        Path(ns.lockspace),
        ns.migration_address,
        network_driver(ns),
        migration_port=ns.migration_port,
        migration_advertise=ns.migration_advertise or "",
        netns=ns.netns or "",
        tls=tls,
        guard=Guard.of(
            ns.allow_disk_root, ns.allow_bridge, ns.allow_block_devices, ns.allow_kernel_root
        ),
        qemu_user=ns.qemu_user or "",
        capacity=read_capacity(),
    )
    agent.executor.migration_tls = migration
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stopping.set)
    heap.freeze_startup_objects()
    runner = asyncio.create_task(agent.run(), name="hostd-agent")
    capacity_watch = asyncio.create_task(
        capacity.watch(read_capacity, agent.report_capacity, agent.stopping), name="capacity"
    )
    failure = await _until_stopped(agent, runner)
    await capacity_watch
    await agent.close()
    return 0 if failure is None else 1


async def _until_stopped(agent: Agent, runner: asyncio.Task[None]) -> BaseException | None:
    """Wait for a stop (a signal) or for the agent's task to end; then stop it, and return
    the error it ended with, if any. A hostd whose agent died would otherwise stay up without
    ever connecting, and its supervisor would see nothing to restart."""
    stopped = asyncio.create_task(agent.stopping.wait(), name="hostd-stopping")
    await asyncio.wait((runner, stopped), return_when=asyncio.FIRST_COMPLETED)
    agent.stopping.set()
    await stopped
    runner.cancel()
    await asyncio.wait((runner,))
    failure = None if runner.cancelled() else runner.exception()
    if failure is not None:
        log.error("the agent failed, hostd exits: %r", failure, exc_info=failure)
    return failure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="whimbrel-hostd", description=__doc__.split("\n")[0], epilog=MIGRATION_TLS_HELP
    )
    parser.add_argument("--host-id", required=True)
    parser.add_argument(
        "--coordinator",
        default="127.0.0.1:7700",
        type=validate.coordinator_addresses,
        help="HOST:PORT, or several comma-separated (tried in turn: a standby coordinator)",
    )
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--lockspace", required=True, help="directory on storage shared by hosts")
    parser.add_argument(
        "--migration-address",
        default="127.0.0.1",
        help="IP this host accepts incoming migrations on",
    )
    parser.add_argument(
        "--migration-port",
        type=int,
        default=0,
        help="fixed port incoming migrations listen on (default: a free port each time; a "
        "fixed port serves one incoming migration at a time)",
    )
    parser.add_argument(
        "--migration-advertise",
        metavar="IP[:PORT]",
        help="address sources are told to connect to, when it differs from where QEMU "
        "listens (NAT, a relay); an IP address, since sources accept no host names",
    )
    parser.add_argument("--network", choices=["none", "hook", "bridge"], default="none")
    parser.add_argument("--network-hook", help="executable run with the phase (hook driver)")
    parser.add_argument(
        "--network-timeout",
        type=validate.positive_seconds,
        default=DEFAULT_PHASE_TIMEOUT_S,
        metavar="SECONDS",
        help="a network phase (hook or ip) still running after this is killed and fails "
        f"(default {DEFAULT_PHASE_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--netns",
        help="network namespace the VMs live in: QEMU runs there, with its taps, their "
        "bridges and its migration traffic (--migration-address is an address there)",
    )
    parser.add_argument(
        "--allow-disk-root",
        action="append",
        default=[],
        metavar="DIR",
        help="directory VM disks and memory files may be in (repeatable; resolved with "
        "realpath; none: VMs with disks are refused)",
    )
    parser.add_argument(
        "--allow-kernel-root",
        action="append",
        default=[],
        metavar="DIR",
        help="directory a direct-boot kernel and initrd may be in (repeatable; QEMU only "
        "reads them; none: VMs with a kernel are refused)",
    )
    parser.add_argument(
        "--allow-block-devices",
        action="store_true",
        help="let disks be block devices (under an allowed root), not only regular files",
    )
    parser.add_argument(
        "--allow-bridge",
        action="append",
        default=[],
        metavar="NAME",
        help="bridge a VM's NIC may name (repeatable)",
    )
    parser.add_argument("--qemu-user", help="user QEMU runs as (QEMU's -runas)")
    parser.add_argument(
        "--capacity-memory-mib",
        type=_positive,
        metavar="MIB",
        help="guest memory this host offers, reported for placement (default: all of the "
        "machine's)",
    )
    parser.add_argument(
        "--capacity-vcpus",
        type=_positive,
        metavar="N",
        help="vCPUs this host offers, reported for placement (default: the machine's CPUs)",
    )
    add_otlp_flag(parser)
    add_tls_flags(parser)
    parser.add_argument(
        "--no-migration-tls",
        action="store_true",
        help="with TLS material, migrate in plaintext all the same (every host of the cluster "
        "must then; without TLS material migrations are plaintext anyway)",
    )
    priority.add_priority_flag(parser)
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    ns = parser.parse_args(argv)
    tls = tls_files(ns, parser)
    if tls is not None:
        try:
            tls.read()  # unusable material is a usage error now, not a retry loop later
        except TlsError as err:
            parser.error(str(err))
    try:
        check_names_of_host(ns)
    except (ValueError, CommandRejected) as err:
        parser.error(str(err))
    migration = None
    if tls is not None and not ns.no_migration_tls:
        try:
            migration = MigrationTls.install(tls, Path(ns.state_dir) / "migration-tls", ns.host_id)
        except (TlsError, OSError) as err:
            parser.error(str(err))
    log_format = f"%(asctime)s %(levelname)s hostd[{ns.host_id}] %(name)s: %(message)s"
    logging.basicConfig(level=ns.log_level, format=log_format)
    priority.apply(ns.cpu_priority, ns.realtime_priority)
    return asyncio.run(serve(ns, tls, migration))


if __name__ == "__main__":
    sys.exit(main())
