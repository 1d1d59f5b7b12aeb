"""hostd defends itself against a wrong coordinator: each hostile command is refused with a
message naming what was wrong, and nothing happens (no QEMU started, no file created or
changed, no lease taken or given up)."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from hostd import qemu
from hostd.agent import Agent
from hostd.drivers.lease import FileLeaseDriver
from hostd.drivers.network import NullNetworkDriver
from hostd.errors import CommandRejected, LeaseError
from hostd.guard import Guard, check_migration_uri
from hostd.store import HostStore
from hostd.vm import VmRuntime
from whimbrel.files import UnsafeFile
from whimbrel.v1 import common_pb2, events_pb2, host_pb2

K = events_pb2


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Every QEMU launch hostd attempts (none is started for real)."""
    calls: list[list[str]] = []

    async def launch(args: list[str], paths: qemu.VmPaths, vm: str) -> int:
        calls.append(args)
        raise AssertionError(f"QEMU launched for {vm}")

    monkeypatch.setattr(qemu, "launch", launch)
    return calls


def make_agent(tmp_path: Path, **guard: Any) -> Agent:
    roots = guard.pop("disk_roots", [str(tmp_path / "disks")])
    return Agent(
        "host-a", "127.0.0.1:1", tmp_path / "state", tmp_path / "locks", "127.0.0.1",
        NullNetworkDriver(), guard=Guard.of(roots, guard.pop("bridges", []), **guard),
    )  # fmt: skip


def command(kind: int, vm: str = "vm-1", **args: Any) -> host_pb2.Command:
    return host_pb2.Command(
        command_id=f"c-{kind}-{vm}", epoch=1, vm=vm, kind=kind, args=K.CommandArgs(**args)
    )


def spec(name: str = "vm-1", disk: str = "", **fields: Any) -> common_pb2.VmSpec:
    disks = [common_pb2.Disk(path=disk, format="raw")] if disk else []
    return common_pb2.VmSpec(name=name, memory_mib=64, vcpus=1, disks=disks, **fields)


def answer(a: Agent) -> K.CommandFailed:
    """The agent's answer to the last command, which must be a refusal."""
    last = a.pending[-1].payload
    assert last.WhichOneof("kind") == "command_failed", last
    return last.command_failed


def files_under(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() if p.is_file() else b""
        for p in sorted(path.rglob("*"))
        if not p.is_dir()
    }


async def refused(a: Agent, c: host_pb2.Command, message: str) -> K.CommandFailed:
    await a._handle(c)
    failure = answer(a)
    assert message in failure.error, failure.error
    return failure


# --- migration URIs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri",
    [
        "exec:sh -c 'touch /tmp/pwned'",
        "unix:/run/qemu.sock",
        "fd:3",
        "tcp:attacker.example:4444",
        "tcp:127.0.0.1:4444,ipv4=on",
        "tcp:127.0.0.1:99999",
        "tcp:127.0.0.1:",
        "tcp:127.0.0.1",
        "rdma:127.0.0.1:4444",
        "tcp:127.0.0.1:٤٤",
        # Python reads all after `%` as an IPv6 scope; QEMU would connect to port 34459 with
        # an option of the coordinator's choosing.
        "tcp:[::1%1]:34459,ipv6=on,]:4444",
        "tcp:[fe80::1%eth0]:4444",
    ],
)
def test_only_tcp_to_an_ip_and_port_is_a_migration_uri(uri: str) -> None:
    """Anything but tcp:<IP>:<port> is refused, naming the URI."""
    with pytest.raises(CommandRejected, match="refused migration URI"):
        check_migration_uri(uri)


@pytest.mark.parametrize("uri", ["tcp:127.0.0.1:4444", "tcp:[::1]:4444", "tcp:10.1.2.3:1"])
def test_tcp_to_an_ip_and_port_is_accepted(uri: str) -> None:
    """The URIs hostd itself hands out pass."""
    assert check_migration_uri(uri) == uri


