"""A network namespace of the test's own with a Linux bridge in it, for the bridge driver.

Creating one needs root (as CI runs). Elsewhere the tests that need it are skipped, except
under WHIMBREL_REQUIRE_QEMU (CI), where the lack of root is a failure, never a skip.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

BRIDGE = "wbbr0"
_names = itertools.count()


def require_root() -> None:
    if os.geteuid() == 0 and shutil.which("ip"):
        return
    if os.environ.get("WHIMBREL_REQUIRE_QEMU"):
        pytest.fail("network namespace tests need root and iproute2 (WHIMBREL_REQUIRE_QEMU is set)")
    pytest.skip("network namespace tests need root and iproute2")


def ip(netns: str, *args: str) -> str:
    return subprocess.run(
        ["ip", "-n", netns, *args], check=True, capture_output=True, text=True
    ).stdout


@contextlib.contextmanager
def namespace_with_bridge() -> Iterator[str]:
    """A fresh namespace with loopback up and bridge BRIDGE up; deleted afterwards."""
    require_root()
    name = f"wbtest-{os.getpid()}-{next(_names)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        ip(name, "link", "set", "lo", "up")
        ip(name, "link", "add", BRIDGE, "type", "bridge")
        ip(name, "link", "set", BRIDGE, "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def links(netns: str) -> dict[str, dict[str, Any]]:
    """The namespace's links by name, as `ip -j link show` describes them."""
    return {link["ifname"]: link for link in json.loads(ip(netns, "-j", "link", "show"))}
