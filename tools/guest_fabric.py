"""A network for the Linux guest as operators would see it, and the client that judges it.

`Fabric` builds, in network namespaces of its own (root needed):
- one namespace per host holding bridge BRIDGE, where that host's QEMU and taps live (hostd's
  `--netns`); a veth pair joins the two bridges (the "switch": SWITCH-a, SWITCH-b);
- a second veth pair between the host namespaces for migration traffic (each QEMU's loopback is
  its own namespace's), addressed MIGRATION_IPS;
- a client namespace hanging off host A's bridge at CLIENT_IP.

`ProbeClient` holds one TCP connection to the guest's echo service and probes it every
millisecond; its result says whether the connection survived and the longest gap between
answers (the client-visible outage). `CounterWatch` samples the guest's disk counter and counts
every rewind. `WriterWatch` samples which QEMUs hold write permission on the guest's disk.
Tests, the demo and the guest benches share these.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tools import linux_guest
from whimbrel.v1 import common_pb2

__all__ = [
    "BRIDGE",
    "CLIENT_IP",
    "GUEST_IP",
    "HOSTS",
    "MAC",
    "SWITCH",
    "CounterWatch",
    "Fabric",
    "FabricUnavailable",
    "ProbeClient",
    "ProbeResult",
    "WriterWatch",
    "linux_vm_spec",
]

BRIDGE = "wbbr0"
SWITCH = "wbsw"
HOSTS = ("host-a", "host-b")
MAC = "52:54:00:77:00:02"
GUEST_IP = "10.77.0.2"
CLIENT_IP = "10.77.0.9"
MIGRATION_IPS = {"host-a": "10.78.0.1", "host-b": "10.78.0.2"}
MIGRATION_PORT = "49300"  # fixed: hostd cannot probe for a free port inside the namespace
_names = itertools.count()


class FabricUnavailable(RuntimeError):
    """This process cannot create network namespaces (not root, or no iproute2)."""


def _run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def _ip(ns: str, *args: str) -> str:
    return _run("ip", "-n", ns, *args)


@dataclass
class Fabric:
    """The namespaces of both hosts and the client; `close` deletes them."""

    namespaces: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls) -> Fabric:
        if os.geteuid() != 0:
            raise FabricUnavailable("the guest network needs root (network namespaces)")
        fabric = cls()
        try:
            for role in (*HOSTS, "client"):
                fabric.namespaces[role] = fabric._namespace_with_bridge()
            a, b, client = fabric.host("host-a"), fabric.host("host-b"), fabric.host("client")
            _ip(a, "link", "add", f"{SWITCH}-a", "type", "veth",
                "peer", "name", f"{SWITCH}-b", "netns", b)  # fmt: skip
            _ip(a, "link", "set", f"{SWITCH}-a", "master", BRIDGE, "up")
            _ip(b, "link", "set", f"{SWITCH}-b", "master", BRIDGE, "up")
            _ip(a, "link", "add", "wbmig", "type", "veth", "peer", "name", "wbmig", "netns", b)
            for host in HOSTS:
                _ip(fabric.host(host), "addr", "add", f"{MIGRATION_IPS[host]}/24", "dev", "wbmig")
                _ip(fabric.host(host), "link", "set", "wbmig", "up")
            _ip(client, "link", "add", "wbcl", "type", "veth", "peer", "name", "wbcl-a", "netns", a)
            _ip(a, "link", "set", "wbcl-a", "master", BRIDGE, "up")
            _ip(client, "addr", "add", f"{CLIENT_IP}/24", "dev", "wbcl")
            _ip(client, "link", "set", "wbcl", "up")
        except (OSError, subprocess.CalledProcessError) as err:
            fabric.close()
            raise FabricUnavailable(f"could not build the guest network: {err}") from err
        return fabric

    def _namespace_with_bridge(self) -> str:
        name = f"wbguest-{os.getpid()}-{next(_names)}"
        _run("ip", "netns", "add", name)
        self.namespaces[name] = name  # deleted by close even if the rest fails
        _ip(name, "link", "set", "lo", "up")
        _ip(name, "link", "add", BRIDGE, "type", "bridge")
        _ip(name, "link", "set", BRIDGE, "up")
        return name

    def host(self, role: str) -> str:
        return self.namespaces[role]

    def hostd_args(self, host: str, guest: linux_guest.Guest) -> list[str]:
        """hostd flags that put `host`'s VMs in its namespace and allow the guest's files."""
        return [
            "--network", "bridge", "--netns", self.host(host), "--allow-bridge", BRIDGE,
            "--allow-kernel-root", str(guest.kernel.parent),
            "--allow-kernel-root", str(guest.initrd.parent),
            "--migration-address", MIGRATION_IPS[host], "--migration-port", MIGRATION_PORT,
        ]  # fmt: skip

    def fdb_port(self, host: str, mac: str = MAC) -> str:
        """The port of `host`'s bridge that learned `mac` ("" when none did)."""
        entries = json.loads(_run("bridge", "-n", self.host(host), "-j", "fdb", "show", "br",
                                  BRIDGE))  # fmt: skip
        ports = [e["ifname"] for e in entries if e.get("mac") == mac and "self" not in e["flags"]]
        return ports[0] if ports else ""

    def cut_migration_link(self) -> None:
        """Destroys every TCP connection on the migration link (`ss -K` in host A's
        namespace): both QEMUs see their migration connection break, as with a link that
        failed, and a new connection (post-copy recovery) can be made at once."""
        _run("ip", "netns", "exec", self.host("host-a"), "ss", "-K", "dst",
             MIGRATION_IPS["host-b"])  # fmt: skip

    def close(self) -> None:
        for name in set(self.namespaces.values()):
            subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)
        self.namespaces.clear()

    def __enter__(self) -> Fabric:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def linux_vm_spec(
    guest: linux_guest.Guest, disk: Path, name: str = "vm-1", memory_mib: int = 256,
    load_mib: int = 16, on_lost: int = common_pb2.LOST_VM_ACTION_STAY_STOPPED,
) -> common_pb2.VmSpec:  # fmt: skip
    """The spec of the Linux guest on the fabric: `disk` as its virtio disk, one NIC on
    BRIDGE, dirtying `load_mib` MiB of memory in a loop."""
    return common_pb2.VmSpec(
        name=name,
        memory_mib=memory_mib,
        vcpus=1,
        disks=[common_pb2.Disk(path=str(disk), format="raw", interface="virtio")],
        nics=[common_pb2.Nic(mac=MAC, bridge=BRIDGE)],
        kernel=str(guest.kernel),
        initrd=str(guest.initrd),
        append=guest.append(ip=f"{GUEST_IP}/24", load_mib=load_mib),
        on_lost=common_pb2.LostVmAction.ValueType(on_lost),
    )


