"""The Linux guest migrated by the real coordinator and hostd while a client talks to it.

Each host runs its VMs in a namespace of its own holding bridge BRIDGE; a veth pair joins the
two bridges (the "switch"), and a client namespace hangs off host A's bridge. The client keeps
one TCP connection to the guest's echo service and probes it every millisecond throughout the
migration; the guest keeps dirtying memory and writing its disk counter on the shared directory.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from hostd.qemu import tap_name
from tests import netns
from tests.qemu.scenario import (
    PHASE,
    assert_outcome,
    crash_and_restart,
    migration_status,
    wait_destination_running,
)
from tests.qemu.test_migrations import SLOW, assert_safe_handoff, start
from tools import guest_fabric, linux_guest
from tools.cluster import Cluster
from whimbrel.v1 import common_pb2, events_pb2, migration_pb2

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


@pytest.fixture
def fabric() -> Iterator[guest_fabric.Fabric]:
    netns.require_root()
    with guest_fabric.Fabric.create() as fabric:
        yield fabric


@pytest.fixture
def cluster(
    tmp_path: Path, fabric: guest_fabric.Fabric, guest: linux_guest.Guest
) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    c.hostd_args = {host: fabric.hostd_args(host, guest) for host in guest_fabric.HOSTS}
    try:
        yield c.start("host-a", "host-b")
    finally:
        c.teardown()


def define_and_start(
    cluster: Cluster,
    guest: linux_guest.Guest,
    on_lost: int = common_pb2.LOST_VM_ACTION_STAY_STOPPED,
) -> Path:
    disk = linux_guest.counter_disk(cluster.shared / "vm-1.img")
    spec = guest_fabric.linux_vm_spec(guest, disk, on_lost=on_lost)
    cluster.define_spec_and_start(spec, "host-a")
    return disk


def wait_for(test, limit: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit
    while not test():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def migrate(cluster: Cluster, case: str) -> migration_pb2.Migration:
    """Runs migration m-1 as `case` asks; returns its final state."""
    if case == "abort":
        head = cluster.head()
        # Throttled to a crawl with a guest that keeps writing, pre-copy stays in transfer.
        start(cluster, "m-1", MODES["precopy"], max_bandwidth=SLOW, downtime_limit_ms=1)
        cluster.wait_event(
            lambda e: (
                isinstance(e.payload, events_pb2.QmpEventReceived)
                and e.origin_host == "host-a"
                and e.payload.event == "MIGRATION_PASS"
            ),
            from_seq=head,
        )
        cluster.migrations.AbortMigration(migration_pb2.AbortMigrationRequest(migration_id="m-1"))
    else:
        start(cluster, "m-1", MODES[case], max_postcopy_bandwidth=64 << 20)
    return cluster.watch("m-1")


MODES = {
    "precopy": common_pb2.MIGRATION_MODE_PRECOPY,
    "postcopy": common_pb2.MIGRATION_MODE_POSTCOPY,
    "auto": common_pb2.MIGRATION_MODE_AUTO,
}


T = TypeVar("T")


def under_client(
    cluster: Cluster, fabric: guest_fabric.Fabric, disk: Path, act: Callable[[], T]
) -> tuple[T, guest_fabric.ProbeResult, guest_fabric.CounterWatch]:
    """Runs `act` while a client probes the guest over one connection, the disk counter is
    watched and so is who may write the disk; returns what `act` returned, what the client saw
    and the counter's watch. Throughout, exactly one QEMU held write permission on the disk
    (never two, and the sampler did see the one) and QEMU's own image locking never had to
    refuse one (no command failed on a lock); the guest goes on writing afterwards."""
    wait_for(lambda: linux_guest.read_counter(disk) > 0, 60, "the guest's first counter write")
    client = guest_fabric.ProbeClient(fabric)
    watch = guest_fabric.CounterWatch(disk)
    writers = guest_fabric.WriterWatch(disk)
    try:
        assert client.connected()
        watch.start()
        writers.start()
        time.sleep(1.0)  # probes before, so the outage is measured against them
        outcome = act()
        time.sleep(1.0)  # probes after the handoff
        assert watch.wait_beyond(watch.samples[-1], 30), "the counter did not go on"
    finally:
        watch.done.set()
        writers.done.set()
        result = client.stop()
    assert writers.most == 1 and writers.samples > 100, (writers.most, writers.samples)
    failures = [
        e.payload for e in cluster.events() if isinstance(e.payload, events_pb2.CommandFailed)
    ]
    lock_refusals = [f.error for f in failures if "lock" in f.error]
    assert lock_refusals == []
    return outcome, result, watch


def start_slow_postcopy(cluster: Cluster) -> int:
    """Post-copy of vm-1 slow enough that pages still flow once the destination runs; returns
    the log head before it, once host-b's QEMU has resumed."""
    head = cluster.head()
    start(cluster, "m-1", MODES["postcopy"], max_postcopy_bandwidth=32 << 20)
    wait_destination_running(cluster, head)
    return head


