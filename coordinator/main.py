"""whimbrel-coordinator: serve the whimbrel.v1 services over one event log.

    whimbrel-coordinator --db PATH [--listen HOST:PORT] [--metrics-listen [HOST:]PORT]
                         [--otlp-endpoint URL]
                         [--tls-cert FILE --tls-key FILE --tls-ca FILE [--authz FILE]]
                         [--insecure] [--max-receive-message-bytes BYTES]
                         [--max-send-message-bytes BYTES] [--max-concurrent-rpcs N]
                         [--host-queue-events N] [--read-batch-bytes BYTES]

With TLS material every call needs a client certificate of the cluster's CA and is authorized
per RPC (`coordinator.authz`; roles from --authz, reloaded on SIGHUP). Without it the
coordinator serves loopback only: a non-loopback --listen exits 2 unless --insecure is given.

On start it replays the log and appends a new epoch before serving. SIGTERM and SIGINT stop it
gracefully (exit 0). If a newer coordinator takes over the same log, this one stops itself
(exit 3): its epoch is stale and it may neither append nor command hosts.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coordinator import checkpoint, servicers
from coordinator.app import Coordinator
from coordinator.authz import AuthzError, AuthzInterceptor, Roles
from coordinator.limits import MIB, Limits
from coordinator.log import SqliteEventStore, StoreError
from coordinator.malformed import MalformedRequests
from coordinator.paging import PAGE_BYTES
from coordinator.telemetry.setup import MetricsServer, coordinator_telemetry
from coordinator.views import Views
from coordinator.watch_slots import WatchSlots
from whimbrel import heap, priority
from whimbrel.otel import add_otlp_flag
from whimbrel.tls import TlsError, TlsFiles, add_tls_flags, server_credentials, tls_files
from whimbrel.v1 import (
    eventlog_pb2,
    eventlog_pb2_grpc,
    host_pb2,
    host_pb2_grpc,
    migration_pb2,
    migration_pb2_grpc,
    vm_pb2,
    vm_pb2_grpc,
)

log = logging.getLogger("whimbrel.coordinator")
EXIT_FENCED = 3
SERVICE_NAMES = [
    migration_pb2.DESCRIPTOR.services_by_name["MigrationService"].full_name,
    vm_pb2.DESCRIPTOR.services_by_name["VmService"].full_name,
    host_pb2.DESCRIPTOR.services_by_name["HostService"].full_name,
    eventlog_pb2.DESCRIPTOR.services_by_name["EventLogService"].full_name,
]


def build_server(
    app: Coordinator,
    listen: str,
    tls: TlsFiles | None = None,
    roles: Roles | None = None,
    limits: Limits | None = None,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """The gRPC server of `app` on `listen`: mutual TLS and per-RPC roles with `tls`, plaintext
    without (raises TlsError when the TLS files are unusable), within `limits`."""
    limits = limits or Limits()
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if tls is not None:
        interceptors.append(
            AuthzInterceptor(
                roles if roles is not None else Roles(),
                lambda method, code: app.telemetry.refused(method, code.name),
            )
        )
    interceptors.append(MalformedRequests())  # inside the role check
    credentials = server_credentials(tls) if tls is not None else None
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            # hostd pings every second to notice a hung coordinator; let it.
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 500),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_ping_strikes", 0),
            *limits.server_options(),
        ],
        maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
    )
    # Every reader shares one cache of the committed world's views, and one count of watches.
    views = Views(app)
    watches = WatchSlots(limits.max_watch_streams, limits.max_watch_streams_per_caller)
    # A list's page fits in what a response may carry, with room for the rest of it.
    page_bytes = min(PAGE_BYTES, limits.max_send_bytes // 2)
    migration_pb2_grpc.add_MigrationServiceServicer_to_server(
        servicers.MigrationServicer(app, views, watches, page_bytes), server
    )
    vm_pb2_grpc.add_VmServiceServicer_to_server(
        servicers.VmServicer(app, views, page_bytes), server
    )
    host_pb2_grpc.add_HostServiceServicer_to_server(
        servicers.HostServicer(app, views, limits.host_queue_events), server
    )
    eventlog_pb2_grpc.add_EventLogServiceServicer_to_server(
        servicers.EventLogServicer(app, limits, watches), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    try:
        if credentials is not None:
            port = server.add_secure_port(listen, credentials)
        else:
            port = server.add_insecure_port(listen)
    except RuntimeError:  # grpc reports a failed bind this way (or with port 0)
        port = 0
    return server, port, health_servicer


async def start_server(
    app: Coordinator,
    listen: str,
    tls: TlsFiles | None = None,
    roles: Roles | None = None,
    limits: Limits | None = None,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Build, start and mark every service SERVING."""
    server, port, health_servicer = build_server(app, listen, tls, roles, limits)
    if not port:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    await set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer


async def set_health(servicer: health.aio.HealthServicer, status: int) -> None:
    for name in ["", *SERVICE_NAMES]:
        await servicer.set(name, status)


async def serve(
    db: str,
    listen: str,
    ready: asyncio.Future[int] | None = None,
    metrics_listen: str | None = None,
    otlp_endpoint: str | None = None,
    host_wait: float = 30.0,
    checkpoint_every: int = 100_000,
    tls: TlsFiles | None = None,
    roles: Roles | None = None,
    limits: Limits | None = None,
) -> int:
    store = SqliteEventStore(db)
    app = Coordinator(
        store,
        host_wait=host_wait,
        checkpoint_path=checkpoint.path_for(Path(db)),
        checkpoint_every=checkpoint_every,
    )
    # Bind before taking the log: a start refused for its address leaves no trace in it.
    try:
        server, port, health_servicer = build_server(app, listen, tls, roles, limits)
    except TlsError as err:
        log.error("cannot start: %s", err)
        await asyncio.to_thread(store.close)
        return 2
    problem = "" if port else f"cannot listen on {listen}"
    metrics_server: MetricsServer | None = None
    if not problem:
        try:
            app.telemetry, metrics_server = coordinator_telemetry(
                otlp_endpoint, metrics_listen, lambda: app.world
            )
        except OSError as err:
            problem = f"cannot serve metrics on {metrics_listen}: {err}"
    waiting_said = False

    def waiting() -> None:
        nonlocal waiting_said
        if not waiting_said:  # one line on stdout, for supervisors and tests
            print("whimbrel-coordinator waiting for the log's write lock", flush=True)
            waiting_said = True

    app.waiting_for_lock = waiting
    if not problem:
        try:
            await app.start()
        except StoreError as err:
            problem = str(err)
    if problem:
        log.error("cannot start: %s", problem)
        await server.stop(None)
        if metrics_server is not None:
            metrics_server.close()
        await asyncio.to_thread(store.close)
        return 2
    await server.start()
    await set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
    log.info("listening on %s (port %d), log %s", listen, port, db)
    if metrics_server is not None:
        log.info("metrics on http://%s/metrics", metrics_listen)
    metrics_note = f", metrics on port {metrics_server.port}" if metrics_server else ""
    print(f"whimbrel-coordinator listening on port {port}{metrics_note}", flush=True)
    if ready is not None:
        ready.set_result(port)
    heap.freeze_startup_objects()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if roles is not None:
        loop.add_signal_handler(signal.SIGHUP, roles.reload)
    stopped = asyncio.create_task(stop.wait(), name="signal-wait")
    fenced = asyncio.create_task(app.fenced.wait(), name="fence-wait")
    await asyncio.wait([stopped, fenced], return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if fenced.done():
        log.error("stopping (epoch %d): %s", app.world.epoch, app.stop_reason)
        code = EXIT_FENCED
    else:
        log.info("stopping on signal")
    await set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(grace=5)
    for task in (stopped, fenced):
        task.cancel()
    await app.close()
    app.telemetry.shutdown()  # exports the spans still batched
    if metrics_server is not None:
        metrics_server.close()
    await asyncio.to_thread(store.close)
    return code


def listen_address(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT with a port in 0..65535")
    return value


def is_loopback(listen: str) -> bool:
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def metrics_address(value: str) -> str:
    """HOST:PORT, or a bare PORT (or :PORT) served on loopback."""
    if value.lstrip(":").isdigit():
        value = f"127.0.0.1:{value.lstrip(':')}"
    return listen_address(value)


def positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer")
    return number


def add_limit_flags(parser: argparse.ArgumentParser) -> None:
    default = Limits()
    group = parser.add_argument_group("limits (see coordinator.limits)")
    group.add_argument(
        "--max-receive-message-bytes", type=positive, metavar="BYTES",
        default=default.max_receive_bytes,
        help="refuse larger messages with RESOURCE_EXHAUSTED (default %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--max-send-message-bytes", type=positive, metavar="BYTES",
        default=default.max_send_bytes, help="largest message sent (default %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--max-concurrent-rpcs", type=positive, metavar="N",
        default=default.max_concurrent_rpcs,
        help="calls served at once, host streams and watchers included; more are refused "
        "with RESOURCE_EXHAUSTED (default %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--max-watch-streams", type=positive, metavar="N", default=default.max_watch_streams,
        help="of those, watch streams open at once (events --follow, migration watch); more "
        "are refused with RESOURCE_EXHAUSTED (default %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--max-watch-streams-per-caller", type=positive, metavar="N",
        default=default.max_watch_streams_per_caller,
        help="of those, one caller's (one certificate's) (default %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--host-queue-events", type=positive, metavar="N", default=default.host_queue_events,
        help="a host's events read and not yet folded; when full its stream is not read "
        "until there is room (default %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--read-batch-bytes", type=positive, metavar="BYTES",
        default=default.read_batch_bytes,
        help=f"payload bytes one ReadEvents read takes from the log (default %(default)s = "
        f"{default.read_batch_bytes // MIB} MiB)",
    )  # fmt: skip


def limits_from(args: argparse.Namespace) -> Limits:
    return Limits(
        max_receive_bytes=args.max_receive_message_bytes,
        max_send_bytes=args.max_send_message_bytes,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_watch_streams=args.max_watch_streams,
        max_watch_streams_per_caller=args.max_watch_streams_per_caller,
        host_queue_events=args.host_queue_events,
        read_batch_bytes=args.read_batch_bytes,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="whimbrel-coordinator", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--db", required=True, help="path of the SQLite event log")
    parser.add_argument(
        "--listen",
        default="127.0.0.1:7700",
        type=listen_address,
        help="gRPC address HOST:PORT (default %(default)s; port 0 picks a free one)",
    )
    parser.add_argument(
        "--host-wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="after a restart, how long to wait for the hosts of open migrations before the "
        "recovery table treats them as missing (default %(default)s)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=100_000,
        metavar="EVENTS",
        help="write a checkpoint of the derived state (DB.checkpoint) every this many events, "
        "so a restart folds only the tail of the log; 0: never (default %(default)s)",
    )
    parser.add_argument(
        "--metrics-listen",
        type=metrics_address,
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (HOST: 127.0.0.1 if omitted)",
    )
    add_tls_flags(parser)
    parser.add_argument(
        "--authz",
        type=Path,
        metavar="FILE",
        help="users' roles (TOML: viewer/operator/admin = [names]); reloaded on SIGHUP. "
        "Needs TLS; without it no user has a role",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --listen without TLS (anyone who reaches it can do anything)",
    )
    add_limit_flags(parser)
    add_otlp_flag(parser)
    priority.add_priority_flag(parser)
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    tls = tls_files(args, parser)
    roles = None
    if tls is None:
        if args.authz is not None:
            log.error("--authz needs --tls-cert, --tls-key and --tls-ca")
            return 2
        if not is_loopback(args.listen):
            if not args.insecure:
                log.error(
                    "refusing to serve %s without TLS: give --tls-cert, --tls-key and "
                    "--tls-ca (or --insecure to accept that anyone who reaches it controls "
                    "every host)",
                    args.listen,
                )
                return 2
            log.warning(
                "INSECURE: serving %s without TLS; anyone who reaches it controls every host",
                args.listen,
            )
        else:
            log.info("no TLS material: serving loopback only (%s), without authentication",
                     args.listen)  # fmt: skip
    else:
        try:
            roles = Roles.load(args.authz) if args.authz is not None else Roles()
        except AuthzError as err:
            log.error("%s", err)
            return 2
        log.info("mutual TLS: clients need a certificate of %s; roles from %s", args.tls_ca,
                 args.authz or "nowhere")  # fmt: skip
        if args.authz is None:
            log.warning("no --authz: users have no role (only hosts, health and reflection)")
    priority.apply(args.cpu_priority, args.realtime_priority)
    try:
        return asyncio.run(
            serve(
                args.db,
                args.listen,
                metrics_listen=args.metrics_listen,
                otlp_endpoint=args.otlp_endpoint,
                host_wait=args.host_wait,
                checkpoint_every=args.checkpoint_every,
                tls=tls,
                roles=roles,
                limits=limits_from(args),
            )
        )
    except OSError as err:  # e.g. the database path is unusable
        log.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
