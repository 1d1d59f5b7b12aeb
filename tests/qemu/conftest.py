"""Real processes on loopback: a coordinator, two hostd, real QEMU (TCG), real SQLite files.

QEMU must be installed; in CI (WHIMBREL_REQUIRE_QEMU=1) its absence fails the run instead of
skipping these tests.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools import linux_guest
from tools.cluster import Cluster, tear_down_on_sigterm

__all__ = ["Cluster"]


@pytest.fixture
def guest() -> linux_guest.Guest:
    """The Linux guest's kernel and initramfs (built once, cached)."""
    try:
        return linux_guest.build()
    except linux_guest.GuestUnavailable as err:
        if os.environ.get("WHIMBREL_REQUIRE_QEMU"):
            pytest.fail(f"{err} (WHIMBREL_REQUIRE_QEMU is set)")
        pytest.skip(str(err))


def pytest_configure(config: pytest.Config) -> None:
    tear_down_on_sigterm()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if shutil.which("qemu-system-x86_64"):
        return
    if os.environ.get("WHIMBREL_REQUIRE_QEMU"):
        raise pytest.UsageError("qemu-system-x86_64 is required (WHIMBREL_REQUIRE_QEMU is set)")
    skip = pytest.mark.skip(reason="qemu-system-x86_64 not installed")
    for item in items:
        if "qemu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A coordinator and hosts host-a, host-b, all connected."""
    c = Cluster(tmp_path)
    try:
        yield c.start("host-a", "host-b")
    finally:
        c.teardown()
