"""The log the audit tests start from."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.core import inputs as I
from tools.sim import Driver, SimHosts, running_vm, store_log
from whimbrel.v1 import events_pb2


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    """A real SQLite log of one completed post-copy migration (simulated hosts)."""
    driver = Driver()
    driver.connect("host-a", "host-b")
    running_vm(driver)
    hosts = SimHosts()
    hosts.leases["vm-1"] = ("host-a", 1)
    driver.request(I.StartMigration("m-1", "vm-1", "host-b", 2, events_pb2.MigrationPolicy(), 1))
    driver.run("m-1", hosts)
    path = tmp_path / "log.db"
    store_log(driver.log, path).close()
    return path
