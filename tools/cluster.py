"""Real processes on loopback for tests and benchmarks: a coordinator, hostd processes, real
QEMU, real SQLite files; clients that wait on the log's follow stream rather than polling.

Every channel is mutual TLS unless `tls=False`: the cluster makes its PKI once in ROOT/pki
(`whimbrel.pki.ensure`), a certificate per hostd, and a user `admin` with the admin role
(ROOT/authz.toml) for its own clients; `client_tls_flags()` gives those to other programs.
Migrations then run over TLS too, unless WHIMBREL_MIGRATION_TLS=off (hostd's
--no-migration-tls on every host, for a benchmark's plaintext baseline)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc

from coordinator import codec
from coordinator.core import Event
from coordinator.log import SqliteEventStore
from tools.guest import boot_disk
from whimbrel import pki, tls
from whimbrel.v1 import (
    common_pb2,
    eventlog_pb2,
    eventlog_pb2_grpc,
    events_pb2,
    migration_pb2,
    migration_pb2_grpc,
    vm_pb2,
    vm_pb2_grpc,
)

BIN = Path(sys.executable).parent
HOOK = """#!/bin/sh
# Network hook for tests: records each phase with the host and a timestamp.
echo "$1 $2 $WHIMBREL_HOST $(date +%s%N)" >> "{log}"
"""


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    files: list[IO[bytes]] = field(default_factory=list)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        try:
            if self.popen.poll() is None:
                self.popen.send_signal(sig)
                try:
                    return self.popen.wait(10)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
            return self.popen.wait(10)
        finally:
            for f in self.files:
                f.close()
            if self.popen.stdout is not None:
                self.popen.stdout.close()


def spawn(
    name: str,
    args: list[str],
    log: Path,
    *,
    pipe_stdout: bool = False,
    env: dict[str, str] | None = None,
) -> Process:
    out = open(log, "ab")  # noqa: SIM115 - owned by the Process, closed in stop()
    stdout = subprocess.PIPE if pipe_stdout else out
    popen = subprocess.Popen(
        args,
        stdout=stdout,
        stderr=out if pipe_stdout else subprocess.STDOUT,
        env=dict(os.environ, **(env or {})),
    )
    return Process(name, popen, log, [out])


def tear_down_on_sigterm() -> None:
    """SIGTERM (a timeout, a cancelled job) stops this process as Ctrl-C does, through the
    teardowns of the clusters it runs: the QEMUs they start run in sessions of their own and
    would outlive it."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


