"""`make demo`: a real live migration, end to end, on this machine.

Installs what is missing (as root, through apt-get: QEMU, and the kernel and busybox the Linux
guest is built from), then under .demo/ makes a PKI, starts a coordinator and two hostd
processes (host-a, host-b), every channel mutual TLS. As root it builds the guest network in
namespaces of its own (a bridge per host joined by a switch, and a client; tools/guest_fabric.py)
and boots a Linux guest on host-a that serves TCP and writes a counter to its disk, then
migrates it to host-b in auto mode while a client holds one TCP connection to it, probing every
millisecond. It prints live progress, the migration's timeline from the log, the outage the
client saw next to the guest-visible pause by QEMU's clocks, and the audit. Without root (no
namespaces) it migrates a boot-sector guest with random RAM instead. It stops every process it
started and removes its namespaces.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tools import guest_fabric, linux_guest
from tools.audit import timeline
from tools.cluster import BIN, Cluster
from tools.guest import random_ram
from whimbrel.v1 import common_pb2, events_pb2, migration_pb2, vm_pb2

ROOT = Path(".demo")


def say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m", flush=True)


def apt_install(*packages: str) -> None:
    say(f"installing {' '.join(packages)} (apt-get)")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "-qq", *packages], check=True, env=env)


def ensure_qemu() -> None:
    if shutil.which("qemu-system-x86_64"):
        return
    if os.geteuid() != 0:
        raise SystemExit("qemu-system-x86_64 is missing; install package qemu-system-x86")
    apt_install("qemu-system-x86")


def linux_guest_or_none() -> linux_guest.Guest | None:
    """The Linux guest, installing its packages when missing; None without root (no network
    namespaces for it, nor apt-get)."""
    if os.geteuid() != 0:
        return None
    try:
        return linux_guest.build()
    except linux_guest.GuestUnavailable:
        apt_install("linux-image-cloud-amd64", "busybox-static")
        return linux_guest.build()


def progress_line(m: migration_pb2.Migration) -> str:
    p = m.progress
    phase = common_pb2.MigrationPhase.Name(m.phase).removeprefix("MIGRATION_PHASE_").lower()
    pct = 100 * p.transferred_bytes / p.total_bytes if p.total_bytes else 0.0
    mode = " post-copy" if m.postcopy else ""
    return (
        f"  {phase:<12} pass {getattr(p, 'pass'):>2}  sent {p.transferred_bytes / 2**20:7.1f} MiB "
        f"({pct:5.1f}%)  remaining {p.remaining_bytes / 2**20:7.1f} MiB  {p.mbps:7.1f} Mbit/s{mode}"
    )


def migrate(cluster: Cluster) -> migration_pb2.Migration | None:
    say("migrating vm-1 from host-a to host-b in auto mode")
    policy = events_pb2.MigrationPolicy(
        parameters=events_pb2.MigrationParameters(
            max_bandwidth=16 << 20, downtime_limit_ms=1, max_postcopy_bandwidth=64 << 20
        ),
        # Pre-copy gets two passes; if it has not converged by then, post-copy takes over.
        auto_postcopy_max_passes=2,
    )
    cluster.migrations.StartMigration(migration_pb2.StartMigrationRequest(
        vm="vm-1", destination="host-b", mode=common_pb2.MIGRATION_MODE_AUTO, policy=policy,
        migration_id="demo-1"))  # fmt: skip
    final, last_line = None, ""
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
    return final


def run_linux_guest(cluster: Cluster, guest: linux_guest.Guest) -> migration_pb2.Migration | None:
    """The Linux guest on the namespaced network, with a client connected throughout."""
    with guest_fabric.Fabric.create() as fabric:
        cluster.hostd_args = {h: fabric.hostd_args(h, guest) for h in guest_fabric.HOSTS}
        start(cluster)
        disk = linux_guest.counter_disk(cluster.shared / "vm-1.img")
        say(f"booting a Linux guest ({guest.version}, busybox) on host-a: TCP echo on "
            f"{guest_fabric.GUEST_IP}:{linux_guest.ECHO_PORT}, a synced counter on its disk, "
            "16 MiB of memory rewritten in a loop")  # fmt: skip
        cluster.define_spec_and_start(guest_fabric.linux_vm_spec(guest, disk), "host-a")
        client = guest_fabric.ProbeClient(fabric)
        watch = guest_fabric.CounterWatch(disk)
        try:
            if not client.connected():
                raise SystemExit("the client could not connect to the guest")
            say(f"a client at {guest_fabric.CLIENT_IP} holds one TCP connection to the guest "
                "and sends it a line every millisecond")  # fmt: skip
            watch.start()
            watch.wait_beyond(0, 30)
            final = migrate(cluster)
            watch.wait_beyond(watch.samples[-1], 30)
        finally:
            watch.done.set()
            result = client.stop()
            cluster.teardown()
    survived = "survived" if not result.error else f"broke: {result.error}"
    pause = f"{final.pause_us / 1000:.1f} ms" if final is not None else "none"
    say(f"the client's connection {survived}; {result.answers} answers; longest gap between "
        f"answers (the outage it saw) {result.longest_gap_s * 1000:.1f} ms; guest-visible "
        f"pause (QEMU's clocks) {pause}")  # fmt: skip
    say(f"disk counter {watch.samples[1]} .. {watch.samples[-1]}, "
        f"{watch.rewinds} rewinds")  # fmt: skip
    return final


def run_boot_sector_guest(cluster: Cluster) -> migration_pb2.Migration | None:
    say("no root for network namespaces: a boot sector that keeps writing memory, with 64 MiB "
        "of random RAM, instead of the Linux guest")  # fmt: skip
    ram = random_ram(cluster.shared / "vm-1.ram", 64)
    try:
        start(cluster)
        cluster.define_and_start("vm-1", "host-a", memory_mib=64, ram_file=ram)
        return migrate(cluster)
    finally:
        cluster.teardown()


def start(cluster: Cluster) -> None:
    cluster.start("host-a", "host-b")
    say(f"coordinator on {cluster.address}, log {ROOT / 'whimbrel.db'}; hostd host-a, host-b")
    admin = cluster.identity("user", "admin").principal
    say(f"mutual TLS on every channel, migration streams included: CA and certificates in "
        f"{ROOT / 'pki'}, roles in "
        f"{ROOT / 'authz.toml'}; this demo acts as {admin}")  # fmt: skip


def main() -> int:
    ensure_qemu()
    guest = linux_guest_or_none()
    if ROOT.exists():
        shutil.rmtree(ROOT)
    cluster = Cluster(ROOT.resolve())
    final = run_boot_sector_guest(cluster) if guest is None else run_linux_guest(cluster, guest)
    say("timeline of demo-1, from the event log")
    print(timeline.render(timeline.build(cluster.events(), "demo-1")))
    say(f"audit: whimbrel-audit verify {ROOT / 'whimbrel.db'}")
    subprocess.run([str(BIN / "whimbrel-audit"), "verify", str(cluster.db)], check=False)
    return 0 if final is not None and final.phase == common_pb2.MIGRATION_PHASE_COMPLETED else 1


if __name__ == "__main__":
    sys.exit(main())
