"""The Linux guest migrated by the real coordinator and hostd while a client talks to it.

Each host runs its VMs in a namespace of its own holding bridge BRIDGE; a veth pair joins the
two bridges (the "switch"), and a client namespace hangs off host A's bridge. The client keeps
one TCP connection to the guest's echo service and probes it every millisecond throughout the
migration; the guest keeps dirtying memory and writing its disk counter on the shared directory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostd.qemu import tap_name
from tests import netns
from tests.qemu.test_migrations import SLOW, assert_safe_handoff, start
from tools import linux_guest
from tools.cluster import Cluster
from whimbrel.v1 import common_pb2, events_pb2, migration_pb2, vm_pb2

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

MAC = "52:54:00:77:00:02"
GUEST_IP = "10.77.0.2"
CLIENT_IP = "10.77.0.9"
MIGRATION_IPS = {"host-a": "10.78.0.1", "host-b": "10.78.0.2"}
MIGRATION_PORT = "49300"  # fixed: hostd cannot probe for a free port inside the namespace
SWITCH = "wbsw"  # the veth end in each host namespace (wbsw-a, wbsw-b)

# One long-lived connection probed every millisecond until stdin closes; prints a JSON summary.
PROBE_CLIENT = """
import json, select, socket, sys, time
deadline = time.monotonic() + 60
while True:
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.settimeout(None)
print("connected", flush=True)
answers, longest, error, i = 0, 0.0, "", 0
last = time.monotonic()
try:
    while not select.select([sys.stdin], [], [], 0)[0]:
        want = b"%07d\\n" % (i % 10_000_000)
        s.sendall(want)
        got = b""
        while len(got) < len(want):
            r, _, _ = select.select([s, sys.stdin], [], [], 1.0)
            if sys.stdin in r and s not in r:
                raise StopIteration
            if s in r:
                chunk = s.recv(64)
                if not chunk:
                    raise ConnectionResetError("closed by peer")
                got += chunk
        if got != want:
            raise ConnectionError("wrong echo %r for %r" % (got, want))
        now = time.monotonic()
        longest = max(longest, now - last)
        last = now
        answers += 1
        i += 1
        time.sleep(0.001)
except StopIteration:
    pass
except OSError as err:
    error = repr(err)
