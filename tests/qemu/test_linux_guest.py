"""The Linux guest of tools/linux_guest.py, booted by QEMU directly (no hostd, no coordinator)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import netns
from tools import linux_guest
from tools.bench import guest_big

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

GUEST_IP = "10.77.0.2"
HOST_IP = "10.77.0.1"

# One long-lived connection: send a line, read it back; prints the round trips that succeeded.
ECHO_CLIENT = """
import socket, sys, time
deadline = time.monotonic() + 30
while True:
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
ok = 0
for i in range(20):
    s.sendall(b"probe %d\\n" % i)
    want = b"probe %d\\n" % i
    got = b""
    while len(got) < len(want):
        chunk = s.recv(64)
        if not chunk:
            raise SystemExit("connection closed")
        got += chunk
    assert got == want, got
    ok += 1
print(ok)
"""


@pytest.fixture
def bridge_ns() -> Iterator[str]:
    with netns.namespace_with_bridge() as name:
        netns.ip(name, "addr", "add", f"{HOST_IP}/24", "dev", netns.BRIDGE)
        yield name


def boot(
    guest: linux_guest.Guest, disk: Path, serial: Path, ns: str, tap: str
) -> subprocess.Popen[bytes]:
    args = [
        "ip", "netns", "exec", ns,
        "qemu-system-x86_64",
        "-machine", "pc,accel=tcg",
        "-m", "256M",
        "-nodefaults",
        "-display", "none",
        "-serial", f"file:{serial}",
        "-kernel", str(guest.kernel),
        "-initrd", str(guest.initrd),
        "-append", guest.append(ip=f"{GUEST_IP}/24", load_mib=16),
        "-drive", f"file={disk},format=raw,if=virtio",
        "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
        "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:77:00:02",
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # QEMU creates the tap itself; it has to join the bridge before the guest can answer.
    deadline = time.monotonic() + 10
    while tap not in netns.links(ns):
        assert proc.poll() is None, "QEMU exited early"
        assert time.monotonic() < deadline, "QEMU created no tap"
        time.sleep(0.05)
    netns.ip(ns, "link", "set", tap, "master", netns.BRIDGE, "up")
    return proc


def counters_after(serial: Path, at_least: int, limit: float = 40.0) -> list[int]:
    deadline = time.monotonic() + limit
    while True:
        text = serial.read_text(errors="replace") if serial.exists() else ""
        values = linux_guest.serial_counters(text)
        if len(values) >= at_least:
            return values
        assert time.monotonic() < deadline, f"guest reported {values[-5:]} only:\n{text[-2000:]}"
        time.sleep(0.2)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait(10)


def test_guest_echoes_and_its_disk_counter_never_rewinds_across_a_reboot(
    guest: linux_guest.Guest, bridge_ns: str, tmp_path: Path
) -> None:
    """The guest serves TCP echo on virtio-net and its disk counter continues after a hard stop."""
    disk = linux_guest.counter_disk(tmp_path / "disk.img")
    first_serial = tmp_path / "serial-1.log"
    proc = boot(guest, disk, first_serial, bridge_ns, "wbgtap0")
    try:
        first = counters_after(first_serial, 5)
        assert first == list(range(1, len(first) + 1))
        echo = subprocess.run(
            ["ip", "netns", "exec", bridge_ns, sys.executable, "-c", ECHO_CLIENT,
             GUEST_IP, str(linux_guest.ECHO_PORT)],
            check=False, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert echo.returncode == 0, echo.stderr
        assert echo.stdout.strip() == "20"
    finally:
        stop(proc)
    reported = linux_guest.serial_counters(first_serial.read_text(errors="replace"))
    on_disk = linux_guest.read_counter(disk)
    # Each value is synced before it is reported, so the disk holds at least the last report.
    assert on_disk >= reported[-1]

    second_serial = tmp_path / "serial-2.log"
    proc = boot(guest, disk, second_serial, bridge_ns, "wbgtap0")
    try:
        second = counters_after(second_serial, 3)
    finally:
        stop(proc)
    assert second[0] == on_disk + 1
    assert second == list(range(second[0], second[0] + len(second)))


def test_the_dirtier_writes_every_page_of_its_memory_each_second(
    guest: linux_guest.Guest, tmp_path: Path
) -> None:
    """`whimbrel.dirty=MIB` dirties every page of MIB MiB within a second, as QEMU counts
    them: the heavy load the 1 GiB guest migrates under."""
    dirty_mib = 256
    rate = guest_big.guest_dirty_rate(tmp_path, memory_mib=512, dirty_mib=dirty_mib, vcpus=1)
    # A page counts once however often it was written: every page of the region each second
    # is `dirty_mib` MiB/s; the guest's own few writes come on top.
    assert rate >= dirty_mib * 0.8, rate