# One long-lived connection probed every millisecond until stdin closes; prints a JSON summary
# with the longest gap between two answers and how long the last answer was ago (a gap still
# open at the stop). Runs in the client namespace.
_PROBE = """
import json, select, socket, sys, time
deadline = time.monotonic() + 60
while True:
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.settimeout(None)
print("connected", flush=True)
answers, longest, error, i = 0, 0.0, "", 0
last = time.monotonic()
try:
    while not select.select([sys.stdin], [], [], 0)[0]:
        want = b"%07d\\n" % (i % 10_000_000)
        s.sendall(want)
        got = b""
        while len(got) < len(want):
            r, _, _ = select.select([s, sys.stdin], [], [], 1.0)
            if sys.stdin in r and s not in r:
                raise StopIteration
            if s in r:
                chunk = s.recv(64)
                if not chunk:
                    raise ConnectionResetError("closed by peer")
                got += chunk
        if got != want:
            raise ConnectionError("wrong echo %r for %r" % (got, want))
        now = time.monotonic()
        longest = max(longest, now - last)
        last = now
        answers += 1
        i += 1
        time.sleep(0.001)
except StopIteration:
    pass
except OSError as err:
    error = repr(err)
silent = time.monotonic() - last
print(json.dumps({"answers": answers, "longest_gap_s": longest, "error": error,
                  "silent_s": silent}), flush=True)
"""