print(json.dumps({"answers": answers, "longest_gap_s": longest, "error": error}), flush=True)
"""


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def fabric() -> Iterator[dict[str, str]]:
    """Namespaces per host (each with a bridge) joined by a veth switch, and a client."""
    with (
        netns.namespace_with_bridge() as ns_a,
        netns.namespace_with_bridge() as ns_b,
        netns.namespace_with_bridge() as client,
    ):
        sh("ip", "-n", ns_a, "link", "add", f"{SWITCH}-a", "type", "veth",
           "peer", "name", f"{SWITCH}-b", "netns", ns_b)  # fmt: skip
        netns.ip(ns_a, "link", "set", f"{SWITCH}-a", "master", netns.BRIDGE, "up")
        netns.ip(ns_b, "link", "set", f"{SWITCH}-b", "master", netns.BRIDGE, "up")
        # A link of their own for migration traffic: each QEMU's loopback is its namespace's.
        sh("ip", "-n", ns_a, "link", "add", "wbmig", "type", "veth",
           "peer", "name", "wbmig", "netns", ns_b)  # fmt: skip
        for ns, address in ((ns_a, MIGRATION_IPS["host-a"]), (ns_b, MIGRATION_IPS["host-b"])):
            netns.ip(ns, "addr", "add", f"{address}/24", "dev", "wbmig")
            netns.ip(ns, "link", "set", "wbmig", "up")
        sh("ip", "-n", client, "link", "add", "wbcl", "type", "veth",
           "peer", "name", "wbcl-a", "netns", ns_a)  # fmt: skip
        netns.ip(ns_a, "link", "set", "wbcl-a", "master", netns.BRIDGE, "up")
        netns.ip(client, "addr", "add", f"{CLIENT_IP}/24", "dev", "wbcl")
        netns.ip(client, "link", "set", "wbcl", "up")
        yield {"host-a": ns_a, "host-b": ns_b, "client": client}


@pytest.fixture
def cluster(tmp_path: Path, fabric: dict[str, str], guest: linux_guest.Guest) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    c.hostd_args = {
        host: ["--network", "bridge", "--netns", fabric[host], "--allow-bridge", netns.BRIDGE,
               "--allow-kernel-root", str(guest.kernel.parent),
               "--allow-kernel-root", str(guest.initrd.parent),
               "--migration-address", MIGRATION_IPS[host], "--migration-port", MIGRATION_PORT]
        for host in ("host-a", "host-b")
    }  # fmt: skip
    try:
        yield c.start("host-a", "host-b")
    finally:
        c.teardown()


def define_and_start(cluster: Cluster, guest: linux_guest.Guest) -> Path:
    disk = linux_guest.counter_disk(cluster.shared / "vm-1.img")
    spec = common_pb2.VmSpec(
        name="vm-1",
        memory_mib=256,
        vcpus=1,
        disks=[common_pb2.Disk(path=str(disk), format="raw", interface="virtio")],
        nics=[common_pb2.Nic(mac=MAC, bridge=netns.BRIDGE)],
        kernel=str(guest.kernel),
        initrd=str(guest.initrd),
        append=guest.append(ip=f"{GUEST_IP}/24", load_mib=16),
    )
    cluster.vms.DefineVm(vm_pb2.DefineVmRequest(spec=spec))
    head = cluster.head()
    cluster.vms.StartVm(vm_pb2.StartVmRequest(name="vm-1", host="host-a"))
    cluster.wait_event(
        lambda e: isinstance(e.payload, events_pb2.CommandSucceeded) and e.payload.vm == "vm-1",
        from_seq=head,
    )
    return disk


class CounterWatch(threading.Thread):
    """Samples the disk counter every 10 ms; records every time it went backwards."""

    def __init__(self, disk: Path) -> None:
        super().__init__(name="counter-watch", daemon=True)
        self.disk, self.samples, self.rewinds = disk, [0], 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.01):
            value = linux_guest.read_counter(self.disk)
            if value < self.samples[-1]:
                self.rewinds += 1
            self.samples.append(value)


def fdb_port(ns: str, mac: str) -> str:
    entries = json.loads(sh("bridge", "-n", ns, "-j", "fdb", "show", "br", netns.BRIDGE))
    ports = [e["ifname"] for e in entries if e.get("mac") == mac and "self" not in e["flags"]]
    return ports[0] if ports else ""


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


@pytest.mark.parametrize("case", ["precopy", "postcopy", "auto", "abort"])
def test_client_connection_and_disk_counter_survive_the_migration(
    cluster: Cluster, guest: linux_guest.Guest, fabric: dict[str, str], case: str
) -> None:
    """A loaded Linux guest migrates (or rolls back) with 0 connection loss and no counter
    rewind, and the switch learns its MAC on the side where it runs."""
    disk = define_and_start(cluster, guest)
    tap_a, tap_b = tap_name("host-a", "vm-1", 0), tap_name("host-b", "vm-1", 0)
    assert netns.links(fabric["host-a"])[tap_a]["master"] == netns.BRIDGE
    wait_for(lambda: linux_guest.read_counter(disk) > 0, 60, "the guest's first counter write")
    client = subprocess.Popen(
        ["ip", "netns", "exec", fabric["client"], sys.executable, "-c", PROBE_CLIENT,
         GUEST_IP, str(linux_guest.ECHO_PORT)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    watch = CounterWatch(disk)
    try:
        assert client.stdout is not None and client.stdout.readline().strip() == "connected"
        assert fdb_port(fabric["host-a"], MAC) == tap_a
        watch.start()
        time.sleep(1.0)  # probes before the migration, so the outage is measured against them
        final = migrate(cluster, case)
        time.sleep(1.0)  # probes after the handoff
        before_end = watch.samples[-1]
        wait_for(lambda: linux_guest.read_counter(disk) > before_end, 30, "the counter to go on")
    finally:
        watch.done.set()
        out, _ = client.communicate("stop\n", timeout=30)
    result = json.loads(out.strip().splitlines()[-1])
    print(
        f"\n{case}: phase {common_pb2.MigrationPhase.Name(final.phase)},"
        f" outage {result['longest_gap_s'] * 1000:.1f} ms, pause {final.pause_us / 1000:.1f} ms,"
        f" {result['answers']} answers, counter {watch.samples[1]}..{watch.samples[-1]}"
    )
    assert result["error"] == "", result
    assert watch.rewinds == 0
    if case == "abort":
        assert final.phase == common_pb2.MIGRATION_PHASE_ROLLED_BACK
        assert fdb_port(fabric["host-a"], MAC) == tap_a
        return
    assert final.phase == common_pb2.MIGRATION_PHASE_COMPLETED
    assert_safe_handoff(cluster, "m-1")
    # Traffic to the guest now crosses the switch: host A's bridge learned it behind the veth.
    assert fdb_port(fabric["host-a"], MAC) == f"{SWITCH}-a"
    assert fdb_port(fabric["host-b"], MAC) == tap_b