def recording_qmp(a: Agent, tmp_path: Path) -> tuple[VmRuntime, list[str]]:
    """A VM runtime of `a` whose QMP commands are only recorded (for refusals that must come
    before any reaches QEMU)."""
    sent: list[str] = []
    runtime = VmRuntime(spec(), tmp_path / "state" / "vms" / "vm-1", a.emit, role="")

    async def execute(name: str, arguments: Any = None) -> Any:
        sent.append(name)
        return {}

    runtime.execute = execute  # type: ignore[method-assign]
    a.executor.vms["vm-1"] = runtime
    return runtime, sent


async def test_exec_uri_is_refused_before_qemu_hears_of_it(tmp_path: Path) -> None:
    """START_MIGRATION and RESUME_MIGRATION to exec: fail before any QMP command is sent."""
    a = make_agent(tmp_path)
    runtime, sent = recording_qmp(a, tmp_path)
    evil = "exec:sh -c 'touch /tmp/pwned'"
    await refused(a, command(K.COMMAND_KIND_START_MIGRATION, uri=evil), "refused migration URI")
    await refused(a, command(K.COMMAND_KIND_RESUME_MIGRATION, uri=evil), "refused migration URI")
    assert sent == [] and runtime.role == ""
    await a.close()


async def test_a_switch_without_post_copy_is_refused_before_qemu_hears_of_it(
    tmp_path: Path,
) -> None:
    """START_MIGRATION asking for the switch to post-copy without the postcopy-ram capability:
    QEMU would start the migration and then refuse the switch, leaving a migration running
    under a failed command. Refused before any QMP command."""
    a = make_agent(tmp_path)
    runtime, sent = recording_qmp(a, tmp_path)
    start = command(K.COMMAND_KIND_START_MIGRATION, uri="tcp:127.0.0.1:4444", start_postcopy=True)
    failure = await refused(a, start, "start_postcopy without postcopy")
    assert failure.rejected
    assert sent == [] and runtime.role == ""
    await a.close()


# --- disks, memory files, bridges ----------------------------------------------------------


@pytest.mark.parametrize(
    ("disk", "message"),
    [
        ("/etc/shadow", "is not under an allowed root"),
        ("/dev/sda", "is not under an allowed root"),
        ("{root}/../../etc/shadow", "is not under an allowed root"),
        ("{root}/link-to-shadow", "is not under an allowed root"),
        ("{root}/disk.img,file.locking=off", "No such file or directory"),
        ("{root}", "is not a regular file"),
    ],
)
async def test_a_disk_hostd_does_not_allow_is_refused_and_nothing_happens(
    tmp_path: Path, launches: list[list[str]], disk: str, message: str
) -> None:
    """START_VM with a host file, a block device, a path leading out of the allowed root (by
    `..` or a symlink), a comma-injected path or a directory: refused before the lease is
    taken, no QEMU launched, no file written."""
    root = tmp_path / "disks"
    root.mkdir()
    (root / "disk.img").write_bytes(b"\0" * 512)
    (root / "link-to-shadow").symlink_to("/etc/shadow")
    a = make_agent(tmp_path)
    before = files_under(tmp_path / "state")
    path = disk.format(root=root)
    failure = await refused(
        a, command(K.COMMAND_KIND_START_VM, spec=spec(disk=path), lease_generation=1), message
    )
    assert path in failure.error or repr(path) in failure.error
    assert launches == []
    assert not (tmp_path / "locks" / "vm-1.lease").exists()
    assert not (tmp_path / "state" / "vms").exists()
    after = files_under(tmp_path / "state")
    assert set(after) - set(before) <= {"hostd.db-wal", "hostd.db-shm", "hostd.db"}
    await a.close()