@dataclass
class Cluster:
    root: Path
    address: str = ""
    processes: dict[str, Process] = field(default_factory=dict)
    channel: grpc.Channel | None = None
    # Extra environment for every process started (e.g. OTEL_* settings).
    env: dict[str, str] = field(default_factory=dict)
    # Extra coordinator flags (e.g. --metrics-listen).
    coordinator_args: list[str] = field(default_factory=list)
    # Port of the coordinator's Prometheus endpoint, when it serves one.
    metrics_port: int = 0
    # Extra hostd flags, per host (kept across restarts of that hostd).
    hostd_args: dict[str, list[str]] = field(default_factory=dict)
    # Mutual TLS on every channel (False: the coordinator's insecure loopback mode).
    tls: bool = True

    @property
    def db(self) -> Path:
        return self.root / "whimbrel.db"

    @property
    def shared(self) -> Path:
        return self.root / "shared"

    @property
    def hook_log(self) -> Path:
        return self.root / "network-hook.log"

    @property
    def pki_dir(self) -> Path:
        return self.root / "pki"

    def identity(self, kind: str, name: str = "") -> pki.Issued:
        """The certificate of a principal of this cluster ("host", "user", "coordinator")."""
        return pki.ensure(self.pki_dir, kind, name)

    def _tls_flags(self, kind: str, name: str = "") -> list[str]:
        return self.identity(kind, name).flags() if self.tls else []

    def client_tls_flags(self, user: str = "admin") -> list[str]:
        """The TLS flags of whimbrelctl or whimbrel-audit run as `user` (none without TLS)."""
        return self._tls_flags("user", user)

    def open_channel(self, address: str = "", user: str = "admin") -> grpc.Channel:
        """A client channel to `address` (the coordinator's by default) as `user`."""
        files = self.identity("user", user).files if self.tls else None
        return tls.channel(address or self.address, files)

    def start_coordinator(
        self,
        listen: str = "127.0.0.1:0",
        failpoints: str = "",
        on_waiting: Callable[[], None] | None = None,
    ) -> None:
        """Start a coordinator and wait until it serves. `on_waiting` is called if it reports
        waiting for the log's write lock (held by another coordinator)."""
        log = self.root / "coordinator.log"
        args = [str(BIN / "whimbrel-coordinator"), "--db", str(self.db), "--listen", listen,
                *self.coordinator_args]  # fmt: skip
        if self.tls:
            authz = self.root / "authz.toml"
            if not authz.exists():
                authz.write_text('admin = ["admin"]\n')
            args += [*self._tls_flags("coordinator"), "--authz", str(authz)]
        env = dict(self.env, WHIMBREL_FAILPOINTS=failpoints) if failpoints else self.env
        process = spawn("coordinator", args, log, pipe_stdout=True, env=env)
        self.processes["coordinator"] = process
        assert process.popen.stdout is not None
        line = process.popen.stdout.readline().decode()
        if "waiting for the log" in line:
            if on_waiting is not None:
                on_waiting()
            line = process.popen.stdout.readline().decode()
        listening = re.search(r"listening on port (\d+)", line)
        if listening is None:
            raise RuntimeError(f"coordinator did not start: {line!r}; see {log}")
        self.address = f"127.0.0.1:{listening[1]}"
        metrics = re.search(r"metrics on port (\d+)", line)
        self.metrics_port = int(metrics[1]) if metrics else 0
        if self.channel is not None:
            self.channel.close()
        self.channel = self.open_channel()

    def start_hostd(self, host_id: str, failpoints: str = "") -> None:
        hook = self.root / "hook.sh"
        if not hook.exists():
            hook.write_text(HOOK.format(log=self.hook_log))
            hook.chmod(0o755)
        args = [
            str(BIN / "whimbrel-hostd"), "--host-id", host_id, "--coordinator", self.address,
            "--state-dir", str(self.root / host_id), "--lockspace", str(self.shared / "locks"),
            "--network", "hook", "--network-hook", str(hook), *self._tls_flags("host", host_id),
            # hostd uses disks and memory files only under allowed roots: the test's own.
            "--allow-disk-root", str(self.root),
        ]  # fmt: skip
        if self.tls and os.environ.get("WHIMBREL_MIGRATION_TLS") == "off":
            args.append("--no-migration-tls")
        env = dict(self.env, WHIMBREL_FAILPOINTS=failpoints) if failpoints else self.env
        self.processes[host_id] = spawn(
            host_id,
            [*args, *self.hostd_args.get(host_id, [])],
            self.root / f"{host_id}.log",
            env=env,
        )

    def start(self, *hosts: str) -> Cluster:
        """Start the coordinator and hostd for `hosts`, and wait until all are connected."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.start_coordinator()
        for host in hosts:
            self.start_hostd(host)
        self.wait_hosts(*hosts)
        return self

    # --- clients ---

    @property
    def grpc(self) -> grpc.Channel:
        assert self.channel is not None, "start the coordinator first"
        return self.channel

    @property
    def vms(self) -> vm_pb2_grpc.VmServiceStub:
        return vm_pb2_grpc.VmServiceStub(self.grpc)

    @property
    def migrations(self) -> migration_pb2_grpc.MigrationServiceStub:
        return migration_pb2_grpc.MigrationServiceStub(self.grpc)

    def wait_event(
        self, predicate: Callable[[Event], bool], timeout: float = 30.0, from_seq: int = 1
    ) -> Event:
        """Follow the log until an event matches (woken by commits, no polling)."""
        stub = eventlog_pb2_grpc.EventLogServiceStub(self.grpc)
        request = eventlog_pb2.ReadEventsRequest(from_seq=from_seq, follow=True)
        call = stub.ReadEvents(request, timeout=timeout)
        try:
            for proto in call:
                field_name = proto.payload.WhichOneof("kind")
                assert field_name is not None, f"event {proto.seq} has no payload"
                event = Event(
                    proto.seq, proto.stream, proto.type, proto.epoch, proto.time_us,
                    getattr(proto.payload, field_name), proto.origin.host_id,
                    proto.origin.generation, proto.origin.seq,
                )  # fmt: skip
                if predicate(event):
                    return event
        finally:
            call.cancel()
        raise AssertionError("event stream ended")

    def wait_hosts(self, *hosts: str, from_seq: int = 1) -> None:
        waiting = set(hosts)

        def all_connected(e: Event) -> bool:
            if isinstance(e.payload, events_pb2.HostConnected):
                waiting.discard(e.payload.host_id)
            return not waiting

        self.wait_event(all_connected, from_seq=from_seq)

    def head(self) -> int:
        stub = eventlog_pb2_grpc.EventLogServiceStub(self.grpc)
        return stub.VerifyLog(eventlog_pb2.VerifyLogRequest()).head_seq

    def define_and_start(
        self,
        name: str,
        host: str,
        memory_mib: int = 64,
        ram_file: Path | None = None,
        on_lost: int = 0,
        nics: Sequence[common_pb2.Nic] = (),
    ) -> None:
        disk = boot_disk(self.shared / f"{name}.img")
        spec = common_pb2.VmSpec(
            name=name,
            memory_mib=memory_mib,
            vcpus=1,
            disks=[common_pb2.Disk(path=str(disk), format="raw")],
            on_lost=common_pb2.LostVmAction.ValueType(on_lost),
            nics=nics,
        )
        if ram_file is not None:
            spec.memory_backing.kind = "file"
            spec.memory_backing.path = str(ram_file)
        self.define_spec_and_start(spec, host)

    def define_spec_and_start(self, spec: common_pb2.VmSpec, host: str) -> None:
        """Define the VM `spec` and start it on `host`; returns once it was started."""
        self.vms.DefineVm(vm_pb2.DefineVmRequest(spec=spec))
        head = self.head()
        self.vms.StartVm(vm_pb2.StartVmRequest(name=spec.name, host=host))
        self.wait_event(
            lambda e: (
                isinstance(e.payload, events_pb2.CommandSucceeded) and e.payload.vm == spec.name
            ),
            from_seq=head,
        )

    def watch(self, migration_id: str, timeout: float = 120.0) -> migration_pb2.Migration:
        updates = list(
            self.migrations.WatchMigration(
                migration_pb2.WatchMigrationRequest(migration_id=migration_id), timeout=timeout
            )
        )
        assert updates, "WatchMigration returned nothing"
        return updates[-1]

    def events(self) -> list[Event]:
        store = SqliteEventStore(self.db)
        try:
            return [codec.from_stored(s) for s in store.read()]
        finally:
            store.close()

    def qemu_pids(self) -> list[int]:
        pids = []
        for pidfile in self.root.glob("*/vms/*/qemu.pid"):
            with contextlib.suppress(ValueError, FileNotFoundError):
                pids.append(int(pidfile.read_text()))
        return pids

    def qemu_pid(self, host: str, vm: str = "vm-1") -> int:
        """The pid of `vm`'s QEMU on `host` (from its pidfile; it may have died since)."""
        return int((self.root / host / "vms" / vm / "qemu.pid").read_text())

    def wait_frozen(self, name: str, timeout: float = 60.0) -> None:
        """Until process `name` stopped itself at a `NAME=stop` failpoint (state T)."""
        pid = self.processes[name].popen.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.processes[name].popen.poll() is not None:
                raise AssertionError(f"{name} exited instead of stopping at its failpoint")
            with contextlib.suppress(FileNotFoundError, IndexError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] == "T":
                    return
            time.sleep(0.005)
        raise AssertionError(f"{name} did not stop at its failpoint within {timeout:g} s")

    def kill_process(self, name: str) -> None:
        """SIGKILL process `name` (a coordinator or hostd) and forget it; start it again with
        `start_coordinator` / `start_hostd` (same host id, same state dir)."""
        self.processes.pop(name).stop(signal.SIGKILL)

    def teardown(self) -> None:
        if self.channel is not None:
            self.channel.close()
        for process in reversed(list(self.processes.values())):
            process.stop()
        for pid in self.qemu_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
