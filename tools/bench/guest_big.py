"""A 1 GiB Linux guest under a heavy dirtying load, migrated in auto mode.

The guest (tools/linux_guest.py) writes to every page of DIRTY_MIB MiB over and over on each of
its vCPUs (tools/guest_dirtier.py), faster than pre-copy can send them, so pre-copy cannot
converge: auto mode must end by switching to post-copy. The migration runs with the cluster's
default policy, as an operator's would. Reported: whether it went post-copy and completed, the
total time, the memory passes, the bytes sent, the guest-visible pause (QEMU's clocks), and the
guest's dirty rate as QEMU measured it (its largest sample).

No network is needed (the guest has no NIC), so this runs without root.
"""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
import time
from pathlib import Path

from qemu.qmp import QMPClient

from tools import linux_guest
from tools.cluster import Cluster
from whimbrel.v1 import common_pb2, events_pb2, migration_pb2

MEMORY_MIB = 1024
# Each vCPU dirties DIRTY_MIB MiB over and over: 640 MiB of the guest's 1 GiB in all.
DIRTY_MIB = 320
VCPUS = 2
PAGE = 4096


def guest_dirty_rate(
    root: Path, memory_mib: int = MEMORY_MIB, dirty_mib: int = DIRTY_MIB, vcpus: int = VCPUS
) -> int:
    """The guest's dirty rate in MiB/s, as QEMU measures it over one second (distinct pages
    written), on a QEMU of its own started for this: during a migration QEMU can only say how
    many pages were dirtied between two of its passes, however long a pass took."""
    guest = linux_guest.build()
    serial, qmp_socket = root / "dirty-rate-serial.log", root / "dirty-rate-qmp.sock"
    args = [
        "qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", f"{memory_mib}M",
        "-smp", str(vcpus), "-nodefaults", "-display", "none", "-serial", f"file:{serial}",
        "-qmp", f"unix:{qmp_socket},server=on,wait=off",
        "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
        "-append", guest.append(dirty_mib=dirty_mib),
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        # Printed once every writer has made a first pass over its memory.
        while f"dirty={dirty_mib}" not in (
            serial.read_text(errors="replace") if serial.exists() else ""
        ):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the guest never started its memory writers")
            time.sleep(0.1)
        return asyncio.run(_measure_dirty_rate(qmp_socket))
    finally:
        proc.kill()
        proc.wait()


async def _measure_dirty_rate(qmp_socket: Path) -> int:
    client = QMPClient("dirty-rate")
    await client.connect(str(qmp_socket))
    try:
        # Hashes of sampled pages compared a second apart, with the most samples QEMU allows
        # (the estimate's error is then a few percent); QEMU 7.2 under TCG aborts in the exact
        # dirty-bitmap mode.
        sampling = {"calc-time": 1, "mode": "page-sampling", "sample-pages": 4096}
        await client.execute("calc-dirty-rate", sampling)
        while True:
            info = await client.execute("query-dirty-rate")
            assert isinstance(info, dict)
            if info["status"] == "measured":
                return int(info["dirty-rate"])
            await asyncio.sleep(0.1)  # QEMU sends no event when it is done
    finally:
        await client.disconnect()


def migrate_big_guest(
    root: Path, memory_mib: int = MEMORY_MIB, dirty_mib: int = DIRTY_MIB, vcpus: int = VCPUS
) -> dict[str, object]:
    """Boots the guest on host-a of a fresh cluster under `root`, migrates it to host-b in auto
    mode and says how it went."""
    guest = linux_guest.build()
    cluster = Cluster(root)
    kernel_roots = ["--allow-kernel-root", str(guest.kernel.parent),
                    "--allow-kernel-root", str(guest.initrd.parent)]  # fmt: skip
    cluster.hostd_args = {"host-a": kernel_roots, "host-b": kernel_roots}
    try:
        cluster.start("host-a", "host-b")
        disk = linux_guest.counter_disk(cluster.shared / "big.img")
        spec = common_pb2.VmSpec(
            name="big-1",
            memory_mib=memory_mib,
            vcpus=vcpus,
            disks=[common_pb2.Disk(path=str(disk), format="raw", interface="virtio")],
            kernel=str(guest.kernel),
            initrd=str(guest.initrd),
            append=guest.append(dirty_mib=dirty_mib),
        )
        cluster.define_spec_and_start(spec, "host-a")
        # The guest starts its disk counter only once its dirtying loop runs.
        deadline = time.monotonic() + 120
        while linux_guest.read_counter(disk) == 0:
            if time.monotonic() > deadline:
                raise RuntimeError("the guest never started dirtying its memory")
            time.sleep(0.1)
        head = cluster.head()
        started = time.monotonic()
        cluster.migrations.StartMigration(migration_pb2.StartMigrationRequest(
            vm="big-1", destination="host-b", mode=common_pb2.MIGRATION_MODE_AUTO,
            migration_id="big-m1"))  # fmt: skip
        final = cluster.watch("big-m1", timeout=600)
        total_s = time.monotonic() - started
        events = cluster.events()
    finally:
        cluster.teardown()
    samples = [e.payload for e in events if e.seq > head
               and isinstance(e.payload, events_pb2.MigrationStatsSampled)]  # fmt: skip
    requested = [e.payload for e in events
                 if isinstance(e.payload, events_pb2.PostcopyRequested)]  # fmt: skip
    dirty_rates = [s.dirty_pages_rate * PAGE / 2**20 for s in samples]
    return {
        "memory_mib": memory_mib,
        "dirty_mib": dirty_mib,
        "vcpus": vcpus,
        "phase": common_pb2.MigrationPhase.Name(final.phase),
        "postcopy": final.postcopy,
        "postcopy_reason": requested[0].reason if requested else "",
        "total_s": round(total_s, 2),
        "passes": getattr(final.progress, "pass"),
        "transferred_mib": round(final.progress.transferred_bytes / 2**20, 1),
        "pause_ms": round(final.pause_us / 1000, 1),
        # QEMU's per-pass figure: pages dirtied between two passes over the pass's length.
        "dirty_rate_mib_s_max": round(max(dirty_rates, default=0.0), 1),
        "reason": final.reason,
    }


def bench() -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="whimbrel-big-") as root:
        rate = guest_dirty_rate(Path(root))
        return {**migrate_big_guest(Path(root)), "guest_dirty_rate_mib_s": rate}