def test_block_devices_only_when_allowed(tmp_path: Path) -> None:
    """A block device under an allowed root is refused unless --allow-block-devices."""
    device = next(
        (p for p in sorted(Path("/dev").glob("loop*")) if stat.S_ISBLK(p.stat().st_mode)), None
    )
    assert device is not None, "this test needs a loop block device in /dev"
    disk = spec(disk=str(device))
    with pytest.raises(CommandRejected, match="is a block device"):
        Guard.of(["/dev"], []).spec(disk)
    assert Guard.of(["/dev"], [], allow_block_devices=True).spec(disk).disks[0].path == str(device)


def _qemu_img_create(*args: str) -> None:
    subprocess.run(["qemu-img", "create", "-q", *args], check=True)


def test_a_qcow2_disk_naming_files_outside_the_roots_is_refused(tmp_path: Path) -> None:
    """A qcow2 image names other files itself: with a backing file or an external data file
    outside the allowed root, QEMU opened them and the guest wrote one. Refused; a plain qcow2
    image passes. Real images, made by qemu-img."""
    root, outside = tmp_path / "disks", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    img = _qemu_img_create
    img("-f", "raw", str(outside / "secret.raw"), "1M")
    img("-f", "qcow2", "-b", str(outside / "secret.raw"), "-F", "raw", str(root / "b.qcow2"))
    img("-f", "qcow2", "-o", f"data_file={outside / 'victim.raw'}", str(root / "d.qcow2"), "1M")
    img("-f", "qcow2", str(root / "plain.qcow2"), "1M")
    guard = Guard.of([str(root)], [])

    def qcow2(name: str) -> common_pb2.VmSpec:
        disk = common_pb2.Disk(path=str(root / name), format="qcow2")
        return common_pb2.VmSpec(name="vm-1", memory_mib=64, vcpus=1, disks=[disk])

    with pytest.raises(CommandRejected, match="names a backing file"):
        guard.spec(qcow2("b.qcow2"))
    with pytest.raises(CommandRejected, match="names an external data file"):
        guard.spec(qcow2("d.qcow2"))
    assert guard.spec(qcow2("plain.qcow2")).disks[0].path == str(root / "plain.qcow2")
    (root / "raw.img").write_bytes(bytes(4096))  # called qcow2, it is not one
    with pytest.raises(CommandRejected, match="is not a qcow2 image"):
        guard.spec(qcow2("raw.img"))


def test_a_qcow2_image_swapped_after_the_check_is_judged_again_where_opened(
    tmp_path: Path,
) -> None:
    """The header was read by path at the check and the disk opened later: an image renamed
    into its place in between (one naming a backing file outside the root) reached QEMU
    unjudged. The header is now read through the descriptor QEMU reopens."""
    root, outside = tmp_path / "disks", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    img = _qemu_img_create
    img("-f", "raw", str(outside / "secret.raw"), "1M")
    img("-f", "qcow2", str(root / "disk.qcow2"), "1M")
    img("-f", "qcow2", "-b", str(outside / "secret.raw"), "-F", "raw", str(root / "evil.qcow2"))
    guard = Guard.of([str(root)], [])
    disk = common_pb2.Disk(path=str(root / "disk.qcow2"), format="qcow2")
    resolved = guard.spec(common_pb2.VmSpec(name="vm-1", memory_mib=64, vcpus=1, disks=[disk]))
    (root / "evil.qcow2").rename(root / "disk.qcow2")  # the swap, between check and open
    with pytest.raises(CommandRejected, match="names a backing file"):
        guard.open_disk(resolved.disks[0].path, "vm-1", "qcow2")


