"""A real Linux guest: Debian's cloud kernel and an initramfs of static busybox.

`build` assembles the initramfs from the installed packages `linux-image-cloud-amd64` and
`busybox-static` and caches it under a build directory, keyed by kernel version and the init
script. The guest, told its settings on the kernel command line (`whimbrel.ip=ADDR/LEN`,
`whimbrel.load=MIB`):
- loads the virtio modules in dependency order and brings up eth0 (virtio-net) statically;
- serves TCP echo on port ECHO_PORT (one `cat` per connection, so connections are long-lived);
- writes a strictly increasing counter to the first sector of its virtio disk (/dev/vda), with a
  sync after each write, continuing from what the disk holds, and reports each value on its
  serial console as `COUNTER_TAG N`;
- optionally dirties memory by rewriting LOAD MiB in /dev/shm with /dev/urandom in a loop
  (`whimbrel.load=MIB`), or, much faster, by writing to every page of DIRTY MiB over and over,
  one writer per vCPU (`whimbrel.dirty=MIB`, tools/guest_dirtier.py).

`counter_disk` creates the disk; `read_counter` reads the value an image holds.
"""

from __future__ import annotations

import hashlib
import io
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tools import guest_dirtier

__all__ = [
    "COUNTER_TAG",
    "ECHO_PORT",
    "Guest",
    "GuestUnavailable",
    "build",
    "counter_disk",
    "kernel_version",
    "read_counter",
    "serial_counters",
]

ECHO_PORT = 7
COUNTER_TAG = "whimbrel-counter"
MODULES = ("virtio_pci", "virtio_net", "virtio_blk")
BUSYBOX = Path("/bin/busybox")
DEFAULT_BUILD_DIR = Path(__file__).resolve().parent.parent / "build" / "linux-guest"

# The counter lives in sector 0 as "WBC <n>\n"; dd with conv=fsync then sync makes each value
# durable before the next is written, so a reader of the image never sees the counter go back.
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/shm
mount -t tmpfs shm /dev/shm
for m in $(cat /modules.order); do insmod "/lib/modules/$m"; done
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    whimbrel.ip=*) IP="${arg#whimbrel.ip=}" ;;
    whimbrel.load=*) LOAD="${arg#whimbrel.load=}" ;;
    whimbrel.dirty=*) DIRTY="${arg#whimbrel.dirty=}" ;;
  esac
done
ip link set lo up
if [ -n "$IP" ]; then
  ip link set eth0 up
  ip addr add "$IP" dev eth0
  setsid nc -ll -p @PORT@ -e /bin/cat &
fi
if [ -n "$LOAD" ] && [ "$LOAD" -gt 0 ]; then
  ( while true; do dd if=/dev/urandom of=/dev/shm/load bs=1M count="$LOAD" 2>/dev/null; done ) &
fi
if [ -n "$DIRTY" ] && [ "$DIRTY" -gt 0 ]; then
  for cpu in $(seq "$(nproc)"); do
    /bin/dirty-pages "$DIRTY" > "/tmp/swept$cpu" &
  done
  # Up (and the disk counter going) only once every writer has made its memory real.
  for cpu in $(seq "$(nproc)"); do
    until [ -s "/tmp/swept$cpu" ]; do sleep 0.1; done
  done
fi
echo "whimbrel-guest up ip=$IP load=$LOAD dirty=$DIRTY"
if [ -b /dev/vda ]; then
  n=$(head -c 32 /dev/vda | sed -n 's/^WBC \([0-9]*\)$/\1/p' | head -n 1)
  n=${n:-0}
  while true; do
    n=$((n + 1))
    printf 'WBC %d\n' "$n" | dd of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null
    sync
    echo "@TAG@ $n"
    sleep 0.05
  done
