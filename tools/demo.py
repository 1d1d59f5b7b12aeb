"""`make demo`: a real live migration, end to end, on this machine.

Installs QEMU when missing (as root, through apt-get), then under .demo/ starts a coordinator
and two hostd processes (host-a, host-b) on loopback, starts a 64 MiB VM whose RAM is random
bytes and whose CPU keeps writing memory on host-a, migrates it to host-b in auto mode with
live progress, and prints the migration's timeline from the log and the guest-visible pause.
It stops every process it started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import grpc

from coordinator import codec
from coordinator.log import SqliteEventStore
from tools.audit import timeline
from tools.guest import boot_disk, random_ram
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

ROOT = Path(".demo")
BIN = Path(sys.executable).parent
HOOK = """#!/bin/sh
# Demo network hook: a real deployment attaches taps, programs switches, etc.
echo "$(date +%H:%M:%S.%N) $WHIMBREL_HOST $1 $2" >> "{log}"
"""


def say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m", flush=True)


def ensure_qemu() -> None:
    if shutil.which("qemu-system-x86_64"):
        return
    if os.geteuid() != 0:
        raise SystemExit("qemu-system-x86_64 is missing; install package qemu-system-x86")
    say("installing qemu-system-x86 (apt-get)")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "qemu-system-x86"],
        check=True,
        env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
    )


class Demo:
    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []
        self.files: list[object] = []
        self.address = ""

    def spawn(self, name: str, args: list[str], pipe: bool = False) -> subprocess.Popen[bytes]:
        log = open(ROOT / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self.files.append(log)
        popen = subprocess.Popen(
            args, stdout=subprocess.PIPE if pipe else log, stderr=log if pipe else subprocess.STDOUT
        )
        self.processes.append(popen)
        return popen

    def start(self) -> None:
        coordinator = self.spawn(
            "coordinator",
            [
                str(BIN / "whimbrel-coordinator"),
                "--db",
                str(ROOT / "whimbrel.db"),
                "--listen",
                "127.0.0.1:0",
            ],
            pipe=True,
        )
        assert coordinator.stdout is not None
        line = coordinator.stdout.readline().decode()
        self.address = f"127.0.0.1:{line.split()[-1]}"
        hook = ROOT / "network-hook.sh"
        hook.write_text(HOOK.format(log=(ROOT / "network.log").resolve()))
        hook.chmod(0o755)
        for host in ("host-a", "host-b"):
            self.spawn(
                host,
                [
                    str(BIN / "whimbrel-hostd"),
                    "--host-id",
                    host,
                    "--coordinator",
                    self.address,
                    "--state-dir",
                    str(ROOT / host),
                    "--lockspace",
                    str(ROOT / "shared" / "locks"),
                    "--network",
                    "hook",
                    "--network-hook",
                    str(hook.resolve()),
                ],
            )
        say(f"coordinator on {self.address}, log {ROOT / 'whimbrel.db'}; hostd host-a, host-b")

    def stop(self) -> None:
        for pidfile in ROOT.glob("*/vms/*/qemu.pid"):
            with contextlib.suppress(ValueError, ProcessLookupError, FileNotFoundError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
        for popen in reversed(self.processes):
            if popen.poll() is None:
                popen.send_signal(signal.SIGTERM)
                try:
                    popen.wait(10)
                except subprocess.TimeoutExpired:
                    popen.kill()
            if popen.stdout is not None:
                popen.stdout.close()
        for f in self.files:
            f.close()  # type: ignore[attr-defined]


def wait_for(channel: grpc.Channel, test, limit: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    """Follow the log until an event passes `test` (woken by commits)."""
    stub = eventlog_pb2_grpc.EventLogServiceStub(channel)
    call = stub.ReadEvents(eventlog_pb2.ReadEventsRequest(follow=True), timeout=limit)
    try:
        for event in call:
            if test(event):
                return
    finally:
        call.cancel()


def progress_line(m: migration_pb2.Migration) -> str:
    p = m.progress
    phase = common_pb2.MigrationPhase.Name(m.phase).removeprefix("MIGRATION_PHASE_").lower()
    pct = 100 * p.transferred_bytes / p.total_bytes if p.total_bytes else 0.0
    mode = " post-copy" if m.postcopy else ""
    return (
        f"  {phase:<12} pass {getattr(p, 'pass'):>2}  sent {p.transferred_bytes / 2**20:7.1f} MiB "
        f"({pct:5.1f}%)  remaining {p.remaining_bytes / 2**20:7.1f} MiB  {p.mbps:7.1f} Mbit/s{mode}"
    )


def main() -> int:
    ensure_qemu()
    if ROOT.exists():
        shutil.rmtree(ROOT)
    (ROOT / "shared" / "locks").mkdir(parents=True)
    say("making a guest: a boot sector that keeps writing memory, and 64 MiB of random RAM")
    disk = boot_disk((ROOT / "shared" / "vm-1.img").resolve())
    ram = random_ram((ROOT / "shared" / "vm-1.ram").resolve(), 64)
    demo = Demo()
    try:
        demo.start()
        channel = grpc.insecure_channel(demo.address)
        waiting = {"host-a", "host-b"}

        def all_connected(e: events_pb2.Event) -> bool:
            if e.type == "HostConnected":
                waiting.discard(e.payload.host_connected.host_id)
            return not waiting

        wait_for(channel, all_connected)
        vms = vm_pb2_grpc.VmServiceStub(channel)
        spec = common_pb2.VmSpec(
            name="vm-1",
            memory_mib=64,
            vcpus=1,
            disks=[common_pb2.Disk(path=str(disk), format="raw")],
            memory_backing=common_pb2.MemoryBacking(kind="file", path=str(ram)),
        )
        vms.DefineVm(vm_pb2.DefineVmRequest(spec=spec))
        vms.StartVm(vm_pb2.StartVmRequest(name="vm-1", host="host-a"))
        started: list[events_pb2.Event] = []

        def start_answered(e: events_pb2.Event) -> bool:
            if e.type in ("CommandSucceeded", "CommandFailed"):
                started.append(e)
            return bool(started)

        wait_for(channel, start_answered)
        if started[0].type == "CommandFailed":
            raise SystemExit(f"vm-1 did not start: {started[0].payload.command_failed.error}")
        say("vm-1 runs on host-a; migrating it to host-b in auto mode")
        policy = events_pb2.MigrationPolicy(
            parameters=events_pb2.MigrationParameters(
                max_bandwidth=8 << 20, downtime_limit_ms=1, max_postcopy_bandwidth=20 << 20
            ),
            # Pre-copy gets two passes; if it has not converged by then, post-copy takes over.
            # (On QEMU 7.2 TCG the guest's writes leave the dirty log after the second sync, so
            # pass 2 is short: a low bandwidth keeps it long enough for the policy to act.)
            auto_postcopy_max_passes=2,
        )
        migrations = migration_pb2_grpc.MigrationServiceStub(channel)
        migrations.StartMigration(
            migration_pb2.StartMigrationRequest(
                vm="vm-1",
                destination="host-b",
                mode=common_pb2.MIGRATION_MODE_AUTO,
                policy=policy,
                migration_id="demo-1",
            )
        )
        last_line, final = "", None
        for final in migrations.WatchMigration(
            migration_pb2.WatchMigrationRequest(migration_id="demo-1"), timeout=300
        ):
            line = progress_line(final)
            if line != last_line:
                print(line, flush=True)
                last_line = line
        assert final is not None
        vm = vms.GetVm(vm_pb2.GetVmRequest(name="vm-1"))
        status = vm_pb2.VmStatus.Name(vm.status).removeprefix("VM_STATUS_").lower()
        say(
            f"vm-1 now {status} on {vm.host}, "
            f"lease held by {vm.lease_holder} (generation {vm.lease_generation})"
        )
        channel.close()
    finally:
        demo.stop()
    store = SqliteEventStore(ROOT / "whimbrel.db")
    events = [codec.from_stored(s) for s in store.read()]
    store.close()
    say("timeline of demo-1, from the event log")
    print(timeline.render(timeline.build(events, "demo-1")))
    say(f"network hook calls (from {ROOT / 'network.log'}):")
    print((ROOT / "network.log").read_text().rstrip())
    say(f"audit: whimbrel-audit verify {ROOT / 'whimbrel.db'}")
    subprocess.run([str(BIN / "whimbrel-audit"), "verify", str(ROOT / "whimbrel.db")], check=False)
    return 0 if final.phase == common_pb2.MIGRATION_PHASE_COMPLETED else 1


if __name__ == "__main__":
    sys.exit(main())