def test_a_disk_directory_swapped_for_a_symlink_after_the_check_is_refused(
    tmp_path: Path,
) -> None:
    """The check resolves the path once; QEMU opened it by name later, so a writer of the
    shared disk root who swapped a directory for a symlink in between sent QEMU (and the
    guest's writes) outside the root. hostd now opens the disk itself, beneath its root and
    never through a symlink, and QEMU reopens that descriptor through /proc/self/fd."""
    root, outside = tmp_path / "disks", tmp_path / "outside"
    (root / "vm-1").mkdir(parents=True)
    outside.mkdir()
    (root / "vm-1" / "disk.img").write_bytes(b"guest disk")
    (outside / "disk.img").write_bytes(b"precious")
    guard = Guard.of([str(root)], [])
    resolved = guard.spec(spec(disk=str(root / "vm-1" / "disk.img")))
    fd = guard.open_disk(resolved.disks[0].path, "vm-1", "raw")
    try:
        assert os.read(fd, 10) == b"guest disk"
    finally:
        os.close(fd)
    (root / "vm-1").rename(root / "vm-1.old")
    (root / "vm-1").symlink_to(outside)  # the swap, between the check and the open
    with pytest.raises(CommandRejected, match="a symlink on the way"):
        guard.open_disk(resolved.disks[0].path, "vm-1", "raw")
    args = qemu.command_line(resolved, qemu.VmPaths(tmp_path / "state"), "host-a", incoming=False,
                        disk_fds=[7])  # fmt: skip
    assert "file=/proc/self/fd/7,format=raw,if=ide" in args


async def test_a_memory_file_outside_the_roots_is_refused(
    tmp_path: Path, launches: list[list[str]]
) -> None:
    """A file memory backing is held to the same roots as disks."""
    a = make_agent(tmp_path)
    memory = common_pb2.MemoryBacking(kind="file", path="/etc/shadow")
    hostile = spec(memory_backing=memory)
    await refused(
        a, command(K.COMMAND_KIND_START_VM, spec=hostile, lease_generation=1), "memory file"
    )
    assert launches == [] and not (tmp_path / "state" / "vms").exists()
    assert not (tmp_path / "locks" / "vm-1.lease").exists()
    # A destination backs RAM anonymously: the source's memory file is not checked there.
    assert Guard.of([str(tmp_path)], []).spec(hostile, incoming=True).memory_backing == memory
    await a.close()


def test_a_kernel_only_under_a_kernel_root(tmp_path: Path) -> None:
    """A direct-boot kernel and initrd are files the guest reads: only under
    --allow-kernel-root (a disk root is not enough, nor a symlink out), on both ends."""
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "vmlinuz").write_bytes(b"kernel")
    (boot / "initrd").write_bytes(b"initrd")
    (boot / "shadow").symlink_to("/etc/shadow")
    guest = spec(kernel=str(boot / "vmlinuz"), initrd=str(boot / "initrd"), append="quiet")
    with pytest.raises(CommandRejected, match=r"kernel .*\(--allow-kernel-root: none\)"):
        Guard.of([str(tmp_path)], []).spec(guest)
    allowed = Guard.of([], [], kernel_roots=[str(boot)])
    for incoming in (False, True):
        resolved = allowed.spec(guest, incoming=incoming)
        assert (resolved.kernel, resolved.initrd) == (str(boot / "vmlinuz"), str(boot / "initrd"))
    with pytest.raises(CommandRejected, match="initrd"):
        allowed.spec(spec(kernel=str(boot / "vmlinuz"), initrd=str(boot / "shadow")))


async def test_a_bridge_not_allowed_is_refused(tmp_path: Path, launches: list[list[str]]) -> None:
    """A NIC may name only a bridge given with --allow-bridge."""
    a = make_agent(tmp_path, bridges=["br-vms"])
    nic = common_pb2.Nic(mac="52:54:00:00:00:01", bridge="br-mgmt")
    hostile = spec(nics=[nic])
    await refused(
        a,
        command(K.COMMAND_KIND_START_VM, spec=hostile, lease_generation=1),
        "bridge 'br-mgmt' of NIC 52:54:00:00:00:01 is not allowed here (--allow-bridge: br-vms)",
    )
    assert launches == [] and not (tmp_path / "locks" / "vm-1.lease").exists()
    await a.close()