@pytest.mark.parametrize("case", ["precopy", "postcopy", "auto", "abort"])
def test_client_connection_and_disk_counter_survive_the_migration(
    cluster: Cluster, guest: linux_guest.Guest, fabric: guest_fabric.Fabric, case: str
) -> None:
    """A loaded Linux guest migrates (or rolls back) with 0 connection loss and no counter
    rewind, and the switch learns its MAC on the side where it runs."""
    disk = define_and_start(cluster, guest)
    tap_a, tap_b = tap_name("host-a", "vm-1", 0), tap_name("host-b", "vm-1", 0)
    assert netns.links(fabric.host("host-a"))[tap_a]["master"] == guest_fabric.BRIDGE

    def migrate_from_a() -> migration_pb2.Migration:
        # Host A's bridge learned the guest's MAC on its tap from the answers so far.
        assert fabric.fdb_port("host-a") == tap_a
        return migrate(cluster, case)

    final, result, watch = under_client(cluster, fabric, disk, migrate_from_a)
    print(
        f"\n{case}: phase {common_pb2.MigrationPhase.Name(final.phase)},"
        f" outage {result.longest_gap_s * 1000:.1f} ms, pause {final.pause_us / 1000:.1f} ms,"
        f" {result.answers} answers, counter {watch.samples[1]}..{watch.samples[-1]}"
    )
    assert result.error == "", result
    assert watch.rewinds == 0
    if case == "abort":
        assert final.phase == common_pb2.MIGRATION_PHASE_ROLLED_BACK
        assert fabric.fdb_port("host-a") == tap_a
        return
    assert final.phase == common_pb2.MIGRATION_PHASE_COMPLETED
    assert_safe_handoff(cluster, "m-1")
    # Traffic to the guest now crosses the switch: host A's bridge learned it behind the veth.
    assert fabric.fdb_port("host-a") == f"{guest_fabric.SWITCH}-a"
    assert fabric.fdb_port("host-b") == tap_b


def test_a_postcopy_link_cut_is_recovered_with_the_client_connected(
    cluster: Cluster, guest: linux_guest.Guest, fabric: guest_fabric.Fabric
) -> None:
    """The migration link's TCP connection is destroyed (`ss -K` in the source's namespace)
    while post-copy pages flow to the running destination: both ends pause, the coordinator
    recovers them, the migration completes; the client's connection and the disk counter
    survive the whole of it."""
    disk = define_and_start(cluster, guest)

    def cut_and_recover() -> migration_pb2.Migration:
        head = start_slow_postcopy(cluster)
        fabric.cut_migration_link()
        cluster.wait_event(migration_status("host-a", "postcopy-paused"), from_seq=head)
        return assert_outcome(cluster, PHASE.MIGRATION_PHASE_COMPLETED, runs_on="host-b")

    final, result, watch = under_client(cluster, fabric, disk, cut_and_recover)
    print(f"\nlink cut: outage {result.longest_gap_s * 1000:.1f} ms, {result.answers} answers")
    assert final.postcopy
    succeeded = {e.payload.kind for e in cluster.events()
                 if isinstance(e.payload, events_pb2.CommandSucceeded)}  # fmt: skip
    assert {events_pb2.COMMAND_KIND_RECOVER_INCOMING,
            events_pb2.COMMAND_KIND_RESUME_MIGRATION} <= succeeded  # fmt: skip
    assert result.error == "", result
    assert watch.rewinds == 0


def test_a_coordinator_crash_mid_postcopy_costs_the_client_nothing(
    cluster: Cluster, guest: linux_guest.Guest, fabric: guest_fabric.Fabric
) -> None:
    """The coordinator is SIGKILLed while post-copy pages flow to the running destination and
    restarted on the same log: the migration completes and the client never notices more than
    the post-copy itself."""
    disk = define_and_start(cluster, guest)

    def crash_mid_postcopy() -> migration_pb2.Migration:
        start_slow_postcopy(cluster)
        crash_and_restart(cluster)
        return assert_outcome(cluster, PHASE.MIGRATION_PHASE_COMPLETED, runs_on="host-b")

    final, result, watch = under_client(cluster, fabric, disk, crash_mid_postcopy)
    print(f"\ncrash: outage {result.longest_gap_s * 1000:.1f} ms, {result.answers} answers")
    assert final.postcopy
    assert result.error == "", result
    assert watch.rewinds == 0


def test_a_fenced_guest_cold_starts_and_its_disk_counter_goes_on(
    cluster: Cluster, guest: linux_guest.Guest, fabric: guest_fabric.Fabric
) -> None:
    """The source QEMU is SIGKILLed while post-copy pages flow to the running destination:
    the destination lacks pages nobody has, so it is fenced and the VM lost; its policy
    (cold start) boots it again from its disk on host-b, which holds the lease. The counter
    the guest wrote before goes on from the disk with no rewind, and no two QEMUs ever held
    write permission on the disk at once."""
    disk = define_and_start(cluster, guest, on_lost=common_pb2.LOST_VM_ACTION_COLD_START)
    wait_for(lambda: linux_guest.read_counter(disk) > 0, 60, "the guest's first counter write")
    watch = guest_fabric.CounterWatch(disk)
    writers = guest_fabric.WriterWatch(disk)
    watch.start()
    writers.start()
    try:
        head = cluster.head()
        start(cluster, "m-1", MODES["postcopy"], max_postcopy_bandwidth=8 << 20)
        wait_destination_running(cluster, head)
        os.kill(cluster.qemu_pid("host-a"), signal.SIGKILL)
        assert cluster.watch("m-1").phase == PHASE.MIGRATION_PHASE_FENCED
        cluster.wait_event(
            lambda e: isinstance(e.payload, events_pb2.CommandSucceeded)
            and e.payload.kind == events_pb2.COMMAND_KIND_START_VM and e.origin_host == "host-b",
            from_seq=head,
        )  # fmt: skip
        at_cold_start = linux_guest.read_counter(disk)
        assert watch.wait_beyond(at_cold_start, 60), "the cold-started guest did not go on"
    finally:
        watch.done.set()
        writers.done.set()
    after = linux_guest.read_counter(disk)
    print(f"\ncold start: counter {watch.samples[1]}..{at_cold_start} (cold start)..{after}")
    assert watch.rewinds == 0
    assert writers.most == 1, writers.most
    assert_outcome(cluster, PHASE.MIGRATION_PHASE_FENCED, runs_on="host-b")
