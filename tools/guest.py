"""Test guests that need no OS (recipes measured in ../shared/DESIGN.md).

`boot_disk` writes a 512-byte boot sector that loops writing memory forever, so RAM stays
dirty and pre-copy with a low bandwidth and a tiny downtime limit never converges.
`reset_disk` writes one that resets the machine at once: a guest sending QEMU's RESET event in a
loop. `random_ram` writes a file of random bytes to back the source's RAM, so a migration has
real weight (zero pages migrate almost for free).
"""

from __future__ import annotations

import os
from pathlib import Path

# Real mode: for each 64 KiB segment from 0x1000 to 0x9000, fill it with a counter; repeat.
DIRTY_LOOP = bytes.fromhex("FA31DB43BA00108EC231FF89D8B90080F3AB81C2001081FA00A075EBEBE5")
# Real mode: mov al, 0xFE; out 0x64, al (the keyboard controller's reset line); jmp $.
RESET_AT_ONCE = bytes.fromhex("B0FEE664EBFE")


def boot_disk(path: Path) -> Path:
    """A 1 MiB raw disk whose boot sector keeps guest memory dirty."""
    return _disk(path, DIRTY_LOOP)


def reset_disk(path: Path) -> Path:
    """A 1 MiB raw disk whose boot sector resets the machine, which boots it again."""
    return _disk(path, RESET_AT_ONCE)


def _disk(path: Path, code: bytes) -> Path:
    sector = code + bytes(510 - len(code)) + b"\x55\xaa"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(sector)
        f.truncate(1 << 20)
    return path


def random_ram(path: Path, mib: int) -> Path:
    """A file of random bytes, `mib` MiB, to back a source's RAM."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size == mib << 20:
        return path
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    return path