class ProbeClient:
    """A client in the fabric's client namespace holding one connection to the guest."""

    def __init__(self, fabric: Fabric, address: str = GUEST_IP) -> None:
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", fabric.host("client"), sys.executable, "-c", _PROBE,
             address, str(linux_guest.ECHO_PORT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    def connected(self) -> bool:
        """Waits for the connection (the client retries for up to 60 s)."""
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip() == "connected"

    def stop(self) -> ProbeResult:
        """Ends the probing and says what the client saw."""
        out, _ = self.process.communicate("stop\n", timeout=30)
        lines = out.strip().splitlines()
        if not lines:
            return ProbeResult(0, 0.0, "the client printed nothing")
        result = json.loads(lines[-1])
        return ProbeResult(
            result["answers"], result["longest_gap_s"], result["error"], result["silent_s"]
        )


@dataclass(frozen=True)
class ProbeResult:
    answers: int
    # The longest time between two answers: the outage the client saw.
    longest_gap_s: float
    # Why the connection ended early ("" when it survived to the end).
    error: str
    # How long before the stop the last answer came: a gap still open then is not in
    # `longest_gap_s`.
    silent_s: float = 0.0


class CounterWatch(threading.Thread):
    """Samples the disk counter every 10 ms; records every time it went backwards."""

    def __init__(self, disk: Path) -> None:
        super().__init__(name="counter-watch", daemon=True)
        self.disk, self.samples, self.rewinds = disk, [0], 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.01):
            value = linux_guest.read_counter(self.disk)
            if value < self.samples[-1]:
                self.rewinds += 1
            self.samples.append(value)

    def wait_beyond(self, value: int, limit: float) -> bool:
        """Until the disk's counter is past `value`, at most `limit` seconds."""
        deadline = time.monotonic() + limit
        while linux_guest.read_counter(self.disk) <= value:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


# QEMU (block/file-posix.c) holds a shared OFD lock on byte 100 + i of an image for each
# permission bit i it holds; bit 1 is BLK_PERM_WRITE. A QEMU waiting for an incoming migration
# holds none until it activates its disks. One QEMU may briefly hold it on two descriptors (it
# reopens an image on a new descriptor before closing the old), so holders are counted by
# process, from each QEMU's /proc/PID/fdinfo.
_QEMU_WRITE_PERM_BYTE = 101


def _qemu_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as comm:
                    if comm.read().startswith("qemu-system"):
                        pids.append(int(entry))
            except OSError:
                continue  # gone meanwhile
    return pids


def _holds_write_permission(pid: int, disk: str) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != disk:
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                for line in info:
                    # "lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:2146326 100 101"
                    fields = line.split()
                    if fields[:1] != ["lock:"] or len(fields) < 9 or fields[2] == "->":
                        continue
                    start, end = int(fields[7]), fields[8]
                    if start <= _QEMU_WRITE_PERM_BYTE and (
                        end == "EOF" or int(end) >= _QEMU_WRITE_PERM_BYTE
                    ):
                        return True
        except (OSError, ValueError):
            continue
    return False


def write_permission_holders(disk: Path, pids: list[int] | None = None) -> int:
    """How many QEMU processes hold QEMU's write permission on `disk` now."""
    real = os.path.realpath(disk)
    return sum(_holds_write_permission(pid, real) for pid in (pids or _qemu_pids()))


class WriterWatch(threading.Thread):
    """Samples every millisecond how many QEMUs hold write permission on the disk: a second
    writer at any sample is two QEMUs that could write the guest's disk at once."""

    # The QEMUs are looked up afresh this often: a new QEMU needs far longer than that before
    # it activates its disks (an incoming one only after the migration).
    RESCAN_S = 0.02

    def __init__(self, disk: Path) -> None:
        super().__init__(name="writer-watch", daemon=True)
        self.disk, self.samples, self.most = disk, 0, 0
        self.done = threading.Event()

    def run(self) -> None:
        pids: list[int] = []
        scanned = 0.0
        while not self.done.wait(0.001):
            if time.monotonic() - scanned > self.RESCAN_S:
                pids, scanned = _qemu_pids(), time.monotonic()
            self.most = max(self.most, write_permission_holders(self.disk, pids))
            self.samples += 1