def test_commas_in_values_cannot_add_options(tmp_path: Path) -> None:
    """A comma in a disk or memory path is doubled, so QEMU reads it as part of the value."""
    memory = common_pb2.MemoryBacking(kind="file", path="/d/ram,share=on")
    hostile = spec(disk="/d/a.img,file.locking=off", memory_backing=memory)
    args = qemu.command_line(hostile, qemu.VmPaths(tmp_path), "host-a", incoming=False)
    assert "file=/d/a.img,,file.locking=off,format=raw,if=ide" in args
    assert any("mem-path=/d/ram,,share=on,share=off" in a for a in args)
    assert args[args.index("-sandbox") + 1] == "on" and "-runas" not in args
    as_user = qemu.command_line(hostile, qemu.VmPaths(tmp_path), "h", incoming=True, user="qemu")
    assert as_user[as_user.index("-runas") + 1] == "qemu"


# --- names and the lockspace ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["../etc", ".hidden", "..", "vm/1", "vm-1\n", "", "-vm"])
async def test_names_that_could_leave_their_directory_are_refused(
    tmp_path: Path, launches: list[list[str]], name: str
) -> None:
    """VM names with `/`, a leading `.`, or a trailing newline reach no file."""
    a = make_agent(tmp_path)
    await refused(a, command(K.COMMAND_KIND_ACQUIRE_LEASE, vm=name, lease_generation=1), "refused")
    hostile = spec(name=name)
    await refused(
        a, command(K.COMMAND_KIND_START_VM, vm=name, spec=hostile, lease_generation=1), "refused"
    )
    assert launches == []
    assert not (tmp_path / "locks").exists() or list((tmp_path / "locks").iterdir()) == []
    assert not (tmp_path / "state" / "vms").exists()
    await a.close()
    with pytest.raises(LeaseError, match="is invalid"):
        await FileLeaseDriver(tmp_path / "locks").acquire(name, "host-a", 1)


@pytest.mark.parametrize("peer", ["host-b,tls-creds=x", "../host-b", "Host_B", "h" * 70])
async def test_a_peer_host_that_is_not_a_host_name_is_refused(
    tmp_path: Path, launches: list[list[str]], peer: str
) -> None:
    """The migration peer's name reaches QEMU's TLS checks (tls-hostname, tls-authz): anything
    but a host name is refused before QEMU or the lockspace hear of the command."""
    a = make_agent(tmp_path)
    failure = await refused(
        a,
        command(K.COMMAND_KIND_PREPARE_INCOMING, spec=spec(), peer_host=peer),
        "refused: peer host",
    )
    assert failure.rejected and launches == []
    assert not (tmp_path / "state" / "vms").exists()
    await a.close()


async def test_a_migration_id_leading_with_a_dot_is_refused(tmp_path: Path) -> None:
    """Migration ids follow the shared rules too."""
    a = make_agent(tmp_path)
    c = command(K.COMMAND_KIND_ACQUIRE_LEASE, lease_generation=1)
    c.migration_id = "../m-1"
    await refused(a, c, "migration id '../m-1' is invalid")
    assert not (tmp_path / "locks" / "vm-1.lease").exists()
    await a.close()


async def test_a_spec_naming_another_vm_is_refused(
    tmp_path: Path, launches: list[list[str]]
) -> None:
    """The command's VM and its spec's name must agree."""
    a = make_agent(tmp_path)
    c = command(K.COMMAND_KIND_START_VM, vm="vm-1", spec=spec(name="vm-2"), lease_generation=1)
    await refused(a, c, "the spec names VM 'vm-2', the command 'vm-1'")
    assert launches == []
    await a.close()


