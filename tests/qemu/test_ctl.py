"""whimbrelctl against a real cluster: JSON output, live migrate --wait, and its exit codes."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.qemu.conftest import Cluster
from tools.cluster import BIN

pytestmark = pytest.mark.qemu


def ctl(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(BIN / "whimbrelctl"),
            "--coordinator",
            cluster.address,
            *cluster.client_tls_flags(),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_ctl_json_and_migrate_wait(cluster: Cluster) -> None:
    """hosts/vm list print JSON; migrate --wait streams progress and exits 0 on completion."""
    hosts = ctl(cluster, "--json", "hosts")
    assert hosts.returncode == 0
    assert {h["host_id"] for h in json.loads(hosts.stdout)["hosts"]} == {"host-a", "host-b"}
    cluster.define_and_start("vm-1", "host-a")
    listed = json.loads(ctl(cluster, "--json", "vm", "list").stdout)
    assert listed["vms"][0]["host"] == "host-a"
    migrated = ctl(cluster, "migrate", "vm-1", "--to", "host-b", "--wait", "--id", "m-1")
    assert migrated.returncode == 0, migrated.stderr
    lines = migrated.stdout.splitlines()
    assert "preparing" in lines[0] and "completed" in lines[-1] and "pause=" in lines[-1]
    got = json.loads(ctl(cluster, "--json", "migration", "get", "m-1").stdout)
    assert got["phase"] == "MIGRATION_PHASE_COMPLETED" and got["destination"] == "host-b"


def test_ctl_exit_codes(cluster: Cluster) -> None:
    """Refused: 1 with the status; unreachable coordinator: 3; usage error: 2."""
    refused = ctl(cluster, "migrate", "nope", "--to", "host-b")
    assert refused.returncode == 1 and "NOT_FOUND" in refused.stderr
    as_json = ctl(cluster, "--json", "vm", "get", "nope")
    assert json.loads(as_json.stdout)["error"]["code"] == "NOT_FOUND"
    gone = subprocess.run(
        [str(BIN / "whimbrelctl"), "--coordinator", "127.0.0.1:1", "hosts"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert gone.returncode == 3 and "cannot reach" in gone.stderr
    assert ctl(cluster, "migrate").returncode == 2


def test_ctl_defines_a_directly_booted_linux_vm(cluster: Cluster) -> None:
    """vm define takes a kernel, initrd, command line and virtio disks; a kernel path that is
    not absolute is refused (exit 1, INVALID_ARGUMENT) and defines nothing."""
    disk = str(cluster.shared / "linux.img")
    defined = ctl(cluster, "--json", "vm", "define", "linux-1", "--disk", disk,
                  "--disk-interface", "virtio", "--kernel", "/boot/vmlinuz",
                  "--initrd", "/boot/initrd.img", "--append", "console=ttyS0 quiet")  # fmt: skip
    assert defined.returncode == 0, defined.stderr
    spec = json.loads(ctl(cluster, "--json", "vm", "get", "linux-1").stdout)["spec"]
    assert (spec["kernel"], spec["initrd"], spec["append"]) == (
        "/boot/vmlinuz", "/boot/initrd.img", "console=ttyS0 quiet")  # fmt: skip
    assert spec["disks"][0]["interface"] == "virtio"
    refused = ctl(cluster, "vm", "define", "linux-2", "--kernel", "vmlinuz")
    assert refused.returncode == 1 and "INVALID_ARGUMENT" in refused.stderr
    assert "kernel path" in refused.stderr
    assert ctl(cluster, "vm", "get", "linux-2").returncode == 1
