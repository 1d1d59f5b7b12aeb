"""A corrupted or planted file in hostd's state dir costs at most its own VM's re-attach: it
never stops the others, never blocks hostd, never has a VM forgotten whose QEMU may still run,
and a hostd whose agent dies exits (so that it is restarted) instead of staying up unconnected."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostd import qemu
from hostd.agent import Agent
from hostd.drivers.network import NullNetworkDriver
from hostd.errors import CommandRejected
from hostd.vm import VmRuntime
from whimbrel.v1 import common_pb2, events_pb2, host_pb2

REPO = Path(__file__).resolve().parents[2]


async def _emit(*_: object) -> None:
    pass


def _vm_dir(state: Path, name: str) -> qemu.VmPaths:
    runtime = VmRuntime(common_pb2.VmSpec(name=name), state / "vms" / name, _emit)
    runtime.save()
    return runtime.paths


@pytest.fixture
def good(tmp_path: Path) -> Iterator[int]:
    """VM `good`, whose QEMU (a stand-in with the pidfile's path on its command line, as an
    older hostd's QEMU is found) runs; sorted after `evil`, so a bad `evil` is met first."""
    paths = _vm_dir(tmp_path / "state", "good")
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)", str(paths.pidfile)]
    )
    paths.pidfile.write_text(f"{process.pid}\n")
    try:
        yield process.pid
    finally:
        process.kill()
        process.wait()


def _agent(tmp_path: Path) -> Agent:
    return Agent("h1", "127.0.0.1:1", tmp_path / "state", tmp_path / "locks", "127.0.0.1",
                 NullNetworkDriver())  # fmt: skip


def _spoil(paths: qemu.VmPaths, kind: str) -> None:
    target = paths.root / "elsewhere"
    target.write_text("12x")
    if kind == "role-not-utf8":
        (paths.root / "role").write_bytes(b"\xff\xfe")
    elif kind == "network-not-utf8":
        (paths.root / "network").write_bytes(b"en\xffable")
    elif kind == "pidfile-directory":
        paths.pidfile.mkdir()
    elif kind == "pidfile-fifo":
        os.mkfifo(paths.pidfile)
    elif kind == "pidfile-symlink":
        paths.pidfile.symlink_to(target)
    elif kind == "identity-garbage":
        (paths.root / "qemu.identity").write_bytes(b"\xff not json")
    elif kind == "identity-fifo":
        os.mkfifo(paths.root / "qemu.identity")
    else:
        (paths.root / "qemu.identity").write_text(
            json.dumps({"pid": 1, "start_time": 0, "boot_id": ""})
        )


BAD_FILES = [
    "role-not-utf8",
    "network-not-utf8",
    "pidfile-directory",
    "pidfile-fifo",
    "pidfile-symlink",
    "identity-garbage",
    "identity-fifo",
    "identity-not-a-pid",
]


@pytest.mark.timeout(60)
async def test_a_bad_file_skips_its_own_vm_only_and_forgets_nothing(
    tmp_path: Path, good: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A VM with an unreadable or planted file (one VM per kind of file, all sorted before
    `good`): that VM is skipped and logged with its directory, its spec stays and no exit is
    reported for it (a QEMU may run behind it); `good` is re-attached all the same, and a FIFO
    blocks nothing."""
    bad = {kind: _vm_dir(tmp_path / "state", f"bad-{kind}") for kind in BAD_FILES}
    for kind, paths in bad.items():
        _spoil(paths, kind)
    agent = _agent(tmp_path)
    try:
        with caplog.at_level(logging.ERROR, logger="whimbrel.hostd"):
            await agent.reattach()
        assert list(agent.executor.vms) == ["good"]
        assert agent.executor.vms["good"].pid == good
        exits = [e.payload.qemu_exited.vm for e in agent.pending
                 if e.payload.WhichOneof("kind") == "qemu_exited"]  # fmt: skip
        assert exits == []
        logged = "\n".join(r.getMessage() for r in caplog.records)
        for paths in bad.values():
            assert (paths.root / "spec.pb").exists()
            assert str(paths.root) in logged
    finally:
        await agent.close()


async def test_a_vm_whose_state_cannot_be_read_is_said_present_and_never_touched(
    tmp_path: Path,
) -> None:
    """Left out of the hello, such a VM was read as gone by the coordinator, which then
    started it again: the START_VM here was refused (its QEMU still ran), but the refusal gave
    the lease up, and nothing kept a start elsewhere from running a second QEMU on its disks.
    It is now in the hello as a QEMU that runs (QMP unreachable), and every command for it is
    refused, a destroy included (which gave up the lease of a VM it found no QEMU for)."""
    bad = _vm_dir(tmp_path / "state", "bad")
    _spoil(bad, "role-not-utf8")
    agent = _agent(tmp_path)
    lease = agent.executor.lease
    await lease.acquire("bad", "h1", 1)
    try:
        await agent.reattach()
        hello = await agent.hello()
        observed = {o.vm: (o.process_alive, o.qmp_reachable) for o in hello.vms}
        assert observed == {"bad": (True, False)}
        for kind in (events_pb2.COMMAND_KIND_DESTROY_VM, events_pb2.COMMAND_KIND_START_VM):
            command = host_pb2.Command(command_id=f"c-{kind}", vm="bad", kind=kind)
            with pytest.raises(CommandRejected, match="could not be read at hostd's start"):
                await agent.executor.run(command)
        held = lease.read("bad")
        assert (held.holder, held.generation) == ("h1", 1)
    finally:
        await agent.close()


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_reading_a_pidfile_that_is_no_file_fails_at_once(tmp_path: Path, kind: str) -> None:
    """A directory or FIFO where the pidfile should be is an error, raised without waiting
    for a writer the FIFO will never have."""
    paths = qemu.VmPaths(tmp_path)
    if kind == "directory":
        paths.pidfile.mkdir()
    else:
        os.mkfifo(paths.pidfile)
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; from hostd import qemu; "
         "qemu.read_pid(qemu.VmPaths(Path(sys.argv[1])))", str(tmp_path)],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    assert "UnsafeFile" in result.stderr


def test_hostd_exits_non_zero_when_its_agent_dies(tmp_path: Path) -> None:
    """The agent's task ends with an error (here: its VM directory is a file, so no VM can be
    found): hostd logs why and exits non-zero, for its supervisor to restart it, rather than
    staying up without ever connecting."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "vms").write_text("not a directory")
    (tmp_path / "locks").mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "hostd.main", "--host-id", "h1", "--coordinator", "127.0.0.1:1",
         "--state-dir", str(state), "--lockspace", str(tmp_path / "locks")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise AssertionError("hostd still runs with its agent dead") from None
    assert process.returncode == 1, output
    assert "NotADirectoryError" in output