fi
while true; do sleep 3600; done
"""


class GuestUnavailable(RuntimeError):
    """The kernel or busybox packages are missing, so no guest can be built."""


@dataclass(frozen=True)
class Guest:
    """Paths of a built guest, and the kernel command line it expects."""

    kernel: Path
    initrd: Path
    version: str

    def append(self, ip: str = "", load_mib: int = 0, dirty_mib: int = 0) -> str:
        parts = ["console=ttyS0", "quiet", "panic=-1"]
        if ip:
            parts.append(f"whimbrel.ip={ip}")
        if load_mib:
            parts.append(f"whimbrel.load={load_mib}")
        if dirty_mib:
            parts.append(f"whimbrel.dirty={dirty_mib}")
        return " ".join(parts)


def kernel_version() -> str:
    """The newest installed cloud kernel's version, e.g. `6.1.0-57-cloud-amd64`."""
    kernels = sorted(Path("/boot").glob("vmlinuz-*-cloud-amd64"))
    if not kernels or not BUSYBOX.exists():
        raise GuestUnavailable(
            "install linux-image-cloud-amd64 and busybox-static to build the Linux guest"
        )
    return kernels[-1].name.removeprefix("vmlinuz-")


def _module_paths(version: str) -> list[Path]:
    """The .ko files MODULES need, in the order insmod must load them, each once."""
    out = subprocess.run(
        ["modprobe", "-S", version, "-a", "--show-depends", *MODULES],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    seen: list[Path] = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "insmod" and Path(fields[1]) not in seen:
            seen.append(Path(fields[1]))
    if not seen:
        raise GuestUnavailable(f"no virtio modules found for kernel {version}")
    return seen


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """An uncompressed newc cpio archive of (name, mode, data); directories have no data."""
    out = io.BytesIO()

    def pad(n: int) -> None:
        out.write(b"\0" * (-n % 4))

    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        header = b"070701" + b"".join(f"{f:08X}".encode() for f in fields)
        out.write(header + encoded)
        pad(len(header) + len(encoded))
        out.write(data)
        pad(len(data))
    return out.getvalue()


def build(build_dir: Path = DEFAULT_BUILD_DIR) -> Guest:
    """The guest's kernel and initramfs, building the initramfs once per kernel and script."""
    version = kernel_version()
    modules = _module_paths(version)
    init = INIT.replace("@PORT@", str(ECHO_PORT)).replace("@TAG@", COUNTER_TAG)
    dirtier = guest_dirtier.elf()
    key = hashlib.sha256(
        "\0".join([version, init, dirtier.hex(), *map(str, modules)]).encode()
    ).hexdigest()[:12]
    initrd = build_dir / f"initramfs-{version}-{key}.cpio"
    kernel = Path("/boot") / f"vmlinuz-{version}"
    if initrd.exists():
        return Guest(kernel=kernel, initrd=initrd, version=version)
    directory, executable, regular = 0o040755, 0o100755, 0o100644
    entries: list[tuple[str, int, bytes]] = [
        (d, directory, b"")
        for d in ("bin", "dev", "proc", "sys", "lib", "lib/modules", "tmp", "sbin")
    ]
    entries.append(("bin/busybox", executable, BUSYBOX.read_bytes()))
    entries.append(("init", executable, init.encode()))
    entries.append(("bin/dirty-pages", executable, dirtier))
    order = []
    for module in modules:
        entries.append((f"lib/modules/{module.name}", regular, module.read_bytes()))
        order.append(module.name)
    entries.append(("modules.order", regular, ("\n".join(order) + "\n").encode()))
    build_dir.mkdir(parents=True, exist_ok=True)
    partial = initrd.with_suffix(".partial")
    partial.write_bytes(_cpio_newc(entries))
    partial.replace(initrd)
    return Guest(kernel=kernel, initrd=initrd, version=version)


def counter_disk(path: Path, mib: int = 4) -> Path:
    """A raw disk image whose counter starts at 0."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(mib << 20)
    return path


def read_counter(path: Path) -> int:
    """The counter value a disk image holds (0 for a fresh disk)."""
    with open(path, "rb") as f:
        head = f.read(32)
    match = re.match(rb"WBC (\d+)\n", head)
    return int(match.group(1)) if match else 0


def serial_counters(text: str) -> list[int]:
    """The counter values a serial console log reported, in order."""
    return [int(m) for m in re.findall(rf"^{COUNTER_TAG} (\d+)\r?$", text, re.MULTILINE)]
