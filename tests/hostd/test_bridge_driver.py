"""The Linux-bridge network driver on a real kernel bridge, in a namespace of the test's own:
a VM's tap joins its bridge only on enable, and leaves it on disable."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hostd.drivers.network import BridgeNetworkDriver
from hostd.errors import NetworkError
from hostd.qemu import tap_name
from tests.netns import BRIDGE, ip, links, namespace_with_bridge
from whimbrel.v1 import common_pb2

SPEC = common_pb2.VmSpec(name="vm-1", nics=[common_pb2.Nic(mac="52:54:00:00:00:01", bridge=BRIDGE)])
TAP = tap_name("host-b", "vm-1", 0)


@pytest.fixture
def netns() -> Iterator[str]:
    with namespace_with_bridge() as name:
        ip(name, "tuntap", "add", "dev", TAP, "mode", "tap")  # as QEMU creates it: detached
        yield name


async def test_the_tap_joins_its_bridge_only_on_enable(netns: str) -> None:
    driver = BridgeNetworkDriver("host-b", netns)
    await driver.apply("prepare", SPEC)
    assert "master" not in links(netns)[TAP]
    await driver.apply("enable", SPEC)
    tap = links(netns)[TAP]
    assert tap["master"] == BRIDGE and "UP" in tap["flags"]
    await driver.apply("disable", SPEC)
    tap = links(netns)[TAP]
    assert "master" not in tap and "UP" not in tap["flags"]


async def test_enable_fails_clearly_without_a_bridge_or_a_tap(netns: str) -> None:
    driver = BridgeNetworkDriver("host-b", netns)
    no_bridge = common_pb2.VmSpec(name="vm-1", nics=[common_pb2.Nic(mac="52:54:00:00:00:01")])
    with pytest.raises(NetworkError, match="names no bridge"):
        await driver.apply("enable", no_bridge)
    other = common_pb2.VmSpec(
        name="vm-2", nics=[common_pb2.Nic(mac="52:54:00:00:00:02", bridge=BRIDGE)]
    )
    with pytest.raises(NetworkError, match="failed"):
        await driver.apply("enable", other)  # no tap for vm-2: QEMU never created one