@pytest.mark.parametrize("planted", ["vm-1.lease", "vm-1.lock"])
async def test_a_symlink_planted_in_the_lockspace_is_refused(tmp_path: Path, planted: str) -> None:
    """A symlink in the shared lockspace is never followed: the acquire fails, the file it
    points to is untouched (not created, not written)."""
    locks = tmp_path / "locks"
    locks.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (locks / planted).symlink_to(victim)
    dangling = tmp_path / "created-elsewhere"
    (locks / "vm-2.lock").symlink_to(dangling)
    a = make_agent(tmp_path)
    await refused(a, command(K.COMMAND_KIND_ACQUIRE_LEASE, lease_generation=1), "symlink")
    await refused(a, command(K.COMMAND_KIND_ACQUIRE_LEASE, "vm-2", lease_generation=1), "symlink")
    assert victim.read_bytes() == b"precious" and not dangling.exists()
    await a.close()


async def test_a_hard_link_planted_in_the_lockspace_is_refused(tmp_path: Path) -> None:
    """A hard link to a file elsewhere is refused as well (O_NOFOLLOW cannot see it)."""
    locks = tmp_path / "locks"
    locks.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious" * 128)
    os.link(victim, locks / "vm-1.lease")
    leases = FileLeaseDriver(locks)
    with pytest.raises(LeaseError, match="hard links"):
        await leases.acquire("vm-1", "host-a", 1)
    assert victim.read_bytes() == b"precious" * 128


def test_a_symlinked_state_database_is_refused(tmp_path: Path) -> None:
    """hostd's SQLite file is never opened through a symlink."""
    state = tmp_path / "state"
    state.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (state / "hostd.db").symlink_to(victim)
    with pytest.raises(UnsafeFile, match="symlink"):
        HostStore(state / "hostd.db")
    assert victim.read_bytes() == b"precious"


# --- leases: cont and release --------------------------------------------------------------


def paused_vm(a: Agent, tmp_path: Path, sent: list[str]) -> VmRuntime:
    """A VM runtime whose QMP commands are recorded, not sent."""
    runtime = VmRuntime(spec(), tmp_path / "state" / "vms" / "vm-1", a.emit, role="")

    async def execute(name: str, arguments: Any = None) -> Any:
        sent.append(name)
        runtime.running = name == "cont"
        return {}

    runtime.execute = execute  # type: ignore[method-assign]
    a.executor.vms["vm-1"] = runtime
    return runtime


async def test_cont_only_while_this_host_holds_the_lease(tmp_path: Path) -> None:
    """RESUME_VM is refused while nobody, another host, or this host at a lower generation
    than the command's holds the lease; `cont` is never sent then."""
    a = make_agent(tmp_path)
    sent: list[str] = []
    paused_vm(a, tmp_path, sent)
    await refused(a, command(K.COMMAND_KIND_RESUME_VM), "refused cont: the lease of vm-1 is "
                  "held by nobody, not by host-a")  # fmt: skip
    leases = a.executor.lease
    await leases.acquire("vm-1", "host-b", 3)
    c = command(K.COMMAND_KIND_RESUME_VM)
    c.command_id = "c-2"
    await refused(a, c, "held by host-b at generation 3, not by host-a")
    await leases.release("vm-1", "host-b")
    await leases.acquire("vm-1", "host-a", 4)
    c = command(K.COMMAND_KIND_RESUME_VM, lease_generation=5)
    c.command_id = "c-3"
    await refused(a, c, "at generation 5 or later")
    assert sent == []
    c = command(K.COMMAND_KIND_RESUME_VM, lease_generation=4)
    c.command_id = "c-4"
    await a._handle(c)
    assert a.pending[-1].payload.WhichOneof("kind") == "command_succeeded"
    assert sent == ["cont"]
    await a.close()


