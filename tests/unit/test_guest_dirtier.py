"""The Linux guest's memory writer, run as it is built (a static x86-64 program) on this host,
its memory read through /proc: what QEMU's dirty-rate sampling sees of it."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools import guest_dirtier

PAGE = 4096
REGION_MIB = 1


@pytest.fixture
def dirtier(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    program = tmp_path / "dirty-pages"
    program.write_bytes(guest_dirtier.elf())
    program.chmod(0o755)
    proc = subprocess.Popen([str(program), str(REGION_MIB)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"swept\n"  # its first sweep is done
        yield proc
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _region(pid: int) -> int:
    """The start of the writer's anonymous mapping of REGION_MIB MiB."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        span, *rest = line.split()
        start, end = (int(x, 16) for x in span.split("-"))
        if end - start == REGION_MIB << 20 and len(rest) == 4:  # no file name: anonymous
            return start
    raise AssertionError(f"no {REGION_MIB} MiB anonymous mapping in /proc/{pid}/maps")


def _words(pid: int, start: int) -> list[int]:
    """The first 32-bit word of every page of the region."""
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        data = os.pread(fd, REGION_MIB << 20, start)
    finally:
        os.close(fd)
    return [int.from_bytes(data[i : i + 4], "little") for i in range(0, len(data), PAGE)]


def test_every_page_changes_between_readings_however_many_sweeps_apart(
    dirtier: subprocess.Popen[bytes],
) -> None:
    """QEMU's page sampling calls a page dirty when its hash changed in a second. A value that
    repeated every 128 sweeps made a writer sweeping a multiple of 128 times a second look idle
    (likely why the real-QEMU test once measured a 256 MiB writer at 8 MiB/s); the whole sweep
    counter does not repeat."""
    start = _region(dirtier.pid)
    before = _words(dirtier.pid, start)
    assert all(before), "a page still holds zero after the first sweep"
    deadline = time.monotonic() + 30
    # Until more than a byte's worth of sweeps went by: a repeating byte shows here.
    while True:
        after = _words(dirtier.pid, start)
        if min(after) > max(before) + 256:
            break
        grown = f"{min(after)} after {max(before)}"
        assert time.monotonic() < deadline, f"no page grew by 256 in 30 s: {grown}"
        time.sleep(0.01)
    assert all(a != b for a, b in zip(after, before, strict=True))
    assert all(w & 1 for w in after), "every value is odd, so never zero"
