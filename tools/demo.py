"""`make demo`: a real live migration, end to end, on this machine.

Installs QEMU when missing (as root, through apt-get), then under .demo/ makes a PKI, starts a
coordinator and two hostd processes (host-a, host-b) on loopback, every channel mutual TLS,
starts a 64 MiB VM whose RAM is random bytes and whose CPU keeps writing memory on host-a,
migrates it to host-b in auto mode with live progress, and prints the migration's timeline from
the log and the guest-visible pause. It stops every process it started.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tools.audit import timeline
from tools.cluster import BIN, Cluster
from tools.guest import random_ram
from whimbrel.v1 import common_pb2, events_pb2, migration_pb2, vm_pb2

ROOT = Path(".demo")


def say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m", flush=True)


def ensure_qemu() -> None:
    if shutil.which("qemu-system-x86_64"):
        return
    if os.geteuid() != 0:
        raise SystemExit("qemu-system-x86_64 is missing; install package qemu-system-x86")
    say("installing qemu-system-x86 (apt-get)")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "-qq", "qemu-system-x86"], check=True, env=env)


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
    cluster = Cluster(ROOT.resolve())
    say("making a guest: a boot sector that keeps writing memory, and 64 MiB of random RAM")
    ram = random_ram(cluster.shared / "vm-1.ram", 64)
    final = None
    try:
        cluster.start("host-a", "host-b")
        say(f"coordinator on {cluster.address}, log {ROOT / 'whimbrel.db'}; hostd host-a, host-b")
        admin = cluster.identity("user", "admin").principal
        say(f"mutual TLS on every channel: CA and certificates in {ROOT / 'pki'}, roles in "
            f"{ROOT / 'authz.toml'}; this demo acts as {admin}")  # fmt: skip
        cluster.define_and_start("vm-1", "host-a", memory_mib=64, ram_file=ram)
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
        cluster.migrations.StartMigration(migration_pb2.StartMigrationRequest(
            vm="vm-1", destination="host-b", mode=common_pb2.MIGRATION_MODE_AUTO, policy=policy,
            migration_id="demo-1"))  # fmt: skip
        last_line = ""
        for final in cluster.migrations.WatchMigration(
            migration_pb2.WatchMigrationRequest(migration_id="demo-1"), timeout=300
        ):
            line = progress_line(final)
            if line != last_line:
                print(line, flush=True)
                last_line = line
        vm = cluster.vms.GetVm(vm_pb2.GetVmRequest(name="vm-1"))
        status = vm_pb2.VmStatus.Name(vm.status).removeprefix("VM_STATUS_").lower()
        say(f"vm-1 now {status} on {vm.host}, lease held by {vm.lease_holder} "
            f"(generation {vm.lease_generation})")  # fmt: skip
    finally:
        cluster.teardown()
    say("timeline of demo-1, from the event log")
    print(timeline.render(timeline.build(cluster.events(), "demo-1")))
    say(f"network hook calls (phase, VM, host, time in ns) from {cluster.hook_log}:")
    print(cluster.hook_log.read_text().rstrip())
    say(f"audit: whimbrel-audit verify {ROOT / 'whimbrel.db'}")
    subprocess.run([str(BIN / "whimbrel-audit"), "verify", str(cluster.db)], check=False)
    return 0 if final is not None and final.phase == common_pb2.MIGRATION_PHASE_COMPLETED else 1


if __name__ == "__main__":
    sys.exit(main())