async def test_release_lease_releases_only_the_generation_it_names(tmp_path: Path) -> None:
    """A release naming generation 1 fails once this host holds generation 2 (taken again
    since): the lease stays; naming 2 releases it."""
    a = make_agent(tmp_path)
    leases = a.executor.lease
    await leases.acquire("vm-1", "host-a", 1)
    await leases.release("vm-1", "host-a")
    await leases.acquire("vm-1", "host-a", 2)
    before = (tmp_path / "locks" / "vm-1.lease").read_bytes()
    await refused(
        a,
        command(K.COMMAND_KIND_RELEASE_LEASE, lease_generation=1),
        "held by host-a at generation 2, not 1: not released",
    )
    assert (tmp_path / "locks" / "vm-1.lease").read_bytes() == before
    c = command(K.COMMAND_KIND_RELEASE_LEASE, lease_generation=2)
    c.command_id = "c-2"
    await a._handle(c)
    assert [e.payload.WhichOneof("kind") for e in a.pending[-2:]] == [
        "lease_released",
        "command_succeeded",
    ]
    assert leases.read("vm-1").holder == ""
    await a.close()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--host-id", "../host"], "host name '../host' is invalid"),
        (["--host-id", "host-a", "--migration-advertise", "relay.example:4444"], "refused"),
        (["--host-id", "host-a", "--migration-address", "localhost"], "refused"),
        (["--host-id", "host-a", "--capacity-vcpus", "0"], "a whole number from 1 up"),
        (["--host-id", "host-a", "--capacity-memory-mib", "4294967296"], "from 1 up"),
        (["--host-id", "host-a", "--network-timeout", "0"], "not a positive number of seconds"),
        (["--host-id", "host-a", "--network-timeout", "inf"], "not a positive number"),
        (["--host-id", "host-a", "--coordinator", "127.0.0.1:7700,h:99999"], "in 1..65535"),
        (["--host-id", "host-a", "--coordinator", ","], "names no coordinator"),
    ],
)
def test_hostd_will_not_start_with_settings_it_would_refuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    """Its own host id and addresses follow the rules it holds commands to (exit 2)."""
    from hostd.main import main

    with pytest.raises(SystemExit) as exited:
        main([*flags, "--state-dir", str(tmp_path / "s"), "--lockspace", str(tmp_path / "l")])
    assert exited.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not (tmp_path / "l").exists()


async def test_an_unreachable_coordinator_is_one_warning_per_outage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """hostd retries about every second while the coordinator is away; the operator's log
    gets one WARNING for the outage, the retries go to DEBUG."""
    a = make_agent(tmp_path)  # its coordinator, 127.0.0.1:1, refuses every connection
    third_attempt = asyncio.Event()

    class Attempts(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "(attempt 3)" in record.getMessage():
                third_attempt.set()

    watcher = Attempts()
    logging.getLogger("whimbrel.hostd").addHandler(watcher)
    try:
        with caplog.at_level("DEBUG", logger="whimbrel.hostd"):
            runner = asyncio.create_task(a.run())
            await asyncio.wait_for(third_attempt.wait(), 10)
            a.stopping.set()
            await asyncio.wait_for(runner, 10)
    finally:
        logging.getLogger("whimbrel.hostd").removeHandler(watcher)
    warnings = [r for r in caplog.records if r.levelno == 30 and r.name == "whimbrel.hostd"]
    assert len(warnings) == 1 and "retrying" in warnings[0].getMessage()
    await a.close()


@pytest.mark.parametrize(("vm", "message"), [("vm-1", "no QEMU for vm-1 on host-a"),
                                             ("../vm-1", "refused")])  # fmt: skip
async def test_a_pause_for_no_qemu_here_or_a_bad_name_is_refused(
    tmp_path: Path, launches: list[list[str]], vm: str, message: str
) -> None:
    """PAUSE_MIGRATION reaches QEMU only for a VM whose QEMU this hostd runs: one it does not
    run, or a name that could leave its directory, is answered with a failure that says so,
    and nothing is started or written."""
    a = make_agent(tmp_path)
    await refused(a, command(K.COMMAND_KIND_PAUSE_MIGRATION, vm=vm), message)
    assert launches == []
    assert not (tmp_path / "state" / "vms").exists()
    await a.close()
