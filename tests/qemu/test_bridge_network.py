"""The Linux-bridge driver with real QEMU: both hosts run their VMs in a network namespace of the
test's own, holding the bridge. The destination's tap stays off the bridge until the handoff
enables it, and the VM's NIC ends up on the bridge from the destination only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.core.state import Kind
from hostd.qemu import tap_name
from tests.netns import BRIDGE, links, namespace_with_bridge
from tests.qemu.test_migrations import SLOW, assert_safe_handoff, start
from tools.cluster import Cluster
from whimbrel.v1 import common_pb2, events_pb2, migration_pb2

pytestmark = pytest.mark.qemu
NIC = common_pb2.Nic(mac="52:54:00:12:34:56", bridge=BRIDGE)


@pytest.fixture
def netns() -> Iterator[str]:
    with namespace_with_bridge() as name:
        yield name


@pytest.fixture
def bridged(tmp_path: Path, netns: str) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    bridge = ["--network", "bridge", "--netns", netns, "--allow-bridge", BRIDGE]
    c.hostd_args = {"host-a": bridge, "host-b": bridge}
    try:
        yield c.start("host-a", "host-b")
    finally:
        c.teardown()


def test_the_nic_moves_to_the_destination_at_the_handoff(bridged: Cluster, netns: str) -> None:
    tap_a, tap_b = tap_name("host-a", "vm-1", 0), tap_name("host-b", "vm-1", 0)
    bridged.define_and_start("vm-1", "host-a", nics=[NIC])
    assert links(netns)[tap_a]["master"] == BRIDGE

    head = bridged.head()
    # Auto mode throttled to a crawl stays in its first pass until the operator switches.
    start(bridged, "m-1", common_pb2.MIGRATION_MODE_AUTO, max_bandwidth=SLOW)
    bridged.wait_event(
        lambda e: (
            isinstance(e.payload, events_pb2.CommandSucceeded)
            and e.payload.kind == Kind.PREPARE_INCOMING
        ),
        from_seq=head,
    )
    # The destination's QEMU made its tap in the namespace; nothing attached it yet.
    assert tap_b in links(netns) and "master" not in links(netns)[tap_b]

    bridged.migrations.SwitchToPostcopy(migration_pb2.SwitchToPostcopyRequest(migration_id="m-1"))
    final = bridged.watch("m-1")
    assert final.phase == common_pb2.MIGRATION_PHASE_COMPLETED and final.postcopy
    now = links(netns)
    assert now[tap_b]["master"] == BRIDGE and "UP" in now[tap_b]["flags"]
    assert tap_a not in now  # the source QEMU is gone, and its tap with it
    assert_safe_handoff(bridged, "m-1")
